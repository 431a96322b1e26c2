#!/usr/bin/env bash
# Quick start: builds portcullis and runs its main job — `portcullis init`
# plus `portcullis run` guarding a workload — in a throwaway world of two
# network namespaces, so nothing on this machine's own network changes:
#
#   pod  (192.0.2.2)   the "workload": init installs the REDIRECT rules, the
#                      proxy runs as uid 1337 with ./config.toml, curl plays
#                      the application
#   inet (192.0.2.10, 198.51.100.7, ...)  upstream TLS/HTTP/TCP servers
#
# Run as root: sudo ./scripts/demo.sh   (KEEP=1 leaves the world running
# until you press Enter, so you can try your own flows.)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh: run as root (it creates network namespaces)" >&2
  exit 1
fi

scripts/install-test-deps.sh
echo "== building portcullis (cargo build --release; the first build compiles every"
echo "   dependency and takes a few minutes on a small machine, later ones seconds)"
cargo build --release
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/portcullis
CONFIG=$PWD/config.toml

N="pcd$$"
POD="${N}p"
INET="${N}i"
WORK=$(mktemp -d /tmp/portcullis-demo.XXXXXX)
chmod 755 "$WORK"
# Pids of what we start in the background. Background commands are started as
# "${IN_POD[@]}" cmd & (never through a shell function, whose `$!` would be the
# subshell's pid, not the process's): `ip netns exec` and `setpriv` exec, so
# `$!` is the real process.
PIDS=()
CLEANED=""

