//! Relay stage over real loopback sockets: volume with checksums, half-close, resets, idle
//! timeout, the pipe pool under many idle flows and under the pipe quota, exact byte counts.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::relay::{
    relay, relay_with, Counters, Direction, PipePool, RelayEnd, RelayMode, DEFAULT_PIPE_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const MIB: u64 = 1024 * 1024;
const LONG: Duration = Duration::from_secs(3600);
/// Generous bound for things that should happen at once (never a speed assertion).
const PATIENCE: Duration = Duration::from_secs(20);

/// Heavy tests would disturb each other's fd counts and pipe quota: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SPLICE: RelayMode = RelayMode::Splice;
const COPY: RelayMode = RelayMode::Copy { buf_size: 8192 };

/// client <-> [relay] <-> server, all on 127.0.0.1.
struct World {
    client: TcpStream,
    server: TcpStream,
    relay: JoinHandle<RelayEnd>,
    counters: Arc<Counters>,
    /// What the `on_bytes` hook saw, up and down.
    hooked: Arc<[AtomicU64; 2]>,
}

struct Listeners {
    front: TcpListener,
    back: TcpListener,
}

impl Listeners {
    async fn new() -> Self {
        Listeners {
            front: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            back: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    async fn world(&self, mode: RelayMode, pool: &Arc<PipePool>, idle: Duration) -> World {
        let client = TcpStream::connect(self.front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = self.front.accept().await.unwrap();
        let upstream = TcpStream::connect(self.back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = self.back.accept().await.unwrap();
        let counters = Arc::new(Counters::new());
        let hooked: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (pool, c, h) = (pool.clone(), counters.clone(), hooked.clone());
        let relay = tokio::spawn(async move {
            let hook = move |dir: Direction, n: u64| {
                h[dir as usize].fetch_add(n, Ordering::Relaxed);
            };
            relay_with(mode, accepted, upstream, &pool, &c, idle, hook).await
        });
        World {
            client,
            server,
            relay,
            counters,
            hooked,
        }
    }
}

async fn world(mode: RelayMode, pool: &Arc<PipePool>, idle: Duration) -> World {
    Listeners::new().await.world(mode, pool, idle).await
}

async fn ended(relay: JoinHandle<RelayEnd>) -> RelayEnd {
    tokio::time::timeout(PATIENCE, relay)
        .await
        .expect("relay did not end")
        .expect("relay task panicked")
}

/// Waits until `cond` holds, failing after PATIENCE.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// --- data and checksums -------------------------------------------------------------------

/// A streaming hash that does not depend on how the stream is cut into reads (word at a time,
/// so it stays quick in debug builds).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Sum {
    h: u64,
    len: u64,
    pending: [u8; 8],
    npending: usize,
}

impl Sum {
    fn new() -> Self {
        Sum {
            h: 0xcbf2_9ce4_8422_2325,
            len: 0,
            pending: [0; 8],
            npending: 0,
        }
    }

    fn mix(&mut self, w: u64) {
        self.h = (self.h.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.npending > 0 {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().unwrap()));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    fn finish(mut self) -> (u64, u64) {
        let mut last = [0u8; 8];
        last[..self.npending].copy_from_slice(&self.pending[..self.npending]);
        self.mix(u64::from_le_bytes(last) ^ self.len);
        self.mix(self.len);
        (self.h, self.len)
    }
}

#[test]
fn sum_ignores_how_the_stream_is_cut() {
    let data = pattern(1000);
    let mut whole = Sum::new();
    whole.update(&data);
    for cut in [1, 3, 7, 8, 9, 500] {
        let mut parts = Sum::new();
        for piece in data.chunks(cut) {
            parts.update(piece);
        }
        assert_eq!(whole.finish(), parts.finish(), "cut {cut}");
    }
    let mut other = data.clone();
    other.swap(10, 20);
    let mut swapped = Sum::new();
    swapped.update(&other);
    assert_ne!(whole.finish(), swapped.finish());
}

/// Pseudo-random bytes (xorshift), of an odd length so that windows into it never line up.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `total` bytes of shifting windows of a pattern, then shuts down writing.
async fn send(mut w: impl AsyncWriteExt + Unpin, total: u64, hash: bool) -> io::Result<(u64, u64)> {
    const CHUNK: usize = 96 * 1024 + 5;
    let pat = pattern(2 * CHUNK + 4093);
    let mut sum = Sum::new();
    let (mut sent, mut off) = (0u64, 0usize);
    while sent < total {
        let n = CHUNK.min((total - sent) as usize);
        let piece = &pat[off..off + n];
        if hash {
            sum.update(piece);
        }
        w.write_all(piece).await?;
        sent += n as u64;
        off = (off + 4093) % CHUNK;
    }
    w.shutdown().await?;
    Ok(if hash { sum.finish() } else { (0, sent) })
}

/// Reads to EOF.
async fn receive(mut r: impl AsyncReadExt + Unpin, hash: bool) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = Sum::new();
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(if hash { sum.finish() } else { (0, len) });
        }
        len += n as u64;
        if hash {
            sum.update(&buf[..n]);
        }
    }
}

/// Moves `up` bytes client->server and `down` bytes server->client at the same time, each
/// followed by a half-close, and checks both checksums and the relay's counts.
async fn exchange(w: World, up: u64, down: u64) -> RelayEnd {
    let World {
        client,
        server,
        relay,
        counters,
        hooked,
    } = w;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let sent_up = tokio::spawn(send(cw, up, true));
    let sent_down = tokio::spawn(send(sw, down, true));
    let got_up = tokio::spawn(receive(sr, true));
    let got_down = tokio::spawn(receive(cr, true));
    let sent_up = sent_up.await.unwrap().unwrap();
    let sent_down = sent_down.await.unwrap().unwrap();
    assert_eq!(
        got_up.await.unwrap().unwrap(),
        sent_up,
        "client->server bytes differ"
    );
    assert_eq!(
        got_down.await.unwrap().unwrap(),
        sent_down,
        "server->client bytes differ"
    );
    let end = ended(relay).await;
    assert_eq!((counters.up(), counters.down()), (up, down));
    let hook = (
        hooked[0].load(Ordering::Relaxed),
        hooked[1].load(Ordering::Relaxed),
    );
    assert_eq!(hook, (up, down), "on_bytes saw every byte");
    end
}

// --- 1: volume ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splice_256mib_each_way_checksummed() {
    let _serial = SERIAL.lock().await;
    let pool = PipePool::new(64, DEFAULT_PIPE_SIZE);
    let w = world(SPLICE, &pool, LONG).await;
    let end = exchange(w, 256 * MIB, 256 * MIB + 12_345).await;
    assert!(matches!(end, RelayEnd::Done), "{end}");
    assert!(pool.created_total() > 0, "the pipes were used");
    assert_eq!(pool.in_use(), 0, "pipes went back to the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "bench-sized: cargo test --release -- --ignored"]
async fn splice_1gib_each_way_checksummed() {
    let _serial = SERIAL.lock().await;
    let pool = PipePool::new(64, DEFAULT_PIPE_SIZE);
    let w = world(SPLICE, &pool, LONG).await;
    let end = exchange(w, 1024 * MIB, 1024 * MIB).await;
    assert!(matches!(end, RelayEnd::Done), "{end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_mode_relays_the_same_bytes() {
    let _serial = SERIAL.lock().await;
    let pool = PipePool::new(0, 0);
    let w = world(COPY, &pool, LONG).await;
    let end = exchange(w, 32 * MIB + 1, 32 * MIB).await;
    assert!(matches!(end, RelayEnd::Done), "{end}");
}

// --- 2: half-close ------------------------------------------------------------------------

#[tokio::test]
async fn half_close_request_then_reply() {
    let _serial = SERIAL.lock().await;
    for mode in [SPLICE, COPY] {
        let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
        let World {
            mut client,
            mut server,
            relay,
            counters,
            ..
        } = world(mode, &pool, LONG).await;
        let request = b"GET / HTTP/1.0\r\n\r\n".repeat(1000);
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "{mode:?}");
        // The server answers only after seeing EOF: the relay kept the other direction open.
        let reply = pattern(3 * MIB as usize + 7);
        server.write_all(&reply).await.unwrap();
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer == reply, "{mode:?}: reply differs");
        let end = ended(relay).await;
        assert!(matches!(end, RelayEnd::Done), "{mode:?}: {end}");
        assert_eq!(counters.up(), request.len() as u64);
        assert_eq!(counters.down(), reply.len() as u64);
        assert_eq!(pool.in_use(), 0);
    }
}

// --- 3: resets ----------------------------------------------------------------------------

/// Reads until EOF or an error; returns the byte count and how it ended.
async fn drain(mut s: impl AsyncReadExt + Unpin) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (n, Ok(())),
            Ok(k) => n += k as u64,
            Err(e) => return (n, Err(e)),
        }
    }
}

