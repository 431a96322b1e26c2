#!/usr/bin/env bash
# Builds the shipped binary: statically linked (glibc with crt-static on the
# x86_64-unknown-linux-gnu target, no shared library and no dynamic loader)
# and stripped, with the `dist` profile of Cargo.toml.
#
#   scripts/build-static.sh            # -> target/static/portcullis
#   OUT=/usr/local/bin/portcullis scripts/build-static.sh   # and install it there
#
# It prints the path of the binary on stdout (the last line). Exit status 3:
# the binary was built but is not static or references NSS (a bug to fix,
# not a machine to skip); any other failure is cargo's.
#
# CARGO_TARGET_DIR defaults to target/static so that the static build does
# not invalidate the ordinary (dynamic) build's artifacts in target/.
#
# The target is passed explicitly: then RUSTFLAGS apply to the binary only,
# not to build scripts and proc-macros (which must stay dynamic).
#
# glibc's NSS (getaddrinfo, getpwnam, getgrnam, ...) cannot work in a static
# binary; portcullis calls none of them (README "Install"), and this script
# refuses a binary that references them.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/static}"
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"

# Linked with its symbol table so that the checks below can read it, then
# stripped into $CARGO_TARGET_DIR/portcullis (`cargo build --profile dist`
# alone strips at link time).
CARGO_PROFILE_DIST_STRIP=false \
  cargo build --locked --profile dist --target "$target" --bin portcullis "$@" >&2
linked="$CARGO_TARGET_DIR/$target/dist/portcullis"
bin="$CARGO_TARGET_DIR/portcullis"

# Static: no program interpreter, no DT_NEEDED entry.
if readelf -l "$linked" | grep -q 'INTERP'; then
  echo "build-static: $linked asks for a dynamic loader" >&2
  exit 3
fi
if readelf -d "$linked" | grep -q 'NEEDED'; then
  echo "build-static: $linked needs shared libraries:" >&2
  readelf -d "$linked" | grep NEEDED >&2
  exit 3
fi
# No NSS: these would try to dlopen libnss_*.so at run time (or fail, as in
# an empty chroot). Only code counts: glibc's `__evoke_link_warning_*` notes
# (type n) stay behind for functions that --gc-sections removed, and the NSS
# module tables themselves are always there (fork() refers to them).
nss='getaddrinfo|getnameinfo|gethostbyname|gethostbyname2|gethostbyname_r|gethostbyname2_r|gethostbyaddr|gethostbyaddr_r|getservbyname|getservbyname_r|getpwnam|getpwnam_r|getpwuid|getpwuid_r|getgrnam|getgrnam_r|getgrgid|getgrgid_r|getgrouplist|initgroups'
if bad=$(nm "$linked" | awk -v re="^_*($nss)\$" '$2 != "n" && $3 ~ re'); [ -n "$bad" ]; then
  echo "build-static: $linked calls glibc NSS functions:" >&2
  echo "$bad" >&2
  exit 3
fi

strip --strip-all -o "$bin.tmp" "$linked" && mv "$bin.tmp" "$bin"

if [ -n "${OUT:-}" ]; then
  install -m 0755 "$bin" "$OUT"
  bin="$OUT"
fi
echo "$bin"
