//! pcbench: the benchmark's own clients, upstream servers and a tokio-splice relay.
//!
//! Bench-only (not part of portcullis' build). Subcommands, options as `--key value`:
//!
//! - `serve --tls ADDR[,ADDR] --http ADDR[,ADDR] --hold ADDR[,ADDR]`: the upstreams.
//!   tls: reads one whole ClientHello (all its records), answers a small fixed TLS record, closes.
//!   http: reads one request head, answers `200` with a 2-byte body and `Connection: close`, closes.
//!   hold: reads the client's first bytes, answers as many, then waits for EOF (idle flows).
//!   tls-hold: reads one whole ClientHello, answers the small TLS record, then waits for EOF
//!   (TLS flows left idle after their handshake).
//! - `churn --target ADDR (--hello FILE | --http-host HOST) --concurrency N --duration S
//!   [--warmup S]`: short flows (connect, send, first answer byte, read to EOF, close) as fast as
//!   `N` workers go; prints one JSON object: flows per second and percentiles of the time from
//!   connect() to the first answer byte.
//! - `hold --target ADDR --count N [--parallel P] [--hello FILE]`: opens N flows, exchanges
//!   first bytes both ways on each (with `--hello`: sends that ClientHello and reads the
//!   `tls-hold` server's answer), prints one JSON line once all are established, then holds them
//!   silent until killed.
//! - `splice-relay --listen ADDR`: a transparent relay (SO_ORIGINAL_DST, no detection) built on
//!   `tokio_splice::zero_copy_bidirectional`, to compare relays on the same flows.
//!
//! - `probe --target ADDR (--hello FILE | --http-host HOST)`: one flow; prints `upstream` when
//!   the answer is the upstream's (the proxy let it through), else `denied` (an alert, a 403, a
//!   reset, a close). The policy check of every target.
//!
//! Common: `--threads N` (tokio worker threads, default 2); clients take `--bind IP` (source
//! address; the benchmark gives every measurement a fresh one, see bench/README.md).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .unwrap_or_else(|| die(&format!("unexpected argument {k:?}")));
            let v = it
                .next()
                .unwrap_or_else(|| die(&format!("--{key} needs a value")));
            m.insert(key.to_string(), v.clone());
        }
        Opts(m)
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn req(&self, k: &str) -> &str {
        self.get(k)
            .unwrap_or_else(|| die(&format!("--{k} is required")))
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.get(k) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{k}: bad number {v:?}"))),
        }
    }
    fn addrs(&self, k: &str) -> Vec<SocketAddr> {
        self.get(k)
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse()
                            .unwrap_or_else(|_| die(&format!("--{k}: bad address {s:?}")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn die(msg: &str) -> ! {
    eprintln!("pcbench: {msg}");
    std::process::exit(2)
}

/// Soft RLIMIT_NOFILE up to the hard limit (20,000 here).
fn raise_nofile() {
    // SAFETY: plain syscalls on a local struct.
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().cloned() else {
        die("usage: pcbench serve|churn|hold|splice-relay [--key value ...]")
    };
    let opts = Opts::parse(&args[1..]);
    raise_nofile();
    let threads = opts.num("threads", 2usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cmd.as_str() {
        "serve" => rt.block_on(serve(opts)),
        "churn" => rt.block_on(churn(opts)),
        "hold" => rt.block_on(hold(opts)),
        "splice-relay" => rt.block_on(splice_relay(opts)),
        "probe" => rt.block_on(probe(opts)),
        other => die(&format!("unknown subcommand {other:?}")),
    }
}

fn listen(addr: SocketAddr) -> TcpListener {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    sock.bind(&addr.into())
        .unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    sock.listen(4096).expect("listen");
    TcpListener::from_std(std::net::TcpListener::from(sock)).expect("tokio listener")
}

/// Connects to `target` from `bind` (source address, any port) when given.
async fn connect_from(bind: Option<std::net::IpAddr>, target: SocketAddr) -> io::Result<TcpStream> {
    let fut = async {
        match bind {
            None => TcpStream::connect(target).await,
            Some(ip) => {
                let sock = if target.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(target).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

fn bind_of(opts: &Opts) -> Option<std::net::IpAddr> {
    opts.get("bind")
        .map(|v| v.parse().unwrap_or_else(|_| die("--bind: bad IP address")))
}

// ---------------------------------------------------------------------------------------------
// Upstream servers

#[derive(Clone, Copy)]
enum Kind {
    Tls,
    Http,
    Hold,
    TlsHold,
}

async fn serve(opts: Opts) {
    let mut n = 0;
    for (key, kind) in [
        ("tls", Kind::Tls),
        ("http", Kind::Http),
        ("hold", Kind::Hold),
        ("tls-hold", Kind::TlsHold),
    ] {
        for addr in opts.addrs(key) {
            let l = listen(addr);
            n += 1;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(async move {
                                let _ = s.set_nodelay(true);
                                let _ = handle(kind, s).await;
                            });
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
        }
    }
    if n == 0 {
        die("serve: give --tls, --http, --hold and/or --tls-hold");
    }
    eprintln!("pcbench serve: {n} listeners up");
    std::future::pending::<()>().await;
}

/// True once `buf` holds a whole TLS handshake message (the ClientHello), over any number of
/// records; also true for bytes that are not TLS at all (answer them anyway).
fn hello_complete(buf: &[u8]) -> bool {
    if buf.first() != Some(&0x16) {
        return !buf.is_empty();
    }
    let mut hs: Vec<u8> = Vec::new();
    let mut at = 0;
    while at + 5 <= buf.len() {
        let len = u16::from_be_bytes([buf[at + 3], buf[at + 4]]) as usize;
        let end = (at + 5 + len).min(buf.len());
        hs.extend_from_slice(&buf[at + 5..end]);
        at += 5 + len;
    }
    hs.len() >= 4 && hs.len() >= 4 + (u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize)
}

/// A small answer in a TLS record (a stand-in for a ServerHello; nobody parses it).
const TLS_ANSWER: [u8; 100] = {
    let mut a = [0x5au8; 100];
    a[0] = 0x16;
    a[1] = 0x03;
    a[2] = 0x03;
    a[3] = 0x00;
    a[4] = 95;
    a
};
const HTTP_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok";

async fn handle(kind: Kind, mut s: TcpStream) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    match kind {
        Kind::Tls | Kind::Http | Kind::TlsHold => {
            loop {
                if s.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
                let done = match kind {
                    Kind::Tls | Kind::TlsHold => hello_complete(&buf),
                    _ => buf.windows(4).any(|w| w == b"\r\n\r\n"),
                };
                if done {
                    break;
                }
                if buf.len() > 256 * 1024 {
                    return Ok(());
                }
            }
            let answer: &[u8] = match kind {
                Kind::Tls | Kind::TlsHold => &TLS_ANSWER,
                _ => HTTP_ANSWER,
            };
            s.write_all(answer).await?;
            if let Kind::TlsHold = kind {
                // Silent until the client leaves.
                let mut b = [0u8; 1024];
                while s.read(&mut b).await? > 0 {}
                return Ok(());
            }
            // Close: the client reads to EOF. Every byte it sent was read, so this is a FIN.
            Ok(())
        }
        Kind::Hold => {
            let mut first = [0u8; 1024];
            let n = s.read(&mut first).await?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&first[..n]).await?;
            // Silent until the client leaves.
            while s.read(&mut first).await? > 0 {}
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Churn client

/// One flow; returns (time to first answer byte, time until the answer's EOF), both from the
/// start of connect().
async fn one_flow(
    bind: Option<std::net::IpAddr>,
    target: SocketAddr,
    payload: &[u8],
    buf: &mut [u8],
) -> io::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut s = connect_from(bind, target).await?;
    s.set_nodelay(true)?;
    s.write_all(payload).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), s.read(buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in 10s"))??;
    if first == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    let ttfb = t0.elapsed();
    while s.read(buf).await? > 0 {}
    Ok((ttfb, t0.elapsed()))
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn churn(opts: Opts) {
    let target: SocketAddr = opts
        .req("target")
        .parse()
        .unwrap_or_else(|_| die("--target: bad address"));
    let payload: Arc<[u8]> = payload_of(&opts).into();
    let bind = bind_of(&opts);
    let conc: usize = opts.num("concurrency", 1);
    let duration = Duration::from_secs_f64(opts.num("duration", 5.0));
    let warmup = Duration::from_secs_f64(opts.num("warmup", 1.0));
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop = measure_from + duration;
    let errors = Arc::new(AtomicU64::new(0));
    // Every flow that completed, warm-up included: the proxy's CPU over the whole run divided
    // by this is its CPU per flow (bench/run.sh).
    let completed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let payload = payload.clone();
        let errors = errors.clone();
        let completed = completed.clone();
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut total: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut buf = vec![0u8; 4096];
            loop {
                let t = Instant::now();
                if t >= stop {
                    break;
                }
                let r = one_flow(bind, target, &payload, &mut buf).await;
                if r.is_ok() {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
                match r {
                    Ok((d, all)) if t >= measure_from => {
                        lat.push(d.as_micros().min(u32::MAX as u128) as u32);
                        total.push(all.as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if t >= measure_from {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        {
                            let mut g = first_error.lock().unwrap();
                            if g.is_none() {
                                *g = Some(e.to_string());
                            }
                        }
                        // A failing path must not turn into a tight loop.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (lat, total)
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    let mut whole: Vec<u32> = Vec::new();
    for t in tasks {
        let (l, w) = t.await.expect("worker");
        all.extend(l);
        whole.extend(w);
    }
    whole.sort_unstable();
    // Flows that started in the window; the last ones may end a little after `stop`.
    let secs = duration.as_secs_f64();
    all.sort_unstable();
    let fe = first_error.lock().unwrap().clone();
    println!(
        "{{\"flows\":{},\"secs\":{:.3},\"rate\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"flow_p50_us\":{},\"flow_p99_us\":{},\"errors\":{},\"first_error\":{},\"all_flows\":{}}}",
        all.len(),
        secs,
        all.len() as f64 / secs,
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        all.last().copied().unwrap_or(0),
        percentile(&whole, 0.50),
        percentile(&whole, 0.99),
        errors.load(Ordering::Relaxed),
        match fe {
            Some(e) => format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "'")),
            None => "null".into(),
        },
        completed.load(Ordering::Relaxed),
    );
}

fn payload_of(opts: &Opts) -> Vec<u8> {
    match (opts.get("hello"), opts.get("http-host")) {
        (Some(f), None) => std::fs::read(f).unwrap_or_else(|e| die(&format!("--hello {f}: {e}"))),
        (None, Some(h)) => format!(
            "GET / HTTP/1.1\r\nHost: {h}\r\nUser-Agent: pcbench\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
        _ => die("give exactly one of --hello FILE and --http-host HOST"),
    }
}

async fn probe(opts: Opts) {
    let target: SocketAddr = opts
        .req("target")
        .parse()
        .unwrap_or_else(|_| die("--target: bad address"));
    let payload = payload_of(&opts);
    let bind = bind_of(&opts);
    let r: io::Result<Vec<u8>> = async {
        let mut s = connect_from(bind, target).await?;
        s.write_all(&payload).await?;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no end in 10s"))??;
        Ok(got)
    }
    .await;
    let upstream = match &r {
        Ok(got) => got.as_slice() == TLS_ANSWER || got.starts_with(b"HTTP/1.1 200 OK"),
        Err(_) => false,
    };
    println!("{}", if upstream { "upstream" } else { "denied" });
}

// ---------------------------------------------------------------------------------------------
// Idle flows

async fn hold(opts: Opts) {
    let target: SocketAddr = opts
        .req("target")
        .parse()
        .unwrap_or_else(|_| die("--target: bad address"));
    let count: usize = opts.num("count", 5000);
    let parallel: usize = opts.num("parallel", 64);
    let bind = bind_of(&opts);
    // What each flow sends first, and how many bytes of answer it waits for.
    let (first, answer): (Arc<Vec<u8>>, usize) = match opts.get("hello") {
        Some(f) => (
            Arc::new(std::fs::read(f).unwrap_or_else(|e| die(&format!("--hello {f}: {e}")))),
            TLS_ANSWER.len(),
        ),
        None => (Arc::new(b"ping-from-client".to_vec()), 16),
    };
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let sem = sem.clone();
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let r: io::Result<TcpStream> = async {
                let mut s = connect_from(bind, target).await?;
                s.write_all(&first).await?;
                let mut b = vec![0u8; answer];
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
                Ok(s)
            }
            .await;
            r
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut failed = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await.expect("task") {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    println!(
        "{{\"established\":{},\"failed\":{},\"secs\":{:.3},\"first_error\":{}}}",
        held.len(),
        failed,
        t0.elapsed().as_secs_f64(),
        match first_error {
            Some(e) => format!("\"{}\"", e.replace('"', "'")),
            None => "null".into(),
        }
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Hold them silent until killed.
    std::future::pending::<()>().await;
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// tokio-splice relay

async fn splice_relay(opts: Opts) {
    let l = listen(
        opts.req("listen")
            .parse()
            .unwrap_or_else(|_| die("--listen: bad address")),
    );
    eprintln!("pcbench splice-relay: listening");
    loop {
        let (mut client, _) = match l.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let dst = socket2::SockRef::from(&client)
                .original_dst_v4()
                .ok()
                .and_then(|a| a.as_socket());
            let Some(dst) = dst else { return };
            let Ok(mut up) = TcpStream::connect(dst).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let _ = tokio_splice::zero_copy_bidirectional(&mut client, &mut up).await;
        });
    }
}
