#!/usr/bin/env bash
# Instructions per ClientHello for the detect stage (examples/detect_cost.rs), counted by
# callgrind: load-independent, so figures taken on a busy machine compare. See bench/README.md,
# "Detection cost per hello".
#
# Usage: bench/detect_cost.sh [ITER]   (needs valgrind; ITER defaults to 200)
set -euo pipefail
cd "$(dirname "$0")/.."
iter="${1:-200}"

cargo build --quiet --release --example detect_cost
bin="${CARGO_TARGET_DIR:-target}/release/examples/detect_cost"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

printf '%-24s %8s %14s\n' hello bytes instr/hello
for f in tests/data/hellos/*.bin; do
  # The TLS captures only (record type 0x16).
  [ "$(head -c1 "$f" | od -An -tx1 | tr -d ' ')" = 16 ] || continue
  name="$(basename "$f")"
  valgrind --tool=callgrind --toggle-collect='*detect_cost::detect_many*' \
    --callgrind-out-file="$out/$name.out" "$bin" "$iter" "$f" >/dev/null 2>"$out/$name.log"
  total="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$out/$name.out")"
  printf '%-24s %8s %14s\n' "$name" "$(stat -c %s "$f")" "$((total / iter))"
done
