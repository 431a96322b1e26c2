//! The data path end to end (docs/DESIGN.md §3, §4 access log): a pod namespace whose
//! outbound TCP is redirected to `portcullis run` (as its unprivileged uid),
//! an internet namespace with real TLS, HTTP, echo, server-first and bulk
//! upstreams, and real clients (curl, openssl s_client, raw sockets).

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A world with the proxy running in the pod.
struct Px {
    world: World,
    proxy: Proc,
}

impl Px {
    fn start(policy: &str, entries: &str) -> Px {
        let world = World::start();
        Px::start_in(world, policy, entries)
    }

    fn start_in(world: World, policy: &str, entries: &str) -> Px {
        let cfg = world.write_file("config.toml", &proxy_config(policy, "", entries));
        world.init(&cfg);
        let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
        world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
        Px { world, proxy }
    }

    /// Access-log lines so far, once at least `n` are there.
    fn log(&mut self, n: usize) -> Vec<Value> {
        access_log(&mut self.proxy, n, Duration::from_secs(10))
    }

    fn last_log(&mut self, n: usize) -> Value {
        self.log(n)[n - 1].clone()
    }

    /// The proxy on `config` under rules that forget to exclude it (no
    /// excluded uid): its own upstream connections come back to it.
    fn start_unexcluded(config: &str) -> Px {
        let world = World::start();
        world.redirect(15001, None);
        let cfg = world.write_file("config.toml", config);
        let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
        world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
        Px { world, proxy }
    }

