//! A bounded soak (issue 7): many thousands of mixed flows through one proxy (allowed TLS, HTTP
//! and TCP, bulk transfers, denials of every kind, resets from either side, hello and connect
//! timeouts), after which the proxy holds no more file descriptors and no more memory than
//! after a warm-up with the same mix.
//!
//! Runs `PORTCULLIS_SOAK_SECS` seconds (default 60; keep it within a few minutes in CI).
//!
//! Tolerances, measured once the proxy is idle again (no active flows):
//! - open fds: at most `FD_SLACK` above the warm-up figure. The pipe pool may keep up to
//!   16 idle pipe pairs (32 fds) whatever the load, and the resolver may hold a socket or two; a
//!   leak of one fd per thousand flows would exceed it.
//! - resident memory: at most `RSS_SLACK_MIB` MiB above the warm-up figure. The allocator keeps
//!   some freed memory for reuse, so RSS never returns exactly; a leak of a few hundred bytes
//!   per flow over the soak's flows would exceed it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const FD_SLACK: usize = 40;
const RSS_SLACK_MIB: u64 = 24;

/// The proxy's config: short timeouts, an idle timeout, then [`ENTRIES`].
fn config() -> String {
    let proxy = "hello_timeout = \"1s\"\nconnect_timeout = \"1s\"\nidle_timeout = \"30s\"";
    proxy_config("", proxy, ENTRIES)
}

const ENTRIES: &str = concat!(
    api_entry!(),
    r#"
[[service_entry]]
name = "blackhole"
hosts = ["blackhole.example.com"]
ports = [{ number = 443, protocol = "TLS" }]

[[service_entry]]
name = "backend"
addresses = ["198.51.100.7/32"]
ports = [{ number = 7000, protocol = "TCP" }, { number = 7003, protocol = "TCP" }, { number = 9000, protocol = "TCP" }]
"#
);

/// The kinds of flow in the mix; each must end the way it should.
#[derive(Clone, Copy, Debug)]
enum Kind {
    TlsAllowed,
    TlsDenied,
    HttpAllowed,
    HttpDenied,
    TcpEcho,
    TcpDenied,
    Bulk,
    UpstreamReset,
    ClientReset,
    Garbage,
}

const FAST: [Kind; 10] = [
    Kind::TlsAllowed,
    Kind::TlsDenied,
    Kind::HttpAllowed,
    Kind::HttpDenied,
    Kind::TcpEcho,
    Kind::TcpDenied,
    Kind::Bulk,
    Kind::UpstreamReset,
    Kind::ClientReset,
    Kind::Garbage,
];

/// The golden OpenSSL hello presents api.example.com; the same bytes with another name of the
/// same length are a hello for a name no entry lists.
fn hellos() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let allowed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hellos/openssl-s_client.bin"
    ))
    .unwrap();
    let with = |name: &[u8]| {
        let at = allowed
            .windows(15)
            .position(|w| w == b"api.example.com")
            .expect("the golden hello names api.example.com");
        assert_eq!(name.len(), 15);
        let mut h = allowed.clone();
        h[at..at + 15].copy_from_slice(name);
        h
    };
    let denied = with(b"bad.example.org");
    // blackhole.example.com is longer: the connect-timeout flows use a hello built for it.
    let mut bh = allowed.clone();
    let at = bh
        .windows(15)
        .position(|w| w == b"api.example.com")
        .unwrap();
    let name = b"blackhole.example.com";
    let grow = name.len() - 15;
    bh.splice(at..at + 15, name.iter().copied());
    // Fix the five length fields that enclose the name: host_name, server_name list, extension,
    // extension block, handshake body, record.
    let bump16 = |b: &mut Vec<u8>, i: usize| {
        let v = u16::from_be_bytes([b[i], b[i + 1]]) as usize + grow;
        b[i..i + 2].copy_from_slice(&(v as u16).to_be_bytes());
    };
    bump16(&mut bh, at - 2); // host_name length
    bump16(&mut bh, at - 5); // server_name list length
    bump16(&mut bh, at - 7); // extension data length
    bump16(&mut bh, 3); // record length
    let body = u32::from_be_bytes([0, bh[6], bh[7], bh[8]]) as usize + grow;
    bh[6..9].copy_from_slice(&(body as u32).to_be_bytes()[1..]);
    // The extension block length sits right after the compression methods.
    let mut at_ext = 9 + 2 + 32;
    at_ext += 1 + bh[at_ext] as usize;
    at_ext += 2 + u16::from_be_bytes([bh[at_ext], bh[at_ext + 1]]) as usize;
    at_ext += 1 + bh[at_ext] as usize;
    bump16(&mut bh, at_ext);
    for (h, want) in [
        (&allowed, "api.example.com"),
        (&denied, "bad.example.org"),
        (&bh, "blackhole.example.com"),
    ] {
        match portcullis::detect::Detector::new().push(h) {
            portcullis::detect::Step::Done(d) => assert_eq!(d.name.as_deref(), Some(want)),
            other => panic!("{want}: {other:?}"),
        }
    }
    (allowed, denied, bh)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn connect(dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.set_write_timeout(Some(Duration::from_secs(15)))?;
    Ok(s)
}

