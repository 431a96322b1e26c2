#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run calls this script).
# Run as root on a fresh Debian machine: it installs the packages the
# end-to-end tests need, then checks formatting and lints and runs every test
# (unit, CLI, and the network-namespace end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (the end-to-end tests create network namespaces)" >&2
  exit 1
fi

scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