/// Writes until an error (the peer went away).
async fn flood(mut s: impl AsyncWriteExt + Unpin) -> io::Error {
    let buf = pattern(64 * 1024);
    loop {
        if let Err(e) = s.write_all(&buf).await {
            return e;
        }
    }
}

/// The kernel hands a socket's pending ECONNRESET to whichever call comes first: with a reader
/// and a writer on the same socket, one sees the reset and the other may then see EOF or EPIPE.
fn assert_saw_reset(mode: RelayMode, read: io::Result<()>, write: io::Error) {
    let reset = |k: io::ErrorKind| k == io::ErrorKind::ConnectionReset;
    let read_reset = matches!(&read, Err(e) if reset(e.kind()));
    assert!(
        read_reset || reset(write.kind()),
        "{mode:?}: the peer was not reset (read: {read:?}, write: {write})"
    );
    assert!(
        matches!(
            write.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "{mode:?}: {write}"
    );
}

fn reset(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

/// One side (the upstream if `upstream_aborts`, else the client) resets while both
/// directions are busy; the relay must end with `want` and reset the other side.
async fn reset_mid_stream_resets_peer(upstream_aborts: bool, want: fn(&RelayEnd) -> bool) {
    let _serial = SERIAL.lock().await;
    for mode in [SPLICE, COPY] {
        let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
        let w = world(mode, &pool, LONG).await;
        let (mut aborter, peer) = if upstream_aborts {
            (w.server, w.client)
        } else {
            (w.client, w.server)
        };
        let (pr, pw) = peer.into_split();
        let peer_reader = tokio::spawn(drain(pr));
        let peer_writer = tokio::spawn(flood(pw));
        // Both directions busy, then one side aborts.
        aborter.write_all(&pattern(4 * MIB as usize)).await.unwrap();
        let mut some = vec![0u8; 2 * MIB as usize];
        aborter.read_exact(&mut some).await.unwrap();
        reset(aborter);
        let end = ended(w.relay).await;
        assert!(want(&end), "{mode:?}: {end}");
        let (_, read) = peer_reader.await.unwrap();
        let write = peer_writer.await.unwrap();
        assert_saw_reset(mode, read, write);
        assert_eq!(pool.in_use(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_stream_resets_client() {
    reset_mid_stream_resets_peer(true, |e| matches!(e, RelayEnd::UpstreamReset)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_stream_resets_upstream() {
    reset_mid_stream_resets_peer(false, |e| matches!(e, RelayEnd::ClientReset)).await;
}

/// The client sent its request and half-closed; while the upstream is silent, the client
/// aborts. Nobody is reading the client's socket any more, yet the reset must be seen at once
/// (not at the next upstream byte or the idle timeout).
#[tokio::test]
async fn reset_after_half_close_is_propagated() {
    let _serial = SERIAL.lock().await;
    for mode in [SPLICE, COPY] {
        let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
        let World {
            mut client,
            mut server,
            relay,
            ..
        } = world(mode, &pool, LONG).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        reset(client);
        let end = ended(relay).await;
        assert!(matches!(end, RelayEnd::ClientReset), "{mode:?}: {end}");
        let err = server
            .write_all(b"late reply")
            .await
            .and(server.flush().await);
        let mut buf = [0u8; 16];
        let read = server.read(&mut buf).await;
        assert!(
            err.is_err() || read.is_err(),
            "{mode:?}: upstream was not reset ({read:?})"
        );
    }
}

// --- 4: idle timeout ----------------------------------------------------------------------

#[tokio::test]
async fn idle_timeout_closes_silent_flow() {
    let _serial = SERIAL.lock().await;
    for mode in [SPLICE, COPY] {
        let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
        let World {
            mut client,
            mut server,
            relay,
            ..
        } = world(mode, &pool, Duration::from_millis(200)).await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        let end = ended(relay).await;
        assert!(matches!(end, RelayEnd::Idle), "{mode:?}: {end}");
        assert_eq!(end.to_string(), "idle_timeout");
        // Both sides are closed.
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }
}

/// A download with a silent client direction is not idle.
#[tokio::test]
async fn one_way_stream_is_not_idle() {
    let _serial = SERIAL.lock().await;
    for mode in [SPLICE, COPY] {
        let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
        let idle = Duration::from_millis(400);
        let World {
            client,
            mut server,
            relay,
            counters,
            ..
        } = world(mode, &pool, idle).await;
        let reader = tokio::spawn(drain(client));
        // Ten times the idle timeout, one small write every 20 ms.
        let start = Instant::now();
        while start.elapsed() < idle * 10 {
            server.write_all(&[7u8; 100]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                !relay.is_finished(),
                "{mode:?}: ended while bytes were moving"
            );
        }
        let end = ended(relay).await;
        assert!(matches!(end, RelayEnd::Idle), "{mode:?}: {end}");
        let (n, how) = reader.await.unwrap();
        how.unwrap();
        assert_eq!(n, counters.down());
        assert_eq!(counters.up(), 0);
    }
}

// --- 5: the pool --------------------------------------------------------------------------

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_flows_hold_no_pipes() {
    let _serial = SERIAL.lock().await;
    const FLOWS: usize = 2000;
    let pool = PipePool::new(256, DEFAULT_PIPE_SIZE);
    let listeners = Listeners::new().await;
    let before = open_fds();
    let mut worlds = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let mut w = listeners.world(SPLICE, &pool, LONG).await;
        // A few bytes each way, so every flow has used (and returned) pipes.
        let mut b = [0u8; 5];
        w.client.write_all(b"hello").await.unwrap();
        w.server.read_exact(&mut b).await.unwrap();
        w.server.write_all(b"world").await.unwrap();
        w.client.read_exact(&mut b).await.unwrap();
        if i % 2 == 1 {
            // Half of them half-closed: a finished direction must not spin either.
            w.client.shutdown().await.unwrap();
            assert_eq!(w.server.read(&mut b).await.unwrap(), 0);
        }
        worlds.push(w);
    }
    eventually("every pipe back in the pool", || pool.in_use() == 0).await;
    // Idle flows cost no CPU (a readiness busy loop would burn a whole core here).
    let cpu = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = cpu_seconds() - cpu;
    assert!(cpu < 0.3, "{cpu} s of CPU in 1 s with every flow idle");
    assert!(pool.idle() <= 16, "idle pipes are capped: {}", pool.idle());
    let per_flow = 4; // client, accepted, upstream, server: all in this process
    let grown = open_fds().saturating_sub(before);
    assert!(
        grown <= FLOWS * per_flow + 2 * pool.idle() + 32,
        "{grown} fds for {FLOWS} idle flows: pipes are being held"
    );
    for w in &worlds {
        assert!(!w.relay.is_finished());
    }
    // Close cleanly: every relay ends Done and nothing is left behind.
    for w in worlds {
        drop(w.client);
        drop(w.server);
        let end = ended(w.relay).await;
        assert!(matches!(end, RelayEnd::Done), "{end}");
    }
    assert_eq!(pool.in_use(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pool_relays_by_copying() {
    let _serial = SERIAL.lock().await;
    let pool = PipePool::new(0, DEFAULT_PIPE_SIZE);
    let w = world(SPLICE, &pool, LONG).await;
    let end = exchange(w, 16 * MIB + 3, 16 * MIB + 5).await;
    assert!(matches!(end, RelayEnd::Done), "{end}");
    assert_eq!(pool.created_total(), 0);
}

/// More busy flows than pipes: some chunks are spliced, some copied, all bytes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_pool_shared_by_many_busy_flows() {
    let _serial = SERIAL.lock().await;
    let pool = PipePool::with_max_idle(3, 256 * 1024, 1);
    let listeners = Listeners::new().await;
    let mut flows = Vec::new();
    for i in 0..16u64 {
        let w = listeners.world(SPLICE, &pool, LONG).await;
        flows.push(tokio::spawn(exchange(w, 4 * MIB + i, 3 * MIB + 2 * i)));
    }
    for f in flows {
        let end = f.await.unwrap();
        assert!(matches!(end, RelayEnd::Done), "{end}");
    }
    assert_eq!(pool.in_use(), 0);
    assert!(pool.idle() <= 1);
    assert!(pool.created_total() >= 1);
}

/// As an unprivileged user, pipes past the 64 MiB quota cannot be grown: the pool keeps the
/// smaller pipes and the relay still moves every byte. Runs itself as `nobody` when started as
/// root (the quota does not apply to root here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_quota_keeps_smaller_pipes() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    const CHILD: &str = "PORTCULLIS_RELAY_TEST_UNPRIVILEGED";
    let _serial = SERIAL.lock().await;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    if uid == 0 && std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "pipe_quota_keeps_smaller_pipes", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD, "1")
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run the test binary as nobody");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "unprivileged run failed:\n{text}");
        assert!(text.contains("1 passed"), "the test did not run:\n{text}");
        return;
    }
    if uid == 0 {
        panic!("{CHILD} set but still root");
    }
    // 100 x 1 MiB is past the 64 MiB quota.
    let hog = PipePool::new(100, DEFAULT_PIPE_SIZE);
    let leases: Vec<_> = (0..100)
        .map(|_| hog.try_acquire().expect("a pipe"))
        .collect();
    let full = leases
        .iter()
        .filter(|l| l.capacity() >= DEFAULT_PIPE_SIZE)
        .count();
    assert!(full <= 64, "{full} full-size pipes: no quota?");
    assert!(hog.undersized_total() >= 36, "{}", hog.undersized_total());
    assert!(leases.iter().all(|l| l.capacity() >= 4096));
    // With the quota exhausted, a relay gets small pipes and is still exact.
    let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
    let w = world(SPLICE, &pool, LONG).await;
    let end = exchange(w, 8 * MIB + 1, 8 * MIB + 2).await;
    assert!(matches!(end, RelayEnd::Done), "{end}");
    assert!(pool.undersized_total() > 0);
    // Once the quota frees up, returned pipes grow back to full size.
    drop(leases);
    hog.trim(0);
    let lease = pool.try_acquire().unwrap();
    assert_eq!(lease.capacity(), DEFAULT_PIPE_SIZE);
}

// --- 6: exact counts after an error -------------------------------------------------------

#[tokio::test]
async fn byte_counts_exact_after_reset() {
    let _serial = SERIAL.lock().await;
    for mode in [SPLICE, COPY] {
        let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
        let World {
            mut client,
            mut server,
            relay,
            counters,
            hooked,
        } = world(mode, &pool, LONG).await;
        let up = pattern(3 * MIB as usize + 17);
        let down = pattern(5 * MIB as usize + 3);
        let (mut got_up, mut got_down) = (vec![0; up.len()], vec![0; down.len()]);
        let (r1, r2) = tokio::join!(client.write_all(&up), server.read_exact(&mut got_up));
        r1.unwrap();
        r2.unwrap();
        let (r1, r2) = tokio::join!(server.write_all(&down), client.read_exact(&mut got_down));
        r1.unwrap();
        r2.unwrap();
        // Counted as they moved, while the flow is still open.
        eventually("live counts", || {
            counters.up() == up.len() as u64 && counters.down() == down.len() as u64
        })
        .await;
        assert!(!relay.is_finished());
        reset(server);
        let end = ended(relay).await;
        assert!(matches!(end, RelayEnd::UpstreamReset), "{mode:?}: {end}");
        assert_eq!(counters.up(), up.len() as u64, "{mode:?}");
        assert_eq!(counters.down(), down.len() as u64, "{mode:?}");
        let hook = (
            hooked[0].load(Ordering::Relaxed),
            hooked[1].load(Ordering::Relaxed),
        );
        assert_eq!(hook, (up.len() as u64, down.len() as u64), "{mode:?}");
        assert_eq!(
            client.read(&mut [0u8; 8]).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
    }
}

/// The relay future can be spawned (it is Send) and the plain `relay` entry point works.
#[tokio::test]
async fn plain_relay_entry_point() {
    let _serial = SERIAL.lock().await;
    let l = Listeners::new().await;
    let mut client = TcpStream::connect(l.front.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = l.front.accept().await.unwrap();
    let upstream = TcpStream::connect(l.back.local_addr().unwrap())
        .await
        .unwrap();
    let (mut server, _) = l.back.accept().await.unwrap();
    let pool = PipePool::new(4, DEFAULT_PIPE_SIZE);
    let counters = Arc::new(Counters::new());
    let (p, c) = (pool.clone(), counters.clone());
    let task =
        tokio::spawn(async move { relay(accepted, upstream, &p, &c, LONG, |_, _| {}).await });
    client.write_all(b"abc").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    server.write_all(b"defg").await.unwrap();
    drop(server);
    got.clear();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"defg");
    assert!(matches!(ended(task).await, RelayEnd::Done));
    assert_eq!((counters.up(), counters.down()), (3, 4));
}

/// Splice-auto: a short exchange (request, answer, a few messages each way) is copied and never
/// takes a pipe from the pool; a burst larger than the small buffer goes through a pipe, and the
/// bytes and counts are exact either way.
#[tokio::test]
async fn small_bursts_are_copied_large_ones_spliced() {
    let _serial = SERIAL.lock().await;
    let pool = PipePool::new(8, DEFAULT_PIPE_SIZE);
    let mut w = world(SPLICE, &pool, LONG).await;
    let mut buf = vec![0u8; 4096];
    for round in 0..5u8 {
        let ask = [round; 300];
        w.client.write_all(&ask).await.unwrap();
        w.server.read_exact(&mut buf[..300]).await.unwrap();
        assert_eq!(&buf[..300], &ask[..]);
        let answer = [round ^ 0xff; 100];
        w.server.write_all(&answer).await.unwrap();
        w.client.read_exact(&mut buf[..100]).await.unwrap();
        assert_eq!(&buf[..100], &answer[..]);
    }
    assert_eq!(pool.created_total(), 0, "small bursts took no pipe");
    // One large burst down: the server writes it all before the client reads anything.
    let big = pattern(4 * MIB as usize);
    let writer = {
        let big = big.clone();
        let mut server = w.server;
        tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            server
        })
    };
    let mut got = vec![0u8; big.len()];
    w.client.read_exact(&mut got).await.unwrap();
    assert!(got == big, "the large burst arrived intact");
    assert!(pool.created_total() > 0, "a large burst is spliced");
    let server = writer.await.unwrap();
    drop(server);
    w.client.shutdown().await.unwrap();
    let end = ended(w.relay).await;
    assert!(matches!(end, RelayEnd::Done), "{end}");
    assert_eq!(w.counters.up(), 5 * 300);
    assert_eq!(w.counters.down(), 5 * 100 + 4 * MIB);
    assert_eq!(pool.in_use(), 0);
}

// --- throughput (informational) -----------------------------------------------------------

fn cpu_seconds() -> f64 {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// cargo test --release --test relay -- --ignored --nocapture bench_splice_vs_copy
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run in release with --nocapture"]
async fn bench_splice_vs_copy() {
    let _serial = SERIAL.lock().await;
    const EACH_WAY: u64 = 2048 * MIB;
    let mut results = Vec::new();
    for (name, mode) in [
        ("splice 1MiB pipes", SPLICE),
        ("copy 8KiB", RelayMode::Copy { buf_size: 8192 }),
        (
            "copy 256KiB",
            RelayMode::Copy {
                buf_size: 256 * 1024,
            },
        ),
        ("splice", SPLICE),
        ("copy 8KiB", RelayMode::Copy { buf_size: 8192 }),
        (
            "copy 256KiB",
            RelayMode::Copy {
                buf_size: 256 * 1024,
            },
        ),
    ] {
        let pool = PipePool::new(16, DEFAULT_PIPE_SIZE);
        let w = world(mode, &pool, LONG).await;
        let (cr, cw) = w.client.into_split();
        let (sr, sw) = w.server.into_split();
        let cpu = cpu_seconds();
        let t = Instant::now();
        let tasks = [
            tokio::spawn(send(cw, EACH_WAY, false)),
            tokio::spawn(send(sw, EACH_WAY, false)),
            tokio::spawn(receive(sr, false)),
            tokio::spawn(receive(cr, false)),
        ];
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        assert!(matches!(ended(w.relay).await, RelayEnd::Done));
        let gbit = (2 * EACH_WAY * 8) as f64 / secs / 1e9;
        println!("{name:>18}: {gbit:6.1} Gbit/s both ways together, {cpu:5.2} s CPU (whole process) for {} GiB", 2 * EACH_WAY / 1024 / MIB);
        results.push((name, gbit));
    }
}