fn read_end(s: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Err(e)),
        }
    }
}

fn is_reset(r: &std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionReset)
}

const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];
const API: IpAddr = addr::API_V4;
const BACKEND: IpAddr = addr::OTHER_V4;

/// Flows allowed to fail: none. (Until issue 16 the loop guard reset about 1 in 10,000 when
/// NAT moved a client's source port onto one of the proxy's upstream sockets; README "Loops".)
fn rare_resets(_flows: u64) -> usize {
    0
}

/// Runs one flow of `kind`; `Err` says how it went wrong.
fn flow(kind: Kind, hellos: &(Vec<u8>, Vec<u8>, Vec<u8>), i: u64) -> Result<(), String> {
    let e = |what: &'static str| move |err: std::io::Error| format!("{kind:?}: {what}: {err}");
    match kind {
        Kind::TlsAllowed => {
            let mut s = connect(sa(API, port::TLS)).map_err(e("connect"))?;
            s.write_all(&hellos.0).map_err(e("write"))?;
            let mut head = [0u8; 5];
            s.read_exact(&mut head).map_err(e("read"))?;
            (head[0] == 0x16)
                .then_some(())
                .ok_or(format!("{kind:?}: got {head:?}"))
        }
        Kind::TlsDenied => {
            let mut s = connect(sa(API, port::TLS)).map_err(e("connect"))?;
            s.write_all(&hellos.1).map_err(e("write"))?;
            let (got, _) = read_end(&mut s);
            (got == ALERT)
                .then_some(())
                .ok_or(format!("{kind:?}: got {got:?}"))
        }
        Kind::HttpAllowed | Kind::HttpDenied => {
            let host = match kind {
                Kind::HttpAllowed => "api.example.com",
                _ => "bad.example.org",
            };
            let mut s = connect(sa(API, port::HTTP)).map_err(e("connect"))?;
            let req = format!("GET /{i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).map_err(e("write"))?;
            let (got, r) = read_end(&mut s);
            r.map_err(e("read"))?;
            let want = match kind {
                Kind::HttpAllowed => "HTTP/1.1 200 OK",
                _ => "HTTP/1.1 403 Forbidden",
            };
            got.starts_with(want.as_bytes())
                .then_some(())
                .ok_or(format!("{kind:?}: {}", String::from_utf8_lossy(&got)))
        }
        Kind::TcpEcho => {
            let mut s = connect(sa(BACKEND, port::ECHO)).map_err(e("connect"))?;
            let data = pattern(i, 4096);
            s.write_all(&data).map_err(e("write"))?;
            s.shutdown(std::net::Shutdown::Write)
                .map_err(e("shutdown"))?;
            let (got, r) = read_end(&mut s);
            r.map_err(e("read"))?;
            (got == data)
                .then_some(())
                .ok_or(format!("{kind:?}: echoed {} bytes", got.len()))
        }
        Kind::TcpDenied => {
            // No entry for 192.0.2.10:7000: an RST (perhaps already in connect).
            let mut s = match connect(sa(API, port::ECHO)) {
                Ok(s) => s,
                Err(err) if err.kind() == ErrorKind::ConnectionReset => return Ok(()),
                Err(err) => return Err(format!("{kind:?}: connect: {err}")),
            };
            let _ = s.write_all(b"hello\n");
            let (got, r) = read_end(&mut s);
            (got.is_empty() && (r.is_ok() || is_reset(&r)))
                .then_some(())
                .ok_or(format!("{kind:?}: {got:?} {r:?}"))
        }
        Kind::Bulk => {
            let mut s = connect(sa(BACKEND, port::BULK)).map_err(e("connect"))?;
            if i.is_multiple_of(2) {
                bulk_download(&mut s, 1 << 20).map_err(e("download"))
            } else {
                bulk_upload(&mut s, 1 << 20).map_err(e("upload"))
            }
        }
        Kind::UpstreamReset => {
            let mut s = connect(sa(BACKEND, port::RESET)).map_err(e("connect"))?;
            s.write_all(b"hello\n").map_err(e("write"))?;
            let (_, r) = read_end(&mut s);
            is_reset(&r).then_some(()).ok_or(format!("{kind:?}: {r:?}"))
        }
        Kind::ClientReset => {
            let mut s = connect(sa(BACKEND, port::ECHO)).map_err(e("connect"))?;
            s.write_all(b"ping\n").map_err(e("write"))?;
            let mut got = [0u8; 5];
            s.read_exact(&mut got).map_err(e("read"))?;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .map_err(e("linger"))?;
            Ok(())
        }
        Kind::Garbage => {
            let mut s = connect(sa(API, port::TLS)).map_err(e("connect"))?;
            let mut g = pattern(i * 7919, 512);
            g[0] = 0x16;
            g[1] = 0x03;
            g[2] = 0x01;
            let _ = s.write_all(&g);
            let (_, r) = read_end(&mut s);
            (r.is_ok() || is_reset(&r))
                .then_some(())
                .ok_or(format!("{kind:?}: {r:?}"))
        }
    }
}

/// Slow flows: a client that never speaks (hello timeout) and an allowed name whose upstream
/// never answers (connect timeout).
fn slow_flow(i: u64, hellos: &(Vec<u8>, Vec<u8>, Vec<u8>)) -> Result<(), String> {
    if i.is_multiple_of(2) {
        let mut s = connect(sa(API, port::TLS)).map_err(|e| format!("silent: {e}"))?;
        let (got, r) = read_end(&mut s);
        (got.is_empty() && (r.is_ok() || is_reset(&r)))
            .then_some(())
            .ok_or(format!("silent: {got:?} {r:?}"))
    } else {
        let mut s = match connect(sa(addr::BLACKHOLE_V4, port::TLS)) {
            Ok(s) => s,
            Err(e) => return Err(format!("blackhole: connect: {e}")),
        };
        let _ = s.write_all(&hellos.2);
        let (got, r) = read_end(&mut s);
        (got.is_empty() && is_reset(&r))
            .then_some(())
            .ok_or(format!("blackhole: {got:?} {r:?}"))
    }
}

struct Tally {
    flows: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// Runs the mix for `secs` seconds on `workers` fast threads and `slow` slow ones, all inside
/// the pod namespace.
fn run_mix(
    pod: &str,
    secs: f64,
    workers: usize,
    slow: usize,
    hellos: &(Vec<u8>, Vec<u8>, Vec<u8>),
) -> (u64, Vec<String>) {
    let tally = Tally {
        flows: AtomicU64::new(0),
        failures: std::sync::Mutex::new(Vec::new()),
    };
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    in_ns(pod, || {
        std::thread::scope(|s| {
            for w in 0..workers {
                let (tally, stop) = (&tally, &stop);
                s.spawn(move || {
                    let mut i = w as u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let kind = FAST[(i as usize) % FAST.len()];
                        if let Err(f) = flow(kind, hellos, i) {
                            tally.failures.lock().unwrap().push(f);
                        }
                        tally.flows.fetch_add(1, Ordering::Relaxed);
                        i += workers as u64;
                    }
                });
            }
            for w in 0..slow {
                let tally = &tally;
                s.spawn(move || {
                    let mut i = w as u64;
                    while Instant::now() < deadline {
                        if let Err(f) = slow_flow(i, hellos) {
                            tally.failures.lock().unwrap().push(f);
                        }
                        tally.flows.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                });
            }
        });
    });
    let failures = tally.failures.into_inner().unwrap();
    (tally.flows.load(Ordering::Relaxed), failures)
}

#[test]
fn soak_mixed_flows_leave_no_fds_or_memory_behind() {
    let secs: f64 = std::env::var("PORTCULLIS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let world = World::start();
    world.redirect(15001, Some(PROXY_UID));
    let cfg = world.write_file("config.toml", &config());
    let mut proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
    world.wait_tcp(&world.pod, "127.0.0.1:15000".parse().unwrap());
    let pid = proxy.pid();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim(),
        "portcullis"
    );
    let metrics = || {
        world
            .curl(&["http://127.0.0.1:15000/metrics"])
            .ok()
            .to_string()
    };
    let idle = || {
        poll_until(Duration::from_secs(30), || {
            metric(&metrics(), "portcullis_active_connections") == 0.0
        })
    };
    let hellos = hellos();
    const WORKERS: usize = 6;
    const SLOW: usize = 4;

    // Warm-up: the same mix, so that pools, caches and the allocator reach their working size.
    let warm_secs = (secs / 6.0).clamp(3.0, 15.0);
    let (warm, failures) = run_mix(&world.pod, warm_secs, WORKERS, SLOW, &hellos);
    assert!(
        failures.len() <= rare_resets(warm),
        "warm-up: {} of {warm} flows went wrong: {failures:?}",
        failures.len()
    );
    assert!(idle(), "flows still open after the warm-up");
    std::thread::sleep(Duration::from_millis(500));
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));

    let t = Instant::now();
    let (flows, failures) = run_mix(&world.pod, secs, WORKERS, SLOW, &hellos);
    let took = t.elapsed();
    // A real TLS client too, after all that.
    let out = world.curl(&["-4", "https://api.example.com/"]);
    assert!(out.ok().contains("tls ok"), "{out:?}");
    assert!(idle(), "flows still open after the soak");
    std::thread::sleep(Duration::from_millis(500));
    let (fds1, rss1) = (fd_count(pid), rss_kib(pid));
    eprintln!(
        "soak: {flows} flows in {took:.1?} after {warm} warm-up flows; fds {fds0} -> {fds1}, \
         VmRSS {rss0} -> {rss1} KiB"
    );
    if !failures.is_empty() {
        eprintln!(
            "soak: {} of {flows} flows went wrong: {failures:?}",
            failures.len()
        );
    }
    assert!(
        failures.len() <= rare_resets(flows),
        "{} of {flows} flows went wrong, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        flows >= 1000,
        "only {flows} flows in {took:?}: the soak proves little"
    );
    assert!(
        fds1 <= fds0 + FD_SLACK,
        "open fds grew from {fds0} to {fds1} over {flows} flows"
    );
    assert!(
        rss1 <= rss0 + RSS_SLACK_MIB * 1024,
        "VmRSS grew from {rss0} to {rss1} KiB over {flows} flows"
    );
    let m = metrics();
    assert_eq!(metric(&m, "portcullis_access_log_dropped_total"), 0.0);
    // Every flow the proxy saw has its one log line.
    let lines = proxy.stdout().lines().count() as u64;
    assert!(
        lines >= warm + flows,
        "{lines} log lines for {} flows",
        warm + flows + 1
    );
    proxy.kill();
}
