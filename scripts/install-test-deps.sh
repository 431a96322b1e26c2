#!/usr/bin/env bash
# Installs what the end-to-end tests need (docs/DESIGN.md §6), only when something is missing.
# Idempotent and quiet: prints nothing when everything is already there.
set -euo pipefail

# command -> Debian package providing it
declare -A want=(
  [iptables]=iptables
  [ip6tables]=iptables
  [iptables-restore]=iptables
  [ip]=iproute2
  [openssl]=openssl
  [curl]=curl
  [dnsmasq]=dnsmasq-base
  [socat]=socat
  [ncat]=ncat
  [python3]=python3
  [pkill]=procps    # procps: ps/sysctl for debugging; tests never use pkill
  [sysctl]=procps
  [setpriv]=util-linux
  [chromium]=chromium  # tests/page_e2e.rs: the traffic page in a real browser
  [unshare]=util-linux
  # the static build (scripts/build-static.sh) and tests/static_binary.rs
  [readelf]=binutils
  [nm]=binutils
  [strip]=binutils
)

missing=()
for cmd in "${!want[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
    missing+=("${want[$cmd]}")
  fi
done
# glibc's static libraries, for the crt-static link
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
[ "${#missing[@]}" -eq 0 ] && exit 0

# de-duplicate
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing ${missing[*]}; run as root to install" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-test-deps: installing ${missing[*]}" >&2
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
