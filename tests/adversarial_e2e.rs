//! Hostile clients and broken upstreams, end to end (issue 7; SECURITY.md cites these tests).
//!
//! Each test builds its own world (tests/common): the pod's outbound TCP is redirected to
//! `portcullis run`, running as its unprivileged uid 1337, and the upstreams of
//! tests/upstreams.py answer in the inet namespace. The hostile bytes are crafted here: the
//! ClientHellos are the golden OpenSSL capture (tests/data/hellos/) with their server_name,
//! padding or ECH extensions rebuilt, so every other byte is what a real client sends.
//!
//! Timeouts are real and short, with wide margins; nothing asserts how fast anything is, only
//! what happens and (for CPU and detector work) bounds far from the normal values.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ------------------------------------------------------------------------------ the world

struct Px {
    world: World,
    proxy: Proc,
    /// How many access-log lines `next_line` has handed out.
    seen: usize,
}

/// `[proxy]` and `[redirect]` with the timeouts of these tests; `extra` goes into `[proxy]`.
fn proxy_section(hello_timeout: &str, extra: &str) -> String {
    let proxy = format!("hello_timeout = \"{hello_timeout}\"\nconnect_timeout = \"1s\"\n{extra}");
    proxy_config("", &proxy, "")
}

impl Px {
    fn start(policy: &str, proxy: &str, entries: &str) -> Px {
        let world = World::start();
        world.redirect(15001, Some(PROXY_UID));
        let cfg = world.write_file("config.toml", &format!("{policy}\n{proxy}\n{entries}"));
        let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
        world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
        world.wait_tcp(&world.pod, "127.0.0.1:15000".parse().unwrap());
        Px {
            world,
            proxy,
            seen: 0,
        }
    }

    /// The access log so far, once it holds at least `n` lines.
    fn log(&mut self, n: usize) -> Vec<Value> {
        access_log(&mut self.proxy, n, Duration::from_secs(20))
    }

    /// The line of the `n`-th flow (1-based), once it is there.
    fn nth(&mut self, n: usize) -> Value {
        self.log(n)[n - 1].clone()
    }

    /// The line of the flow after the one last taken by this method, once it is there.
    fn next_line(&mut self) -> Value {
        self.seen += 1;
        self.nth(self.seen)
    }

    /// A client connection from the pod (redirected to the proxy).
    fn connect(&self, ip: std::net::IpAddr, port: u16) -> TcpStream {
        connect_many(&self.world.pod, sa(ip, port), 1).remove(0)
    }

    /// `GET path` on the admin port, from inside the pod.
    fn admin(&self, path: &str) -> String {
        let out = self.world.curl(&[&format!("http://127.0.0.1:15000{path}")]);
        out.ok().to_string()
    }

    fn metrics(&self) -> String {
        self.admin("/metrics")
    }

    /// /proc/PID of the proxy (`ip netns exec` and `setpriv` exec, so it is the proxy's own).
    fn pid(&mut self) -> u32 {
        let pid = self.proxy.pid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "portcullis", "pid {pid} is not the proxy");
        pid
    }
}

/// Sum of the samples of `name` whose labels include every `k="v"` of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| lbl.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the parenthesised command name start with the state (field 3); utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// TCP segments sent so far in namespace `ns` (all sockets), from /proc/net/snmp.
fn tcp_out_segments(ns: &str) -> u64 {
    let snmp = in_ns(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap()
    });
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "OutSegs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Lets this test process hold thousands of client sockets.
fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Opens `n` connections to `dst` from the pod on one thread (one setns, not `n`). A
/// connection the proxy resets at once (overload, a refused upstream) may fail in connect.
fn try_connect_many(ns: &str, dst: SocketAddr, n: usize) -> Vec<std::io::Result<TcpStream>> {
    in_ns(ns, || {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
                // The proxy may have reset it already.
                let _ = s.set_nodelay(true);
                Ok(s)
            })
            .collect()
    })
}

fn connect_many(ns: &str, dst: SocketAddr, n: usize) -> Vec<TcpStream> {
    try_connect_many(ns, dst, n)
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("client {i} to {dst}: {e}")))
        .collect()
}

/// True when the result is the trace of an RST: in connect, or in the read.
fn was_reset(r: &std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset)
}

fn read_all(s: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    read_to_end_timeout(s, Duration::from_secs(15))
}

/// What the proxy's TLS deny answer looks like: a fatal access_denied alert, then EOF.
const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// Sends `hello`, then reads to the end: the deny answer is the alert and a clean close.
#[track_caller]
fn expect_alert(px: &Px, ip: std::net::IpAddr, hello: &[u8]) {
    let mut s = px.connect(ip, port::TLS);
    s.write_all(hello).unwrap();
    let (got, r) = read_all(&mut s);
    assert_eq!(got, ALERT, "{r:?}");
}

/// Sends `hello` and reads the first record header of the upstream's answer: a real TLS server
/// answers a ClientHello it accepts with a handshake record (ServerHello).
#[track_caller]
fn expect_server_hello(px: &Px, ip: std::net::IpAddr, hello: &[u8]) {
    let mut s = px.connect(ip, port::TLS);
    s.write_all(hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x16, "expected a ServerHello record, got {head:?}");
}

/// The client sees the connection reset (RST), not a clean close.
#[track_caller]
fn expect_reset(s: &mut TcpStream) {
    let (got, r) = read_all(s);
    assert!(was_reset(&r), "expected a reset, got {r:?} after {got:?}");
}