    /// A loop was stopped within a bounded number of hops: the access log
    /// holds a loop denial to a `dst` for which `dst_ok` holds, it stays at
    /// three lines, and nothing reached an upstream.
    #[track_caller]
    fn assert_loop_stopped(&mut self, dst_ok: impl Fn(&str) -> bool) {
        let log = self.log(3);
        assert!(
            log.iter().any(|l| l["decision"] == "deny"
                && l["reason"] == "loop"
                && l["dst"].as_str().is_some_and(&dst_ok)),
            "{log:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let lines = self.proxy.stdout().lines().count();
        assert_eq!(lines, 3, "the loop went on: {}", self.proxy.stdout());
        assert!(
            self.world.upstream_accepts().is_empty(),
            "nothing reached the upstream"
        );
    }
}

const API: &str = concat!(
    api_entry!(),
    files_entry!(),
    pinned_entry!("pinned", "other.example.net", "198.51.100.7/32", 443, "TLS"),
    r#"
[[service_entry]]
name = "backend"
addresses = ["198.51.100.7/32"]
ports = [{ number = 2222, protocol = "TCP" }, { number = 7000, protocol = "TCP" }, { number = 7001, protocol = "TCP" }, { number = 9000, protocol = "TCP" }, { number = 7003, protocol = "TCP" }]
"#
);

#[test]
fn tls_allowed_and_denied_with_alert() {
    let mut px = Px::start("", API);
    let out = px.world.curl(&["-4", "https://api.example.com/"]);
    assert!(
        out.ok()
            .contains("tls ok sni=api.example.com local=192.0.2.10:443"),
        "{out:?}"
    );
    let l = px.last_log(1);
    assert_eq!(l["decision"], "allow", "{l}");
    assert_eq!(l["entry"], "api");
    assert_eq!(l["protocol"], "tls");
    assert_eq!(l["name"], "api.example.com");
    assert_eq!(l["dst"], "192.0.2.10:443");
    assert_eq!(l["upstream"], "192.0.2.10:443");
    assert!(
        l["bytes_up"].as_u64().unwrap() > 300 && l["bytes_down"].as_u64().unwrap() > 500,
        "{l}"
    );
    // curl may close with unread TLS bytes pending (a reset) after a complete exchange: not
    // an error.
    assert!(l["error"].is_null(), "{l}");
    assert!(
        l.get("reset_by").is_none() || l["reset_by"] == "client",
        "{l}"
    );

    let before = px.world.upstream_accepts().len();
    let out = px
        .world
        .s_client("192.0.2.10:443", &["-servername", "evil.example.net"], b"");
    assert!(!out.success());
    assert!(out.stderr.contains("alert access denied"), "{out:?}");
    let l = px.last_log(2);
    assert_log(&l, &[("decision", "deny"), ("reason", "not_in_registry")]);
    assert_eq!(l["name"], "evil.example.net");
    assert!(l["entry"].is_null());
    assert!(l["upstream"].is_null());
    assert_eq!(
        px.world.upstream_accepts().len(),
        before,
        "a denied flow opened an upstream connection"
    );
}

#[test]
fn http_allowed_and_403_naming_host_and_reason() {
    let mut px = Px::start("", API);
    let out = px.world.curl(&["http://api.example.com/"]);
    assert!(out.ok().contains("http ok host=api.example.com"), "{out:?}");
    let out = px.world.curl(&["-i", "http://other.example.net/"]);
    let text = out.ok();
    assert!(text.starts_with("HTTP/1.1 403 Forbidden"), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    assert!(
        text.contains("other.example.net:80 denied: not_in_registry"),
        "{text}"
    );
    let l = px.last_log(2);
    assert_log(&l, &[("decision", "deny"), ("protocol", "http")]);
}

#[test]
fn tcp_entry_decided_by_address_server_first_and_half_close() {
    let mut px = Px::start("", API);
    // server-first: the banner arrives without the client sending anything
    let mut s = px
        .world
        .pod_connect(sa(addr::OTHER_V4, port::BANNER))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let line = read_line(&mut s, Duration::from_secs(5)).unwrap();
    assert!(line.starts_with("BANNER 198.51.100.7:2222"), "{line}");
    // "no added wait": far below hello_timeout (2s) and first_byte_timeout
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    drop(s);

    // half-close: the client shuts its write side and still reads the reply
    let mut s = px
        .world
        .pod_connect(sa(addr::OTHER_V4, port::HALF_CLOSE))
        .unwrap();
    s.write_all(&[7u8; 100_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, r) = read_to_end_timeout(&mut s, Duration::from_secs(10));
    r.unwrap();
    assert_eq!(String::from_utf8_lossy(&got).trim(), "got 100000 bytes");

    let log = px.log(2);
    assert!(
        log.iter()
            .all(|l| l["decision"] == "allow" && l["entry"] == "backend"),
        "{log:?}"
    );
    let hc = &log[1];
    assert_eq!(hc["bytes_up"], 100_000, "{hc}");
    assert!(hc["error"].is_null(), "{hc}");

    // a TCP port of no entry's address: denied with RST, no upstream
    let mut s = px.world.pod_connect(sa(addr::API_V4, port::ECHO)).unwrap();
    let _ = s.write_all(b"hello\n");
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    let l = px.last_log(3);
    assert_log(&l, &[("decision", "deny"), ("reason", "not_in_registry")]);
}

#[test]
fn allow_any_passes_server_first_without_delay_and_audit_logs() {
    let mut px = Px::start("outbound_traffic_policy = \"ALLOW_ANY\"", API);
    let mut s = px
        .world
        .pod_connect(sa(addr::API_V4, port::BANNER))
        .unwrap();
    let t = Instant::now();
    let line = read_line(&mut s, Duration::from_secs(5)).unwrap();
    assert!(line.starts_with("BANNER 192.0.2.10:2222"), "{line}");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "server-first delayed by {:?}",
        t.elapsed()
    );
    s.write_all(b"ping\n").unwrap();
    assert_eq!(
        read_line(&mut s, Duration::from_secs(5)).unwrap().trim(),
        "ping"
    );
    drop(s);
    let out = px.world.curl(&["https://other.example.net/"]);
    assert!(
        out.ok()
            .contains("tls ok sni=other.example.net local=198.51.100.7:443"),
        "{out:?}"
    );
    let log = px.log(2);
    let banner = log.iter().find(|l| l["dst"] == "192.0.2.10:2222").unwrap();
    assert_eq!(banner["decision"], "passthrough", "{banner}");
    assert_eq!(banner["protocol"], "tcp", "{banner}");
    let tls = log.iter().find(|l| l["dst"] == "198.51.100.7:443").unwrap();
    // a registry match still labels the flow under ALLOW_ANY
    assert_log(tls, &[("decision", "allow"), ("entry", "pinned")]);
    drop(px);

    let mut px = Px::start("audit = true", API);
    let out = px.world.curl(&[
        "https://b.files.example.com/",
        "--resolve",
        "b.files.example.com:443:192.0.2.10",
    ]);
    assert!(out.ok().contains("tls ok"), "{out:?}");
    let out = px.world.curl(&[
        "--connect-to",
        "evil.example.org:443:192.0.2.10:443",
        "-k",
        "https://evil.example.org/",
    ]);
    assert!(
        out.ok()
            .contains("tls ok sni=evil.example.org local=192.0.2.10:443"),
        "{out:?}"
    );
    let l = px.last_log(2);
    assert_log(&l, &[("decision", "audit"), ("reason", "not_in_registry")]);
    assert_eq!(l["upstream"], "192.0.2.10:443");
}

#[test]
fn sni_spoofing_ends_at_the_real_host() {
    let mut px = Px::start("", API);
    // The client dials 198.51.100.7 but presents api.example.com: resolution
    // DNS sends it to what api.example.com resolves to.
    let out = px.world.curl(&[
        "--connect-to",
        "api.example.com:443:198.51.100.7:443",
        "https://api.example.com/",
    ]);
    assert!(out.ok().contains("local=192.0.2.10:443"), "{out:?}");
    let l = px.last_log(1);
    assert_log(
        &l,
        &[("dst", "198.51.100.7:443"), ("upstream", "192.0.2.10:443")],
    );
    // a wildcard entry too: a.files.example.com resolves to 192.0.2.11
    let out = px.world.curl(&[
        "--connect-to",
        "a.files.example.com:443:203.0.113.5:443",
        "https://a.files.example.com/",
    ]);
    assert!(
        out.ok()
            .contains("sni=a.files.example.com local=192.0.2.11:443"),
        "{out:?}"
    );
    // addresses refuse a wrong IP: other.example.net is pinned to 198.51.100.7
    let out = px
        .world
        .s_client("192.0.2.10:443", &["-servername", "other.example.net"], b"");
    assert!(out.stderr.contains("alert access denied"), "{out:?}");
    let l = px.last_log(3);
    assert_eq!(l["reason"], "address_mismatch", "{l}");
    // a name that resolves to nothing: dns
    let out = px.world.s_client(
        "192.0.2.10:443",
        &["-servername", "nx.files.example.com"],
        b"",
    );
    assert!(out.stderr.contains("alert access denied"), "{out:?}");
    let l = px.last_log(4);
    assert_eq!(l["reason"], "dns", "{l}");
}

#[test]
fn ipv6_flows() {
    let mut px = Px::start("", API);
    let out = px.world.curl(&["-6", "https://api.example.com/"]);
    assert!(out.ok().contains("local=[2001:db8::10]:443"), "{out:?}");
    let l = px.last_log(1);
    assert_eq!(l["dst"], "[2001:db8::10]:443", "{l}");
    assert_eq!(l["decision"], "allow");
}

#[test]
fn direct_connection_to_the_listener_is_a_loop() {
    for policy in [
        "",
        "audit = true",
        "outbound_traffic_policy = \"ALLOW_ANY\"",
    ] {
        let mut px = Px::start(policy, API);
        // The proxy resets at once; the reset may already show in connect.
        if let Ok(mut s) = px.world.pod_connect("127.0.0.1:15001".parse().unwrap()) {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n");
            let mut buf = [0u8; 64];
            let r = s.read(&mut buf);
            assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
        }
        let l = px.last_log(1);
        assert_eq!(
            (l["decision"].as_str(), l["reason"].as_str()),
            (Some("deny"), Some("loop")),
            "{policy}: {l}"
        );
    }
}

/// Rewrites a one-record ClientHello into `parts` records of about equal size.
fn split_records(hello: &[u8], parts: usize) -> Vec<u8> {
    assert_eq!(hello[0], 0x16);
    let body = &hello[5..];
    let chunk = body.len().div_ceil(parts);
    let mut out = Vec::new();
    for c in body.chunks(chunk) {
        out.extend_from_slice(&[0x16, hello[1], hello[2]]);
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

#[test]
fn client_hello_split_across_records_and_dripped() {
    let hello = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hellos/openssl-s_client.bin"
    ))
    .unwrap();
    let mut px = Px::start("", API);
    for parts in [2, 3] {
        let wire = split_records(&hello, parts);
        let mut s = px.world.pod_connect(sa(addr::API_V4, port::TLS)).unwrap();
        s.set_nodelay(true).unwrap();
        for c in wire.chunks(7) {
            s.write_all(c).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        // The upstream (a real TLS server) answers the reassembled hello.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x16, "expected a ServerHello record, got {head:?}");
    }
    let log = px.log(2);
    for l in &log[..2] {
        assert_log(l, &[("decision", "allow"), ("name", "api.example.com")]);
    }
}

#[test]
fn post_quantum_hello_from_chromium_dripped() {
    // Debian's chromium, ~1.9 KB, X25519MLKEM768 key share, GREASE ECH.
    let hello = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hellos/chromium-mlkem.bin"
    ))
    .unwrap();
    let mut px = Px::start(
        "",
        "[[service_entry]]\nhosts = [\"www.example.org\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n",
    );
    let mut s = px.world.pod_connect(sa(addr::ORG_V4, port::TLS)).unwrap();
    s.set_nodelay(true).unwrap();
    for c in hello.chunks(100) {
        s.write_all(c).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x16, "{head:?}");
    drop(s);
    let l = px.last_log(1);
    assert_log(&l, &[("decision", "allow"), ("name", "www.example.org")]);
    assert_eq!(l["ech"], true, "GREASE ECH is marked: {l}");
}

#[test]
fn own_upstream_connection_coming_back_is_a_loop() {
    // Rules that forget to exclude the proxy: its upstream connection is
    // redirected back to it. The loop guard recognises its own socket.
    let mut px = Px::start_unexcluded(&proxy_config(
        "outbound_traffic_policy = \"ALLOW_ANY\"",
        "",
        "",
    ));
    if let Ok(mut s) = px.world.pod_connect(sa(addr::API_V4, port::ECHO)) {
        let _ = s.write_all(b"x\n");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        let r = s.read(&mut buf);
        assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    }
    // Stopped within a bounded number of hops: the client's flow, one pass back through the
    // proxy (let through: a single address match is not proof), and the second pass, reset.
    px.assert_loop_stopped(|dst| dst == "192.0.2.10:7000");
}

#[test]
fn own_upstream_connection_coming_back_after_detection_is_a_loop() {
    // The same forgotten exclusion under REGISTRY_ONLY, on the path that reads the client's
    // hello first: each pass connects only after the hello, which the previous pass relays.
    let mut px = Px::start_unexcluded(&proxy_config("", "", API));
    let out = px.world.curl(&["https://api.example.com/"]);
    assert!(!out.success(), "a looping flow got an answer: {out:?}");
    px.assert_loop_stopped(|dst| dst.ends_with(":443"));
}

/// Issue 16, point 1: a client whose source port NAT moved onto the local port of one of the
/// proxy's live upstream sockets (to the same destination) is an ordinary client, not a loop.
///
/// In a pod the workload and the proxy share one source address. Every redirected flow's reply
/// tuple is `127.0.0.1:15001 -> pod:P`, whatever its destination; a second flow from the same
/// port P to another destination collides with it, and NAT's null binding moves that flow to a
/// random free source port Q, checking only conntrack, not the socket table. Q can therefore be
/// the local port of a live upstream socket of the proxy to the same destination: the proxy
/// then sees a client with exactly its own socket's address.
#[test]
fn nat_remapped_client_on_a_live_upstream_port_is_not_a_loop() {
    const IDLE: usize = 1500;
    const PAIRS: usize = 700;
    let mut px = Px::start("", API);
    let echo = sa(addr::OTHER_V4, port::ECHO);
    let half = sa(addr::OTHER_V4, port::HALF_CLOSE);
    let pod = px.world.pod.clone();

    // Many live upstream sockets of the proxy to `echo`: each flow is held open.
    let idle: Vec<std::net::TcpStream> = in_ns(&pod, || {
        (0..IDLE)
            .map(|i| {
                let mut s = std::net::TcpStream::connect_timeout(&echo, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("idle flow {i}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"i").unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
                    .unwrap_or_else(|e| panic!("idle flow {i}: {e}"));
                s
            })
            .collect()
    });
    let upstream_ports: std::collections::HashSet<u16> = tcp_sockets(&pod)
        .into_iter()
        .filter(|r| r.uid == PROXY_UID && r.remote == echo)
        .map(|r| r.local.port())
        .collect();
    assert_eq!(
        upstream_ports.len(),
        IDLE,
        "one upstream socket per idle flow"
    );

    // Pairs of flows from one source port: the first to `half` (kept open), the second to
    // `echo`, whose reply tuple collides with the first's, so NAT remaps its source port.
    let failures: Vec<String> = in_ns(&pod, || {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let bound = |port: u16| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SockAddr::from(sa(addr::POD_V4, port))).unwrap();
            s
        };
        let mut failures = Vec::new();
        for i in 0..PAIRS {
            let a = bound(0);
            a.connect(&SockAddr::from(half)).unwrap();
            let p = a.local_addr().unwrap().as_socket().unwrap().port();
            let b = bound(p);
            let r = b
                .connect_timeout(&SockAddr::from(echo), Duration::from_secs(10))
                .and_then(|()| {
                    let mut b: std::net::TcpStream = b.into();
                    b.set_read_timeout(Some(Duration::from_secs(10)))?;
                    b.write_all(b"ping")?;
                    let mut got = [0u8; 4];
                    b.read_exact(&mut got)?;
                    Ok(got)
                });
            match r {
                Ok(got) if &got == b"ping" => {}
                other => failures.push(format!("pair {i} (port {p}): {other:?}")),
            }
        }
        failures
    });

    // Every second flow's line names the client address the proxy saw: the remapped one.
    let log = px.log(2 * PAIRS);
    let seconds: Vec<&Value> = log
        .iter()
        .filter(|l| l["dst"] == echo.to_string())
        .collect();
    let on_upstream_port = seconds
        .iter()
        .filter(|l| {
            let client: std::net::SocketAddr = l["client"].as_str().unwrap().parse().unwrap();
            upstream_ports.contains(&client.port())
        })
        .count();
    let loops: Vec<&&Value> = seconds.iter().filter(|l| l["reason"] == "loop").collect();
    eprintln!(
        "{PAIRS} remapped flows, {on_upstream_port} of them onto a live upstream port, \
         {} failed, {} denied as loops",
        failures.len(),
        loops.len()
    );
    assert!(
        on_upstream_port > 0,
        "the test did not reproduce the remap onto an upstream port"
    );
    assert!(failures.is_empty(), "{failures:#?}\n{loops:#?}");
    assert!(loops.is_empty(), "{loops:#?}");
    drop(idle);
}

#[test]
fn one_gib_through_the_relay_with_checksum() {
    let mut px = Px::start("", API);
    let mut s = px
        .world
        .pod_connect(sa(addr::OTHER_V4, port::BULK))
        .unwrap();
    bulk_upload(&mut s, 1 << 30).unwrap();
    drop(s);
    let mut s = px
        .world
        .pod_connect(sa(addr::OTHER_V4, port::BULK))
        .unwrap();
    bulk_download(&mut s, 256 << 20).unwrap();
    drop(s);
    let log = px.log(2);
    assert!(
        log[0]["bytes_up"].as_u64().unwrap() >= 1 << 30,
        "{}",
        log[0]
    );
    assert!(
        log[1]["bytes_down"].as_u64().unwrap() >= 256 << 20,
        "{}",
        log[1]
    );
}

#[test]
fn hello_timeout_denies_a_silent_client() {
    let mut px = Px::start("", API);
    let mut s = px.world.pod_connect(sa(addr::API_V4, port::TLS)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    let l = px.last_log(1);
    assert_eq!(l["reason"], "timeout", "{l}");
}

#[test]
fn upstream_refused_gives_rst_or_502() {
    let mut px = Px::start(
        "",
        concat!(
            pinned_entry!("closed-tls", "api.example.com", "192.0.2.10/32", 9, "TLS"),
            pinned_entry!(
                "closed-http",
                "api.example.com",
                "192.0.2.10/32",
                8081,
                "HTTP"
            ),
        ),
    );
    let out = px.world.curl(&["-4", "-i", "http://api.example.com:8081/"]);
    assert!(out.ok().starts_with("HTTP/1.1 502 Bad Gateway"), "{out:?}");
    let l = px.last_log(1);
    assert_log(&l, &[("decision", "allow"), ("error", "connect_refused")]);
    let out = px
        .world
        .s_client("192.0.2.10:9", &["-servername", "api.example.com"], b"");
    assert!(!out.success());
    let l = px.last_log(2);
    assert_eq!(l["error"], "connect_refused", "{l}");
}

#[test]
fn static_endpoints_whatever_the_client_dialled() {
    let mut px = Px::start(
        "",
        r#"
[[service_entry]]
name = "legacy"
hosts = ["legacy.example.org"]
ports = [{ number = 443, protocol = "TLS" }]
resolution = "STATIC"
endpoints = [{ address = "203.0.113.5", port = 8443 }]
"#,
    );
    let out = px.world.curl(&[
        "-k",
        "--connect-to",
        "legacy.example.org:443:192.0.2.10:443",
        "https://legacy.example.org/",
    ]);
    assert!(
        out.ok()
            .contains("sni=legacy.example.org local=203.0.113.5:8443"),
        "{out:?}"
    );
    let l = px.last_log(1);
    assert_log(
        &l,
        &[("dst", "192.0.2.10:443"), ("upstream", "203.0.113.5:8443")],
    );
}

#[test]
fn stale_dns_answers_are_served_when_the_resolver_fails() {
    let world = World::builder().dns_ttl(1).start();
    let mut px = Px::start_in(world, "", API);
    let out = px.world.curl(&[
        "-4",
        "--resolve",
        "api.example.com:443:192.0.2.10",
        "https://api.example.com/",
    ]);
    assert!(out.ok().contains("tls ok"), "{out:?}");
    px.world.stop_dns();
    std::thread::sleep(Duration::from_millis(1500)); // past the TTL
    let out = px.world.curl(&[
        "-4",
        "--resolve",
        "api.example.com:443:192.0.2.10",
        "https://api.example.com/",
    ]);
    assert!(
        out.ok()
            .contains("tls ok sni=api.example.com local=192.0.2.10:443"),
        "{out:?}"
    );
    let l = px.last_log(2);
    assert_eq!(l["decision"], "allow", "{l}");
    // logged when the refresh behind the stale answer fails (one budget later)
    assert!(
        px.proxy
            .wait_output("serving the last good answer", Duration::from_secs(10)),
        "{}",
        px.proxy.logs(3000)
    );
}

#[test]
fn mark_exclusion_lets_a_root_proxy_out() {
    // The proxy runs as root (not proxy_uid): only the mark keeps its own
    // upstream connections out of the redirect. Without it they would loop.
    let world = World::start();
    let cfg = world.write_file(
        "config.toml",
        &proxy_config("", "", &format!("mark = 0x539\n{API}")),
    );
    world.init(&cfg);
    // Count marked DNS queries: the resolver's sockets carry the mark too.
    world
        .run_pod(Cmd::new("iptables").args([
            "-I", "OUTPUT", "1", "-p", "udp", "--dport", "53", "-m", "mark", "--mark", "0x539",
        ]))
        .ok();
    let proxy = world.spawn_pod(Cmd::new(portcullis_bin()).label("portcullis").args([
        "run",
        "-c",
        cfg.to_str().unwrap(),
    ]));
    world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
    let mut px = Px { world, proxy };
    let out = px
        .world
        .curl_as(APP_UID, APP_UID, &["-4", "https://api.example.com/"]);
    assert!(out.ok().contains("tls ok sni=api.example.com"), "{out:?}");
    let l = px.last_log(1);
    assert_log(&l, &[("decision", "allow"), ("upstream", "192.0.2.10:443")]);
    let counters = px
        .world
        .run_pod(Cmd::new("iptables").args(["-L", "OUTPUT", "1", "-v", "-x", "-n"]));
    let packets: u64 = counters
        .ok()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(packets > 0, "no marked DNS query: {counters:?}");
}

#[test]
fn ipv6_listener_that_cannot_bind_is_a_warning() {
    let world = World::start();
    world
        .run_pod(Cmd::new("sysctl").args([
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.lo.disable_ipv6=1",
        ]))
        .ok();
    let mut px = Px::start_in(world, "", API);
    let out = px.world.curl(&["-4", "https://api.example.com/"]);
    assert!(out.ok().contains("tls ok"), "{out:?}");
    assert!(
        px.proxy.stderr().contains("IPv6 listener not bound"),
        "{}",
        px.proxy.logs(3000)
    );
    assert_eq!(px.last_log(1)["decision"], "allow");
}