cleanup() {
  [ -n "$CLEANED" ] && return
  CLEANED=1
  set +e
  local p ns _
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  # Anything else still inside the namespaces was started by this script (they are
  # its own): end it too, by pid.
  for ns in "$POD" "$INET"; do
    [ -e "/run/netns/$ns" ] || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
  done
  for _ in $(seq 50); do
    local alive=""
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    for ns in "$POD" "$INET"; do
      [ -e "/run/netns/$ns" ] && [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && alive=1
    done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for ns in "$POD" "$INET"; do
    [ -e "/run/netns/$ns" ] || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "/etc/netns/$POD" "/etc/netns/$INET" "$WORK"
}
trap cleanup EXIT
trap 'echo; echo "== interrupted: cleaning up"; exit 130' INT
trap 'exit 143' TERM

IN_POD=(ip netns exec "$POD")
IN_INET=(ip netns exec "$INET")
in_pod() { "${IN_POD[@]}" "$@"; }
in_inet() { "${IN_INET[@]}" "$@"; }

echo "== building a world: namespaces $POD (workload) and $INET (internet)"
ip netns add "$POD"
ip netns add "$INET"
# The veth pair is made across the two namespaces directly: this machine's own
# namespace never holds it, even for a moment.
ip -n "$POD" link add eth0 type veth peer name eth0 netns "$INET"
in_pod ip link set lo up
in_inet ip link set lo up
in_pod ip addr add 192.0.2.2/24 dev eth0
in_pod ip addr add 2001:db8::2/64 dev eth0 nodad
in_inet ip addr add 192.0.2.1/24 dev eth0
in_inet ip addr add 2001:db8::1/64 dev eth0 nodad
for a in 192.0.2.10 192.0.2.11 198.51.100.7 203.0.113.5; do in_inet ip addr add "$a/32" dev eth0; done
in_inet ip addr add 2001:db8::10/128 dev eth0 nodad
in_inet ip addr add 2001:db8::11/128 dev eth0 nodad
in_pod ip link set eth0 up
in_inet ip link set eth0 up
in_pod ip route add default via 192.0.2.1
in_pod ip -6 route add default via 2001:db8::1

# Names come from the pod's hosts file (A and AAAA for every name the proxy
# resolves, smtp.example.net included: /ready waits for the first resolution
# of DNS TCP entries); its resolver address answers nothing, so nothing ever
# leaves the world.
mkdir -p "/etc/netns/$POD"
cat >"/etc/netns/$POD/hosts" <<'EOF'
127.0.0.1 localhost
192.0.2.10 api.example.com
2001:db8::10 api.example.com
192.0.2.11 a.files.example.com
2001:db8::11 a.files.example.com
198.51.100.7 other.example.net
192.0.2.25 smtp.example.net
2001:db8::25 smtp.example.net
EOF
echo "nameserver 192.0.2.53" >"/etc/netns/$POD/resolv.conf"

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=demo \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" \
  -addext "subjectAltName=DNS:api.example.com,DNS:*.files.example.com,DNS:other.example.net" 2>/dev/null
"${IN_INET[@]}" python3 -u tests/upstreams.py --cert "$WORK/cert.pem" --key "$WORK/key.pem" >"$WORK/upstreams.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q READY "$WORK/upstreams.log" && break; sleep 0.05; done

echo "== portcullis check"
"$BIN" check -c "$CONFIG" | sed 's/^/   /'

echo "== portcullis init (in the pod): the redirect and egress rules"
in_pod "$BIN" init -c "$CONFIG"
in_pod iptables -t nat -S PORTCULLIS_OUTPUT | sed 's/^/   /'

echo "== portcullis run (in the pod, as uid 1337)"
"${IN_POD[@]}" setpriv --reuid 1337 --regid 1337 --clear-groups \
  "$BIN" run -c "$CONFIG" >"$WORK/access.log" 2>"$WORK/proxy.log" &
PIDS+=($!)
in_pod "$BIN" wait --url http://127.0.0.1:15021/ready --timeout 30s

CURL=(curl -sS --max-time 10 --cacert "$WORK/cert.pem")
echo
echo "== allowed: https://api.example.com/ (entry payments-api)"
in_pod "${CURL[@]}" https://api.example.com/ | sed 's/^/   /'
echo "== allowed: http://a.files.example.com/ (entry file-store, wildcard)"
in_pod "${CURL[@]}" http://a.files.example.com/ | sed 's/^/   /'
echo "== denied: https://other.example.net/ (not in the registry: TLS alert)"
in_pod "${CURL[@]}" https://other.example.net/ 2>&1 | sed 's/^/   /' || true
echo "== denied: http://other.example.net/ (HTTP 403 naming host and reason)"
in_pod "${CURL[@]}" http://other.example.net/ | sed 's/^/   /'
echo "== spoofed: SNI api.example.com sent to 198.51.100.7 ends at the real api.example.com"
in_pod "${CURL[@]}" --connect-to api.example.com:443:198.51.100.7:443 https://api.example.com/ | sed 's/^/   /'
echo
echo "== the access log (one JSON line per flow)"
sleep 0.3
sed 's/^/   /' "$WORK/access.log"
echo
echo "== a few metrics (http://127.0.0.1:15000/metrics in the pod)"
in_pod curl -sS http://127.0.0.1:15000/metrics | grep -E '^portcullis_connections_total' | sed 's/^/   /'
echo
echo "== portcullis status (the traffic page's summary; the page itself: http://127.0.0.1:15000/ in the pod)"
in_pod "$BIN" status --url http://127.0.0.1:15000 | sed 's/^/   /'
echo
echo "== explain: why was other.example.net denied?"
"$BIN" explain -c "$CONFIG" --dst 198.51.100.7:443 --sni other.example.net | sed 's/^/   /'

if [ "${KEEP:-0}" = 1 ]; then
  echo
  echo "The world stays up: try  ip netns exec $POD curl -v https://api.example.com/ -k"
  echo "Press Enter to tear it down."
  read -r _
fi
in_pod "$BIN" init -c "$CONFIG" --cleanup
cleanup
left=""
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
if [ -n "$left" ] || [ -e "/run/netns/$POD" ] || [ -e "/run/netns/$INET" ]; then
  echo "== cleanup incomplete: still running:$left" >&2
  exit 1
fi
echo "== done: rules removed, proxy and upstreams stopped, namespaces deleted"