/// Connects to `ip:port`, sends `data`, and expects an RST (which may come before the write).
#[track_caller]
fn expect_reset_for(px: &Px, ip: std::net::IpAddr, port: u16, data: &[u8]) {
    let mut s = match try_connect_many(&px.world.pod, sa(ip, port), 1).remove(0) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect {ip}:{port}: {e}"),
    };
    if let Err(e) = s.write_all(data) {
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        return;
    }
    expect_reset(&mut s);
}

// ------------------------------------------------------------------------------ ClientHellos

const EXT_SERVER_NAME: u16 = 0;
const EXT_PADDING: u16 = 0x0015;
const EXT_ECH: u16 = 0xfe0d;

/// The golden OpenSSL ClientHello taken apart: everything before the extension block, and the
/// extensions. `records` puts it back together, as one or several TLS records.
#[derive(Clone)]
struct Hello {
    version: [u8; 2],
    prefix: Vec<u8>,
    exts: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    fn golden() -> Hello {
        let raw = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/hellos/openssl-s_client.bin"
        ))
        .unwrap();
        assert_eq!(raw[0], 0x16);
        let len = usize::from(u16::from_be_bytes([raw[3], raw[4]]));
        assert_eq!(raw.len(), 5 + len, "the golden hello is one record");
        let msg = &raw[5..];
        assert_eq!(msg[0], 1, "a ClientHello");
        let body = &msg[4..];
        let mut at = 2 + 32;
        at += 1 + usize::from(body[at]);
        at += 2 + usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        at += 1 + usize::from(body[at]);
        let prefix = body[..at].to_vec();
        let ext_len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        let mut ext = &body[at + 2..at + 2 + ext_len];
        let mut exts = Vec::new();
        while !ext.is_empty() {
            let kind = u16::from_be_bytes([ext[0], ext[1]]);
            let n = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
            exts.push((kind, ext[4..4 + n].to_vec()));
            ext = &ext[4 + n..];
        }
        let h = Hello {
            version: [raw[1], raw[2]],
            prefix,
            exts,
        };
        assert_eq!(h.records(1 << 14), raw, "taking apart and back is exact");
        h
    }

    /// server_name extension data holding `names` as host_name entries.
    fn sni_data(names: &[&[u8]]) -> Vec<u8> {
        let typed: Vec<(u8, &[u8])> = names.iter().map(|n| (0, *n)).collect();
        Self::sni_typed_data(&typed)
    }

    /// server_name extension data holding (name_type, name) entries in order.
    fn sni_typed_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, n) in entries {
            list.push(*kind);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    /// Replaces the extension `kind` (where it was), or appends it.
    fn set(mut self, kind: u16, data: Vec<u8>) -> Hello {
        match self.exts.iter_mut().find(|(k, _)| *k == kind) {
            Some(e) => e.1 = data,
            None => self.exts.push((kind, data)),
        }
        self
    }

    fn without(mut self, kind: u16) -> Hello {
        self.exts.retain(|(k, _)| *k != kind);
        self
    }

    /// The same hello presenting these host_names in one server_name extension.
    fn sni(self, names: &[&str]) -> Hello {
        let names: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        self.set(EXT_SERVER_NAME, Self::sni_data(&names))
    }

    /// The same hello with one server_name extension of (name_type, name) entries.
    fn sni_typed(self, entries: &[(u8, &str)]) -> Hello {
        let e: Vec<(u8, &[u8])> = entries.iter().map(|(k, n)| (*k, n.as_bytes())).collect();
        self.set(EXT_SERVER_NAME, Self::sni_typed_data(&e))
    }

    /// A second, separate server_name extension (RFC 8446 forbids duplicates).
    fn second_sni(mut self, name: &str) -> Hello {
        self.exts
            .push((EXT_SERVER_NAME, Self::sni_data(&[name.as_bytes()])));
        self
    }

    /// A GREASE-style encrypted_client_hello extension, as browsers add to ordinary hellos.
    fn grease_ech(self) -> Hello {
        // outer (0), HPKE suite, config id, enc (32 bytes), payload (144 bytes)
        let mut d = vec![0, 0x00, 0x01, 0x00, 0x01, 0x5a, 0x00, 0x20];
        d.extend_from_slice(&[0x42; 32]);
        d.extend_from_slice(&144u16.to_be_bytes());
        d.extend_from_slice(&[0x99; 144]);
        self.set(EXT_ECH, d)
    }

    /// The handshake message (type, length, body).
    fn message(&self) -> Vec<u8> {
        let mut ext = Vec::new();
        for (k, d) in &self.exts {
            ext.extend_from_slice(&k.to_be_bytes());
            ext.extend_from_slice(&(d.len() as u16).to_be_bytes());
            ext.extend_from_slice(d);
        }
        let mut body = self.prefix.clone();
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// As TLS records of at most `max` payload bytes.
    fn records(&self, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in self.message().chunks(max) {
            out.push(0x16);
            out.extend_from_slice(&self.version);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn bytes(&self) -> Vec<u8> {
        self.records(1 << 14)
    }

    /// Padded (padding extension, RFC 7685) so that its records come to `total` bytes.
    fn padded_to(self, total: usize) -> Hello {
        let h = self.set(EXT_PADDING, Vec::new());
        let base = h.bytes().len();
        let records = total.div_ceil(1 << 14);
        // Each extra record adds a 5-byte header; the padding fills the rest.
        let pad = total - base - 5 * (records - 1);
        let h = h.set(EXT_PADDING, vec![0; pad]);
        assert_eq!(h.bytes().len(), total);
        h
    }
}

// ------------------------------------------------------------------------------ registry

const REGISTRY: &str = concat!(
    api_entry!(),
    r#"
[[service_entry]]
name = "files"
hosts = ["*.files.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }]
"#,
    pinned_entry!("pinned", "other.example.net", "198.51.100.7/32", 443, "TLS"),
    pinned_entry!(
        "pinned-wild",
        "*.pinned.example",
        "198.51.100.7/32",
        443,
        "TLS"
    ),
    r#"
[[service_entry]]
name = "backend"
addresses = ["198.51.100.7/32"]
ports = [{ number = 7000, protocol = "TCP" }, { number = 7003, protocol = "TCP" }]
"#
);

// ------------------------------------------------------------------------------ slow clients

/// A thousand clients each stall half-way through a ClientHello: they cost the proxy no CPU
/// (it sleeps on its sockets, no busy loop), other flows go on meanwhile, and every one of them
/// is closed once `hello_timeout` has passed.
#[test]
fn a_thousand_stalled_hellos_cost_no_cpu() {
    raise_nofile();
    const N: usize = 1000;
    let mut px = Px::start("", &proxy_section("8s", ""), REGISTRY);
    let pid = px.pid();
    let hello = Hello::golden().sni(&["api.example.com"]).bytes();
    let half = &hello[..hello.len() / 2];

    let mut clients = connect_many(&px.world.pod, sa(addr::API_V4, port::TLS), N);
    for c in &mut clients {
        c.write_all(half).unwrap();
    }
    let accepted = poll_until(Duration::from_secs(20), || {
        metric(&px.metrics(), "portcullis_active_connections", &[]) >= N as f64
    });
    assert!(accepted, "the proxy did not take all {N} flows");

    // Over a second of the stall, the proxy's CPU stays far below a busy loop (1 core).
    let hz = clock_ticks_per_sec();
    let t0 = cpu_ticks(pid);
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - t0;
    let wall = w0.elapsed().as_secs_f64();
    let cores = used as f64 / hz as f64 / wall;
    eprintln!("{N} stalled clients: the proxy used {cores:.3} cores over {wall:.2}s");
    assert!(
        cores < 0.2,
        "{N} stalled clients cost {cores:.2} cores ({used} ticks in {wall:.2}s)"
    );

    // Meanwhile a normal flow goes through.
    let out = px.world.curl(&["-4", "https://api.example.com/"]);
    assert!(out.ok().contains("tls ok sni=api.example.com"), "{out:?}");
    // ... while every stalled client was still waiting (none had timed out yet).
    assert!(
        !px.proxy.stdout().contains("\"timeout\""),
        "the stalled clients timed out before the check was over: raise hello_timeout"
    );

    // Every stalled client is denied (timeout): the TLS alert, then the close.
    for (i, c) in clients.iter_mut().enumerate() {
        let (got, r) = read_to_end_timeout(c, Duration::from_secs(30));
        assert_eq!(got, ALERT, "client {i}: {r:?}");
    }
    let log = px.log(N + 1);
    let timeouts: Vec<&Value> = log.iter().filter(|l| l["reason"] == "timeout").collect();
    assert_eq!(timeouts.len(), N, "{:?}", log.last());
    for l in &timeouts {
        assert_eq!(l["decision"], "deny", "{l}");
        assert_eq!(l["protocol"], "tls", "{l}");
        // Nobody was cut off early.
        assert!(l["duration_ms"].as_u64().unwrap() >= 7_900, "{l}");
    }
    assert!(
        poll_until(Duration::from_secs(20), || metric(
            &px.metrics(),
            "portcullis_active_connections",
            &[]
        ) == 0.0),
        "flows left open"
    );
}

/// Many clients drip a 60 KiB ClientHello one byte per segment: the detector's work stays
/// linear (at most about twice the bytes sent), and the hellos still reach the upstream whole.
#[test]
fn a_60k_hello_dripped_byte_by_byte_is_examined_linearly() {
    const CLIENTS: usize = 8;
    let mut px = Px::start("", &proxy_section("120s", ""), REGISTRY);
    let hello = Hello::golden()
        .sni(&["api.example.com"])
        .padded_to(60 * 1024)
        .bytes();
    assert_eq!(hello.len(), 60 * 1024);
    // One byte per write, with TCP_NODELAY and without autocorking: a segment per byte while
    // the congestion window lets it; beyond it the kernel coalesces what waits, so segments
    // average a few bytes. Either way a detector that re-read its buffer on every arrival
    // would examine hundreds of times the bytes sent.
    px.world
        .run_pod(Cmd::new("sysctl").args(["-qw", "net.ipv4.tcp_autocorking=0"]))
        .ok();
    let before = metric(&px.metrics(), "portcullis_detect_bytes_examined_total", &[]);
    let mut clients = connect_many(&px.world.pod, sa(addr::API_V4, port::TLS), CLIENTS);
    let segs_before = tcp_out_segments(&px.world.pod);
    std::thread::scope(|s| {
        for c in &mut clients {
            let hello = &hello;
            s.spawn(move || {
                for (i, b) in hello.iter().enumerate() {
                    c.write_all(std::slice::from_ref(b)).unwrap();
                    if i % 16 == 15 {
                        // A little pacing, so fewer bytes wait for the congestion window.
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            });
        }
    });
    let segs = tcp_out_segments(&px.world.pod) - segs_before;
    eprintln!(
        "{} dripped bytes went in {segs} segments",
        CLIENTS * hello.len()
    );
    assert!(
        segs >= (CLIENTS * hello.len() / 256) as u64,
        "only {segs} segments carried {} dripped bytes: not a drip",
        CLIENTS * hello.len()
    );
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = [0u8; 5];
        c.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x16, "expected a ServerHello record, got {head:?}");
    }
    drop(clients);
    let log = px.log(CLIENTS);
    for l in &log {
        assert_log(l, &[("decision", "allow"), ("name", "api.example.com")]);
        assert!(l["bytes_up"].as_u64().unwrap() >= hello.len() as u64, "{l}");
    }
    let sent = (CLIENTS * hello.len()) as f64;
    let examined = metric(&px.metrics(), "portcullis_detect_bytes_examined_total", &[]) - before;
    assert!(
        examined >= sent && examined <= 2.0 * sent + 1024.0,
        "examined {examined} bytes for {sent} sent"
    );
}

// ------------------------------------------------------------------------------ odd first bytes

/// A ClientHello (and a request head) beyond 64 KiB is refused as too_large as soon as its size
/// is known; garbage is opaque (denied with a reset); TLS-looking garbage is malformed.
#[test]
fn oversized_and_garbage_first_flights() {
    let mut px = Px::start("", &proxy_section("5s", ""), REGISTRY);

    // A hello of 70 KiB: its handshake length alone says it is too large.
    let big = Hello::golden()
        .sni(&["api.example.com"])
        .padded_to(70 * 1024)
        .bytes();
    let mut s = px.connect(addr::API_V4, port::TLS);
    // The proxy may answer and close before all of it is written.
    let _ = s.write_all(&big);
    let (got, _) = read_all(&mut s);
    assert_eq!(got, ALERT);
    let l = px.next_line();
    assert_log(
        &l,
        &[
            ("decision", "deny"),
            ("reason", "too_large"),
            ("protocol", "tls"),
        ],
    );

    // A request head of 70 KiB.
    let mut head = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Pad: ".to_vec();
    head.resize(70 * 1024, b'p');
    head.extend_from_slice(b"\r\n\r\n");
    let mut s = px.connect(addr::API_V4, port::HTTP);
    let _ = s.write_all(&head);
    let (got, _) = read_all(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403 Forbidden"), "{text}");
    assert!(text.contains("too_large"), "{text}");
    let l = px.next_line();
    assert_log(&l, &[("reason", "too_large"), ("protocol", "http")]);

    // Random bytes: no protocol, no name; on a TLS port of no TCP entry, a reset.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut s = px.connect(addr::API_V4, port::TLS);
    let mut g = garbage.clone();
    g[0] = 0x01;
    let _ = s.write_all(&g);
    let (got, r) = read_all(&mut s);
    assert!(got.is_empty(), "{got:?}");
    assert!(r.is_ok() || was_reset(&r), "{r:?}");
    let l = px.next_line();
    assert_log(
        &l,
        &[
            ("decision", "deny"),
            ("reason", "not_in_registry"),
            ("protocol", "tcp"),
        ],
    );
    assert!(l["name"].is_null(), "{l}");

    // A TLS record header followed by garbage: malformed, answered with the alert.
    let mut g = vec![0x16, 0x03, 0x01, 0x01, 0x00];
    g.extend_from_slice(&garbage[..256]);
    // A ClientHello header whose length fills the record exactly, so the garbage body decides.
    g[5..9].copy_from_slice(&[0x01, 0x00, 0x00, 0xfc]);
    expect_alert(&px, addr::API_V4, &g);
    let l = px.next_line();
    assert_log(&l, &[("reason", "malformed"), ("protocol", "tls")]);
    // An HTTP request line followed by binary junk: malformed, answered with a 403.
    let mut g = b"GET / HTTP/1.1\r\n".to_vec();
    g.extend_from_slice(&garbage[..256]);
    g.extend_from_slice(b"\r\n\r\n");
    let mut s = px.connect(addr::API_V4, port::HTTP);
    s.write_all(&g).unwrap();
    let (got, _) = read_all(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403 Forbidden"), "{text}");
    let l = px.next_line();
    assert_eq!(l["reason"], "malformed", "{l}");
    assert!(
        px.world.upstream_accepts().is_empty(),
        "a refused flow reached an upstream"
    );
}

// ------------------------------------------------------------------------------ names in TLS

/// What the SNI may look like: absent, an IP literal, odd case or a trailing dot, two names,
/// two extensions, a GREASE ECH extension next to it.
#[test]
fn sni_shapes() {
    let mut px = Px::start("", &proxy_section("5s", ""), REGISTRY);
    let golden = Hello::golden();

    // No SNI at all: no name, so nothing in the registry matches.
    expect_alert(
        &px,
        addr::API_V4,
        &golden.clone().without(EXT_SERVER_NAME).bytes(),
    );
    let l = px.next_line();
    assert_log(
        &l,
        &[
            ("decision", "deny"),
            ("reason", "not_in_registry"),
            ("protocol", "tls"),
        ],
    );
    assert!(l["name"].is_null(), "{l}");

    // An IP literal is no name: it matches no host and is never listed by name in /denied.
    expect_alert(
        &px,
        addr::API_V4,
        &golden.clone().sni(&["192.0.2.10"]).bytes(),
    );
    let l = px.next_line();
    assert_eq!(l["reason"], "not_in_registry", "{l}");
    assert!(l["name"].is_null(), "{l}");
    let denied: Value = serde_json::from_str(&px.admin("/denied")).unwrap();
    let text = denied.to_string();
    assert!(
        !text.contains("\"name\":\"192.0.2.10\""),
        "an IP literal listed as a name: {text}"
    );
    assert!(
        text.contains("\"ip\":\"192.0.2.10\""),
        "the nameless flow is listed by address: {text}"
    );

    // Upper case and a trailing dot are the same name: allowed.
    for name in ["API.EXAMPLE.COM", "Api.Example.Com.", "api.example.com."] {
        expect_server_hello(&px, addr::API_V4, &golden.clone().sni(&[name]).bytes());
        let l = px.next_line();
        assert_eq!(
            (
                l["decision"].as_str(),
                l["name"].as_str(),
                l["entry"].as_str()
            ),
            (Some("allow"), Some("api.example.com"), Some("api")),
            "{name}: {l}"
        );
    }

    // Two host_names in one extension, or two server_name extensions: malformed, whichever
    // comes first.
    // A name of another type than host_name (none is defined; a reader taking the first entry
    // whatever its type would see it as the name), beside the host_name or alone: malformed.
    for hello in [
        golden.clone().sni(&["api.example.com", "evil.example.net"]),
        golden.clone().sni(&["evil.example.net", "api.example.com"]),
        golden
            .clone()
            .sni(&["api.example.com"])
            .second_sni("evil.example.net"),
        golden
            .clone()
            .sni_typed(&[(7, "evil.example.net"), (0, "api.example.com")]),
        golden
            .clone()
            .sni_typed(&[(0, "api.example.com"), (1, "evil.example.net")]),
        golden.clone().sni_typed(&[(7, "api.example.com")]),
    ] {
        expect_alert(&px, addr::API_V4, &hello.bytes());
        let l = px.next_line();
        assert_log(&l, &[("decision", "deny"), ("reason", "malformed")]);
    }

    // A GREASE ECH extension on an allowed name changes nothing but the log's mark.
    expect_server_hello(
        &px,
        addr::API_V4,
        &golden
            .clone()
            .sni(&["api.example.com"])
            .grease_ech()
            .bytes(),
    );
    let l = px.next_line();
    assert_eq!(
        (
            l["decision"].as_str(),
            l["name"].as_str(),
            l["ech"].as_bool()
        ),
        (Some("allow"), Some("api.example.com"), Some(true)),
        "{l}"
    );
    // ... and on a name not in the registry it is no way around the registry.
    expect_alert(
        &px,
        addr::API_V4,
        &golden
            .clone()
            .sni(&["evil.example.net"])
            .grease_ech()
            .bytes(),
    );
    let l = px.next_line();
    assert_eq!(
        (l["decision"].as_str(), l["ech"].as_bool()),
        (Some("deny"), Some(true)),
        "{l}"
    );
}

/// A client that dials one address while naming an allowed host: DNS entries send it to what
/// the name resolves to, `addresses` entries refuse it (exact and wildcard hosts alike).
#[test]
fn sni_and_host_spoofing() {
    let mut px = Px::start("", &proxy_section("5s", ""), REGISTRY);
    let golden = Hello::golden();

    // DNS, exact: dialling 198.51.100.7 presenting api.example.com reaches 192.0.2.10.
    let out = px.world.curl(&[
        "--connect-to",
        "api.example.com:443:198.51.100.7:443",
        "https://api.example.com/",
    ]);
    assert!(out.ok().contains("local=192.0.2.10:443"), "{out:?}");
    let l = px.next_line();
    assert_log(
        &l,
        &[("dst", "198.51.100.7:443"), ("upstream", "192.0.2.10:443")],
    );
    // DNS, wildcard: dialling 203.0.113.5 presenting a.files.example.com reaches 192.0.2.11.
    let out = px.world.curl(&[
        "--connect-to",
        "a.files.example.com:443:203.0.113.5:443",
        "https://a.files.example.com/",
    ]);
    assert!(out.ok().contains("local=192.0.2.11:443"), "{out:?}");
    let l = px.next_line();
    assert_eq!(l["upstream"], "192.0.2.11:443", "{l}");
    // HTTP, the same with Host: dialling 198.51.100.7:80 naming api.example.com.
    let out = px.world.curl(&[
        "--connect-to",
        "api.example.com:80:198.51.100.7:80",
        "http://api.example.com/",
    ]);
    assert!(out.ok().contains("local=192.0.2.10:80"), "{out:?}");
    let l = px.next_line();
    assert_eq!(l["upstream"], "192.0.2.10:80", "{l}");

    let accepts_before = px.world.upstream_accepts().len();
    // addresses, exact: other.example.net is pinned to 198.51.100.7.
    expect_alert(
        &px,
        addr::API_V4,
        &golden.clone().sni(&["other.example.net"]).bytes(),
    );
    let l = px.next_line();
    assert_log(
        &l,
        &[
            ("reason", "address_mismatch"),
            ("name", "other.example.net"),
        ],
    );
    // addresses, wildcard: *.pinned.example is pinned to 198.51.100.7 too.
    expect_alert(
        &px,
        addr::API_V4,
        &golden.clone().sni(&["x.pinned.example"]).bytes(),
    );
    let l = px.next_line();
    assert_eq!(l["reason"], "address_mismatch", "{l}");
    assert_eq!(
        px.world.upstream_accepts().len(),
        accepts_before,
        "a spoofed flow reached an upstream"
    );
    // ... and at the pinned address both are allowed, to that address.
    for name in ["other.example.net", "x.pinned.example"] {
        expect_server_hello(&px, addr::OTHER_V4, &golden.clone().sni(&[name]).bytes());
        let l = px.next_line();
        assert_log(
            &l,
            &[("decision", "allow"), ("upstream", "198.51.100.7:443")],
        );
    }
    // A wildcard never matches its bare suffix.
    expect_alert(
        &px,
        addr::OTHER_V4,
        &golden.clone().sni(&["pinned.example"]).bytes(),
    );
    let l = px.next_line();
    assert_eq!(l["reason"], "not_in_registry", "{l}");
}

// ------------------------------------------------------------------------------ names in HTTP

fn http_exchange(px: &Px, ip: std::net::IpAddr, request: &[u8]) -> String {
    let mut s = px.connect(ip, port::HTTP);
    s.write_all(request).unwrap();
    let (got, _) = read_all(&mut s);
    String::from_utf8_lossy(&got).into_owned()
}

/// Request heads that could show the proxy one name and the upstream another are refused;
/// a Host with a port is an ordinary Host.
#[test]
fn http_host_shapes() {
    let mut px = Px::start("", &proxy_section("5s", ""), REGISTRY);
    let refused: &[(&str, &[u8])] = &[
        (
            "duplicate Host",
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
        ),
        (
            "obsolete line folding",
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-A: 1\r\n Host: evil.example.net\r\nConnection: close\r\n\r\n",
        ),
        (
            "absolute-form naming another host",
            b"GET http://evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        ),
        (
            "absolute-form hiding another host behind a backslash",
            b"GET http://evil.example.net\\@api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        ),
        (
            "absolute-form without slashes",
            b"GET http:evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        ),
        (
            "no Host",
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
    ];
    for (what, req) in refused {
        let text = http_exchange(&px, addr::API_V4, req);
        assert!(text.starts_with("HTTP/1.1 403 Forbidden"), "{what}: {text}");
        assert!(text.contains("denied: malformed"), "{what}: {text}");
        let l = px.next_line();
        assert_eq!(
            (
                l["decision"].as_str(),
                l["reason"].as_str(),
                l["protocol"].as_str()
            ),
            (Some("deny"), Some("malformed"), Some("http")),
            "{what}: {l}"
        );
    }
    assert!(
        px.world.upstream_accepts().is_empty(),
        "a refused request reached an upstream"
    );

    // A port in Host, upper case, absolute-form naming the same host: allowed.
    for req in [
        &b"GET / HTTP/1.1\r\nHost: api.example.com:80\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: API.Example.COM\r\nConnection: close\r\n\r\n",
        b"GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    ] {
        let text = http_exchange(&px, addr::API_V4, req);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        let l = px.next_line();
        assert_log(&l, &[("decision", "allow"), ("name", "api.example.com")]);
    }

    // An IP literal as Host is no name: it matches no host (here, the address of an allowed
    // name), and /denied lists the flow by address.
    for host in ["192.0.2.10", "192.0.2.10:80", "[2001:db8::10]"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let text = http_exchange(&px, addr::API_V4, req.as_bytes());
        assert!(text.starts_with("HTTP/1.1 403 Forbidden"), "{host}: {text}");
        let l = px.next_line();
        assert_eq!(
            (l["decision"].as_str(), l["reason"].as_str()),
            (Some("deny"), Some("not_in_registry")),
            "{host}: {l}"
        );
        assert!(l["name"].is_null(), "{host}: {l}");
    }
    let denied = px.admin("/denied");
    assert!(!denied.contains("\"name\": \"192.0.2.10\""), "{denied}");

    // Origin-form targets with empty segments stay legal (RFC 9112 §3.2.1: an absolute path
    // may hold empty segments; naive URL joins produce them). They cannot move the
    // connection: the upstream is chosen from Host alone, so even a target that reads like a
    // scheme-relative URL (`//evil.example.net/x`) is a path on the allowed host's address.
    for req in [
        &b"GET //x/y HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"[..],
        b"GET //evil.example.net/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    ] {
        let text = http_exchange(&px, addr::API_V4, req);
        assert!(
            text.starts_with("HTTP/1.1 200 OK")
                && text.contains("http ok host=api.example.com local=192.0.2.10:80"),
            "{text}"
        );
        let l = px.next_line();
        assert_log(
            &l,
            &[
                ("decision", "allow"),
                ("name", "api.example.com"),
                ("upstream", "192.0.2.10:80"),
            ],
        );
    }
}

/// HTTP keep-alive: portcullis inspects only the first request head of a connection (as
/// Envoy's tls_inspector / original-destination passthrough do); a second request on the same
/// connection naming another Host reaches the same upstream connection uninspected. The upstream
/// connection is the one decided for the first name, so the second request goes to the host
/// the first name resolved to, never to an address of the client's choosing. SECURITY.md
/// documents this limit.
#[test]
fn http_keep_alive_second_request_is_not_inspected() {
    let mut px = Px::start("", &proxy_section("5s", ""), REGISTRY);
    let mut s = px.connect(addr::API_V4, port::HTTP);
    s.write_all(b"GET /first HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .unwrap();
    let first = read_http_response(&mut s);
    assert!(first.contains("host=api.example.com"), "{first}");
    s.write_all(b"GET /second HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (rest, _) = read_all(&mut s);
    drop(s);
    let second = String::from_utf8_lossy(&rest);
    // Passed through: the upstream (192.0.2.10) saw the second Host.
    assert!(
        second.contains("http ok host=evil.example.net local=192.0.2.10:80"),
        "{second}"
    );
    let log = px.log(1);
    assert_eq!(log.len(), 1, "one flow, one line: {log:?}");
    assert_eq!(
        (log[0]["decision"].as_str(), log[0]["name"].as_str()),
        (Some("allow"), Some("api.example.com")),
        "{}",
        log[0]
    );
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_http_response(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF in a response head");
        buf.push(b[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

// ------------------------------------------------------------------------------ policy edges

/// Audit mode lets what would be denied through, but a connection made straight to the
/// listener is a loop: denied, never passed to anything.
#[test]
fn audit_mode_direct_connection_is_a_loop() {
    let mut px = Px::start("audit = true", &proxy_section("5s", ""), REGISTRY);
    for target in ["127.0.0.1:15001", "[::1]:15001"] {
        let Ok(mut s) = px.world.pod_connect(target.parse().unwrap()) else {
            continue; // a reset may already show in connect
        };
        let _ = s.write_all(&Hello::golden().sni(&["evil.example.net"]).bytes());
        let (got, r) = read_all(&mut s);
        assert!(got.is_empty(), "{got:?}");
        assert!(r.is_ok() || was_reset(&r), "{r:?}");
    }
    let log = px.log(2);
    for l in &log {
        assert_log(l, &[("decision", "deny"), ("reason", "loop")]);
        assert!(l["upstream"].is_null(), "{l}");
    }
    assert!(px.world.upstream_accepts().is_empty(), "a loop was passed");
    // The same name through the redirect is audited and passed.
    expect_server_hello(
        &px,
        addr::API_V4,
        &Hello::golden().sni(&["evil.example.net"]).bytes(),
    );
    let l = px.nth(3);
    assert_log(&l, &[("decision", "audit"), ("reason", "not_in_registry")]);
}

/// Past max_connections new flows are reset at once and counted (reason overload); once the
/// hogs leave, flows are served as before.
#[test]
fn a_flood_past_max_connections() {
    raise_nofile();
    const MAX: usize = 50;
    const FLOOD: usize = 200;
    let mut px = Px::start(
        "",
        &proxy_section("30s", &format!("max_connections = {MAX}")),
        REGISTRY,
    );
    let half = Hello::golden().sni(&["api.example.com"]).bytes()[..100].to_vec();
    let mut hogs = connect_many(&px.world.pod, sa(addr::API_V4, port::TLS), MAX);
    for h in &mut hogs {
        h.write_all(&half).unwrap();
    }
    assert!(
        poll_until(Duration::from_secs(20), || metric(
            &px.metrics(),
            "portcullis_active_connections",
            &[]
        ) == MAX as f64),
        "the hogs were not all taken"
    );
    let flood = try_connect_many(&px.world.pod, sa(addr::API_V4, port::TLS), FLOOD);
    for (i, f) in flood.into_iter().enumerate() {
        let mut f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => continue,
            Err(e) => panic!("flood client {i}: {e}"),
        };
        let _ = f.write_all(&half);
        let (got, r) = read_all(&mut f);
        assert!(got.is_empty(), "flood client {i} got {got:?}");
        assert!(r.is_ok() || was_reset(&r), "flood client {i}: {r:?}");
    }
    let overload = |px: &Px| {
        metric(
            &px.metrics(),
            "portcullis_connections_total",
            &[("reason", "overload")],
        )
    };
    assert_eq!(overload(&px), FLOOD as f64);
    let log = px.log(FLOOD);
    assert!(
        log.iter()
            .all(|l| l["reason"] == "overload" && l["decision"] == "deny"),
        "{:?}",
        log.iter().find(|l| l["reason"] != "overload")
    );
    // A flow past the limit was never let through.
    assert!(px.world.upstream_accepts().is_empty());

    // The hogs leave (their half hellos end in EOF: malformed); normal flows work again.
    drop(hogs);
    assert!(
        poll_until(Duration::from_secs(20), || metric(
            &px.metrics(),
            "portcullis_active_connections",
            &[]
        ) == 0.0),
        "the hogs' flows did not end"
    );
    for _ in 0..3 {
        let out = px.world.curl(&["-4", "https://api.example.com/"]);
        assert!(out.ok().contains("tls ok"), "{out:?}");
        let out = px.world.curl(&["-4", "http://api.example.com/"]);
        assert!(out.ok().contains("http ok"), "{out:?}");
    }
    assert_eq!(
        overload(&px),
        FLOOD as f64,
        "normal flows counted as overload"
    );
}

// ------------------------------------------------------------------------------ broken peers

/// An allowed upstream that refuses, and one that never answers (203.0.113.99 drops
/// everything): TLS and opaque clients get an RST, HTTP clients a 502; the log says
/// connect_refused / connect_timeout.
#[test]
fn upstream_refuses_or_never_answers() {
    let entries = r#"
[[service_entry]]
name = "blackhole"
hosts = ["blackhole.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }]

[[service_entry]]
name = "blackhole-tcp"
addresses = ["203.0.113.99/32"]
ports = [{ number = 7000, protocol = "TCP" }]

[[service_entry]]
name = "closed"
hosts = ["api.example.com"]
addresses = ["192.0.2.10/32"]
resolution = "NONE"
ports = [{ number = 9, protocol = "TLS" }, { number = 8081, protocol = "HTTP" }]

[[service_entry]]
name = "closed-tcp"
addresses = ["198.51.100.7/32"]
ports = [{ number = 9, protocol = "TCP" }]
"#;
    let mut px = Px::start("", &proxy_section("5s", ""), entries);
    let golden = Hello::golden();
    let expect = |px: &mut Px, error: &str, entry: &str| {
        let l = px.next_line();
        assert_eq!(
            (
                l["decision"].as_str(),
                l["error"].as_str(),
                l["entry"].as_str()
            ),
            (Some("allow"), Some(error), Some(entry)),
            "{l}"
        );
    };

    // Never answers.
    let hello = golden.clone().sni(&["blackhole.example.com"]).bytes();
    expect_reset_for(&px, addr::BLACKHOLE_V4, port::TLS, &hello);
    expect(&mut px, "connect_timeout", "blackhole");
    let text = http_exchange(
        &px,
        addr::BLACKHOLE_V4,
        b"GET / HTTP/1.1\r\nHost: blackhole.example.com\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway"), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    expect(&mut px, "connect_timeout", "blackhole");
    expect_reset_for(&px, addr::BLACKHOLE_V4, port::ECHO, b"");
    expect(&mut px, "connect_timeout", "blackhole-tcp");

    // Refuses.
    let hello = golden.clone().sni(&["api.example.com"]).bytes();
    expect_reset_for(&px, addr::API_V4, port::CLOSED, &hello);
    expect(&mut px, "connect_refused", "closed");
    let mut s = px.connect(addr::API_V4, 8081);
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .unwrap();
    let (got, _) = read_all(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway"), "{text}");
    expect(&mut px, "connect_refused", "closed");
    expect_reset_for(&px, addr::OTHER_V4, port::CLOSED, b"");
    expect(&mut px, "connect_refused", "closed-tcp");

    let m = px.metrics();
    for (entry, want) in [
        ("blackhole", 2.0),
        ("blackhole-tcp", 1.0),
        ("closed", 2.0),
        ("closed-tcp", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                "portcullis_upstream_connect_errors_total",
                &[("entry", entry)]
            ),
            want,
            "{entry}"
        );
    }
}

/// A reset in the middle of a relayed flow reaches the other side as a reset, and the log says
/// which side did it.
#[test]
fn resets_mid_stream_name_the_side() {
    let mut px = Px::start("", &proxy_section("5s", ""), REGISTRY);

    // The upstream (port 7003) reads once, then resets.
    let mut s = px.connect(addr::OTHER_V4, port::RESET);
    s.write_all(b"hello\n").unwrap();
    expect_reset(&mut s);
    let l = px.nth(1);
    assert_log(&l, &[("decision", "allow"), ("error", "upstream_reset")]);
    assert_eq!(l["bytes_up"], 6, "{l}");

    // The client resets an echo flow after one exchange: how curl and browsers often end
    // TLS. Not a failure: `error` stays null, `reset_by` says who reset.
    let mut s = px.connect(addr::OTHER_V4, port::ECHO);
    s.write_all(b"ping\n").unwrap();
    assert_eq!(
        read_line(&mut s, Duration::from_secs(10)).unwrap(),
        "ping\n"
    );
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let l = px.nth(2);
    assert_eq!(
        (
            l["decision"].as_str(),
            l["error"].as_str(),
            l["reset_by"].as_str()
        ),
        (Some("allow"), None, Some("client")),
        "{l}"
    );
    assert_eq!(
        (l["bytes_up"].as_u64(), l["bytes_down"].as_u64()),
        (Some(5), Some(5)),
        "{l}"
    );

    // A client that resets before anything came back did not get what it came for.
    let s = px.connect(addr::OTHER_V4, port::ECHO);
    std::thread::sleep(Duration::from_millis(200));
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let l = px.nth(3);
    assert_log(&l, &[("decision", "allow"), ("error", "client_reset")]);
    assert!(l.get("reset_by").is_none(), "{l}");
}

// ------------------------------------------------------------------------------ the workload's privileges

/// Why SECURITY.md says the workload must run without CAP_NET_ADMIN and CAP_NET_RAW: with
/// either one, a process may set SO_MARK (Linux 5.17+ for NET_RAW) and the proxy's mark
/// exclusion lets its traffic out unseen. Without them it cannot, and its traffic is decided.
/// The rules here are the real ones of `portcullis init`.
#[test]
fn a_workload_with_net_raw_or_net_admin_can_escape_by_mark_without_them_it_cannot() {
    let world = World::start();
    let cfg = world.write_file(
        "config.toml",
        &format!("{}\nmark = 0x539\n{REGISTRY}", proxy_section("5s", "")),
    );
    world.init(&cfg);
    let mut proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
    // As the application's uid, try to mark a socket, then talk to 192.0.2.10:7000 (an echo
    // service that no entry allows).
    const SCRIPT: &str = r#"
import socket
s = socket.socket()
try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
    print("mark=ok")
except PermissionError:
    print("mark=EPERM")
s.settimeout(10)
s.connect(("192.0.2.10", 7000))
try:
    s.sendall(b"ping\n")
    print("got=%r" % s.recv(100))
except ConnectionResetError:
    print("got=reset")
"#;
    let app = |caps: Option<&str>| {
        let mut args = vec![
            format!("--reuid={APP_UID}"),
            format!("--regid={APP_UID}"),
            "--clear-groups".to_string(),
        ];
        if let Some(c) = caps {
            args.push(format!("--inh-caps=+{c}"));
            args.push(format!("--ambient-caps=+{c}"));
        }
        args.extend(["--", "/usr/bin/python3", "-c", SCRIPT].map(String::from));
        let out = world.run_pod(
            Cmd::new("setpriv")
                .args(args)
                .timeout(Duration::from_secs(30)),
        );
        out.ok().to_string()
    };
    let plain = app(None);
    assert!(plain.contains("mark=EPERM"), "{plain}");
    assert!(
        plain.contains("got=reset") || plain.contains("got=b''"),
        "an unprivileged workload got through: {plain}"
    );
    for cap in ["net_raw", "net_admin"] {
        let out = app(Some(cap));
        assert!(out.contains("mark=ok"), "{cap}: {out}");
        assert!(
            out.contains("got=b'ping\\n'"),
            "{cap}: the marked flow should have escaped the redirect: {out}"
        );
    }
    // Only the unprivileged attempt reached the proxy (denied); the marked ones never did.
    proxy.wait_stdout_lines(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = proxy.stdout().lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_log(&l, &[("decision", "deny"), ("dst", "192.0.2.10:7000")]);
}
