//! The life of one flow, as phases: original destination and loop guard,
//! detection, decision, upstream, then the relay. Every phase writes what it
//! learns into the flow's [`FlowLog`], which writes the one access-log line
//! and the metrics when it is dropped, whatever way the flow ends.
//!
//! The phases before the relay run in their own boxed future, freed when the
//! relay starts: an idle flow keeps only the relay's state and its record,
//! not the detection's and the connect's (docs/DESIGN.md, "The pipeline of one flow").

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant as TokioInstant;

use crate::detect::{Detected, Detector, Step};
use crate::net::{canonical_addr, OrigDst};
use crate::proxy::deny;
use crate::proxy::record::FlowLog;
use crate::registry::{Decision, DetectPlan, FlowFacts, Protocol, Reason, Registry, Verdict};
use crate::relay::machine::{Closed, Machine};
use crate::relay::{self, Counters, Direction, Meter, RelayEnd, RelayMode, Side};
use crate::state::{ActiveGuard, Generation, Shared};
use crate::upstream::{ConnectError, Connected, Hop, PortGuard, LOOP_HOPS};
use crate::vocab::Mode;
use prometheus_client::metrics::counter::Counter;

/// What detection learnt from the client's first bytes.
struct Detection {
    /// Every byte read from the client so far: written upstream first.
    buf: Vec<u8>,
    protocol: Protocol,
    name: Option<String>,
    ech: bool,
    failure: Option<Reason>,
    /// The client went away or failed during detection.
    client_error: Option<String>,
}

impl Detection {
    /// The detector recognised the first bytes.
    fn found(buf: Vec<u8>, d: Detected) -> Detection {
        Detection {
            buf,
            protocol: d.protocol,
            name: d.name,
            ech: d.ech,
            failure: None,
            client_error: None,
        }
    }

    /// Opaque TCP: a silent client on a port that allows one, or one that
    /// closed without sending anything.
    fn opaque(buf: Vec<u8>) -> Detection {
        Detection {
            buf,
            protocol: Protocol::Tcp,
            name: None,
            ech: false,
            failure: None,
            client_error: None,
        }
    }

    /// Detection failed (malformed, too large, timeout); the protocol is
    /// guessed from the first byte for the deny answer.
    fn failed(buf: Vec<u8>, reason: Reason) -> Detection {
        Detection {
            failure: Some(reason),
            protocol: crate::detect::guess_protocol(&buf),
            ..Detection::opaque(buf)
        }
    }

    /// The client left or failed before anything could be decided.
    fn client_left(buf: Vec<u8>, why: String) -> Detection {
        Detection {
            client_error: Some(why),
            protocol: crate::detect::guess_protocol(&buf),
            ..Detection::opaque(buf)
        }
    }

    fn facts(&self, dst: OrigDst) -> FlowFacts<'_> {
        FlowFacts {
            dst,
            protocol: self.protocol,
            name: self.name.as_deref(),
            detect_failure: self.failure,
        }
    }

    fn record(&self, log: &mut FlowLog) {
        log.rec.protocol = self.protocol;
        log.rec.name = self.name.clone();
        log.rec.ech = self.ech;
    }
}

/// The flow ended before its relay; its record says how.
struct Ended;

/// A decided, connected flow, ready to relay: what the relay phase keeps.
struct Relay<'s> {
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
    /// The entry's `portcullis_bytes_total` counters, up and down.
    bytes: (Counter, Counter),
    /// Keeps the upstream socket's port registered with the loop guard.
    _port: PortGuard<'s>,
}

/// Handles one accepted connection to its end. `_admitted` is the flow's
/// place under `max_connections`, given back when the flow ends.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    _admitted: ActiveGuard,
) {
    let mut log = FlowLog::new(&shared, peer, Mode::Transparent);
    // Boxed, and freed before the relay starts (see the module docs).
    let opened = Box::pin(open(&shared, &mut log, client, local)).await;
    let Ok(relay) = opened else { return };
    // The relay phase, in this future itself: no wrapper layer keeps a second
    // copy of what it hands on.
    let Relay {
        client,
        upstream,
        idle_timeout,
        bytes: (up_bytes, down_bytes),
        _port,
    } = relay;
    let on_bytes = byte_hook(&up_bytes, &down_bytes);
    let entry = log.rec.entry.as_deref().unwrap_or(PASSTHROUGH);
    let (error, reset_by) = relay_to_end(
        &shared,
        entry,
        client,
        upstream,
        &log.counters,
        idle_timeout,
        on_bytes,
    )
    .await;
    log.rec.error = error;
    log.rec.reset_by = reset_by;
}

/// The relay's hook for an entry's `portcullis_bytes_total` counters.
fn byte_hook<'c>(up: &'c Counter, down: &'c Counter) -> impl Fn(Direction, u64) + Send + Sync + 'c {
    move |dir, n| {
        match dir {
            Direction::Up => up.inc_by(n),
            Direction::Down => down.inc_by(n),
        };
    }
}

/// The label of a relayed flow that no entry matched (ALLOW_ANY, audit):
/// what `Registry::entry_label` calls it.
const PASSTHROUGH: &str = "Passthrough";

impl Relay<'_> {
    /// The relay phase: until the flow ends or is closed from outside.
    async fn run(self, shared: &Shared, log: &mut FlowLog) {
        let (up_bytes, down_bytes) = &self.bytes;
        let on_bytes = byte_hook(up_bytes, down_bytes);
        let (client, upstream, idle) = (self.client, self.upstream, self.idle_timeout);
        let entry = log.rec.entry.as_deref().unwrap_or(PASSTHROUGH);
        let (error, reset_by) = relay_to_end(
            shared,
            entry,
            client,
            upstream,
            &log.counters,
            idle,
            on_bytes,
        )
        .await;
        log.rec.error = error;
        log.rec.reset_by = reset_by;
    }
}

/// Writes the bytes read so far upstream, then relays until the flow ends:
/// the explicit proxy's tunnels, which hold their state in one future.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_and_relay(
    shared: &Shared,
    gen: &Generation,
    log: &mut FlowLog,
    client: TcpStream,
    upstream: TcpStream,
    first: Vec<u8>,
    entry: &str,
    port: PortGuard<'_>,
) {
    if let Ok(relay) = ready(shared, gen, log, client, upstream, first, entry, port).await {
        relay.run(shared, log).await;
    }
}

/// Every phase before the relay: `Ok` with a connected flow to relay, or
/// `Err` when the flow ended (denied, failed, the client gone).
async fn open<'s>(
    shared: &'s Shared,
    log: &mut FlowLog,
    client: TcpStream,
    local: SocketAddr,
) -> Result<Relay<'s>, Ended> {
    let gen = shared.generation();
    let reg = &gen.registry;
    let (dst, hop) = match loop_guard(shared, log, &client, local) {
        Ok(d) => d,
        Err(why) => {
            log.refused(reg, &Registry::loop_verdict(), why);
            deny::reset(client);
            return Err(Ended);
        }
    };

    // Step 3: a TCP entry that admits D.ip decides at once.
    if let Some(v) = reg.decide_by_address(dst, &*gen.resolved) {
        log.decided(reg, &v);
        return connect(shared, &gen, log, client, dst, hop, v, Vec::new(), None).await;
    }
    let plan = reg.detect_plan(dst);
    if plan == DetectPlan::ConnectFirst {
        return connect_first(shared, &gen, log, client, dst, hop).await;
    }
    let mut client = client;
    let det = detect(shared, &gen, &mut client, plan, None).await;
    det.record(log);
    if let Some(e) = det.client_error {
        // The client left before we could decide; nothing to answer.
        let v = reg.refuse(det.failure.unwrap_or(Reason::Malformed), dst);
        log.refused(reg, &v, e);
        return Err(Ended);
    }
    let v = reg.decide(&det.facts(dst), &*gen.resolved);
    if v.decision == Decision::Deny {
        log.decided(reg, &v);
        let reason = v.reason.unwrap_or(Reason::NotInRegistry);
        deny::deny(
            client,
            det.protocol,
            det.name.as_deref(),
            dst.port(),
            reason,
        )
        .await;
        return Err(Ended);
    }
    let name = det.name.as_deref();
    connect(shared, &gen, log, client, dst, hop, v, det.buf, name).await
}

/// Step 1: the original destination and the loop guard. `Err` says why the
/// flow is a loop.
fn loop_guard(
    shared: &Shared,
    log: &mut FlowLog,
    client: &TcpStream,
    local: SocketAddr,
) -> Result<(OrigDst, Hop), &'static str> {
    let dst = match crate::sys::original_dst(client, local) {
        Some(d) if canonical_addr(d) != canonical_addr(local) => OrigDst::new(d),
        _ => return Err("not redirected: connected straight to the listener"),
    };
    log.rec.dst = Some(dst.0);
    let peer = log.rec.client;
    let hop = shared.dialer.own.hop(peer, dst.0, Instant::now());
    if hop == 1 {
        // One pass through the proxy from its own socket's address: a loop, or a client NAT
        // moved onto that port. Let it through; a loop comes back once more and is reset then.
        tracing::debug!(%peer, dst = %dst.0, "flow from the address of an upstream socket of ours");
    }
    if hop >= LOOP_HOPS {
        return Err("the proxy's own upstream connection came back: is proxy_uid/mark excluded?");
    }
    Ok((dst, hop))
}

/// ALLOW_ANY on a port without TLS/HTTP entries: the server may speak
/// first, so connect to D now, relay its bytes at once, and classify the
/// client's first bytes (for the log) as they come.
async fn connect_first<'s>(
    shared: &'s Shared,
    gen: &Generation,
    log: &mut FlowLog,
    mut client: TcpStream,
    dst: OrigDst,
    hop: Hop,
) -> Result<Relay<'s>, Ended> {
    let reg = &gen.registry;
    let timeout = gen.config().proxy.connect_timeout;
    let up = match shared.dialer.connect(&[dst.0], timeout, hop).await {
        Ok(c) => c,
        Err(e) => {
            let v = reg.refuse(Reason::NotInRegistry, dst);
            log.decided(reg, &v);
            return Err(upstream_failed(shared, reg, log, client, Protocol::Tcp, &v, e).await);
        }
    };
    log.rec.upstream = Some(up.addr);
    let Connected {
        stream: mut upstream,
        addr: _,
        guard,
    } = up;
    let counters = log.counters.clone();
    let plan = DetectPlan::ConnectFirst;
    let det = detect(
        shared,
        gen,
        &mut client,
        plan,
        Some((&mut upstream, &counters)),
    )
    .await;
    det.record(log);
    let v = reg.decide(&det.facts(dst), &*gen.resolved);
    log.decided(reg, &v);
    if let Some(e) = det.client_error {
        log.rec.error = Some(e);
        deny::reset(client);
        return Err(Ended);
    }
    let entry = reg.entry_label(&v);
    ready(shared, gen, log, client, upstream, det.buf, entry, guard).await
}

/// Steps 7-8: resolves the verdict's upstream (within connect_timeout) and
/// connects; a name that resolves to nothing is denied `dns` (or passed to D
/// under audit / ALLOW_ANY).
#[allow(clippy::too_many_arguments)]
async fn connect<'s>(
    shared: &'s Shared,
    gen: &Generation,
    log: &mut FlowLog,
    client: TcpStream,
    dst: OrigDst,
    hop: Hop,
    v: Verdict,
    first: Vec<u8>,
    name: Option<&str>,
) -> Result<Relay<'s>, Ended> {
    let reg = &gen.registry;
    let protocol = log.rec.protocol;
    let Some(plan) = v.upstream.clone() else {
        log.decided(reg, &v);
        let reason = v.reason.unwrap_or(Reason::NotInRegistry);
        deny::deny(client, protocol, name, dst.port(), reason).await;
        return Err(Ended);
    };
    // Resolution counts inside connect_timeout (docs/DESIGN.md §3 step 7).
    let deadline = TokioInstant::now() + gen.config().proxy.connect_timeout;
    let (v, addrs) = match shared.dialer.candidates(&plan, reg, &v, deadline).await {
        Ok(a) => (v, a),
        Err(_) => {
            let v2 = reg.dns_failed(dst);
            if v2.decision == Decision::Deny {
                log.decided(reg, &v2);
                deny::deny(client, protocol, name, dst.port(), Reason::Dns).await;
                return Err(Ended);
            }
            (v2, vec![dst.0])
        }
    };
    log.decided(reg, &v);
    let left = deadline.saturating_duration_since(TokioInstant::now());
    let up = match shared.dialer.connect(&addrs, left, hop).await {
        Ok(c) => c,
        Err(e) => return Err(upstream_failed(shared, reg, log, client, protocol, &v, e).await),
    };
    log.rec.upstream = Some(up.addr);
    let entry = reg.entry_label(&v);
    ready(shared, gen, log, client, up.stream, first, entry, up.guard).await
}

/// Writes the bytes read during detection upstream; then the flow is ready
/// to relay. Bytes are counted as they move, errors included.
#[allow(clippy::too_many_arguments)]
async fn ready<'s>(
    shared: &Shared,
    gen: &Generation,
    log: &mut FlowLog,
    client: TcpStream,
    mut upstream: TcpStream,
    first: Vec<u8>,
    entry: &str,
    port: PortGuard<'s>,
) -> Result<Relay<'s>, Ended> {
    let (up_bytes, down_bytes) = shared.metrics.byte_counters(entry);
    // Server bytes relayed while the client's were being classified.
    down_bytes.inc_by(log.counters.down());
    let idle_timeout = gen.config().proxy.idle_timeout;
    if !first.is_empty() {
        let wrote = tokio::time::timeout(idle_timeout, write_first(&mut upstream, &first)).await;
        let timed_out = |_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle_timeout",
            ))
        };
        if let Err(e) = wrote.unwrap_or_else(timed_out) {
            log.rec.error = Some(format!("upstream: {e}"));
            deny::reset(client);
            deny::reset(upstream);
            return Err(Ended);
        }
        log.counters
            .up
            .fetch_add(first.len() as u64, Ordering::Relaxed);
        up_bytes.inc_by(first.len() as u64);
    }
    Ok(Relay {
        client,
        upstream,
        idle_timeout,
        bytes: (up_bytes, down_bytes),
        _port: port,
    })
}

/// Writes the first bytes upstream. A socket just connected has room for
/// them, but tokio has not yet seen its writable event (and would wait a turn
/// of the event loop for it): so one send(2) goes first, directly, and tokio
/// writes only what that left.
async fn write_first(upstream: &mut TcpStream, first: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    let sent = match send(upstream.as_raw_fd(), first, MsgFlags::MSG_NOSIGNAL) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => return Err(e.into()),
    };
    upstream.write_all(&first[sent..]).await
}

/// Reads the client's first bytes until the detector decides, the deadline
/// passes, or the client leaves. With `upstream` (ALLOW_ANY, server-first
/// capable ports), the server's bytes are relayed to the client meanwhile.
async fn detect(
    shared: &Shared,
    gen: &Generation,
    client: &mut TcpStream,
    plan: DetectPlan,
    mut upstream: Option<(&mut TcpStream, &Counters)>,
) -> Detection {
    let cfg = gen.config();
    let start = TokioInstant::now();
    let hello_deadline = start + cfg.proxy.hello_timeout;
    let first_deadline = match plan {
        DetectPlan::Hello => hello_deadline,
        _ => start + cfg.proxy.first_byte_timeout,
    };
    let mut detector = Detector::new();
    // Sized for the reserve below: starting smaller only adds a realloc per flow.
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut down_buf: Vec<u8> = Vec::new();
    let mut upstream_open = upstream.is_some();
    let done = |d: Detection, detector: &Detector| {
        shared.metrics.detect_examined.inc_by(detector.examined());
        shared
            .metrics
            .detect_seconds
            .observe(start.elapsed().as_secs_f64());
        d
    };
    loop {
        let deadline = if buf.is_empty() {
            first_deadline
        } else {
            hello_deadline
        };
        if buf.len() >= crate::detect::MAX_HEAD + 16 * 1024 {
            // The detector says TooLarge before this; a guard all the same.
            return done(Detection::failed(buf, Reason::TooLarge), &detector);
        }
        buf.reserve(16 * 1024);
        let read = tokio::select! {
            r = client.read_buf(&mut buf) => Some(r),
            r = async {
                match upstream.as_mut() {
                    Some((up, _)) if upstream_open => {
                        if down_buf.capacity() == 0 {
                            down_buf.reserve(16 * 1024);
                        }
                        down_buf.clear();
                        up.read_buf(&mut down_buf).await
                    }
                    _ => std::future::pending().await,
                }
            } => {
                match r {
                    Ok(0) | Err(_) => {
                        upstream_open = false;
                    }
                    Ok(n) => {
                        // Bounded like the relay: a client that reads nothing
                        // for idle_timeout while the server talks is gone.
                        let wrote = tokio::time::timeout(cfg.proxy.idle_timeout, client.write_all(&down_buf[..n])).await;
                        if !matches!(wrote, Ok(Ok(()))) {
                            let why = if wrote.is_err() { "idle_timeout: the client reads nothing" } else { "client_reset" };
                            return done(Detection::client_left(buf, why.into()), &detector);
                        }
                        if let Some((_, c)) = upstream.as_ref() {
                            c.down.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
                None
            }
            _ = tokio::time::sleep_until(deadline) => {
                let d = if buf.is_empty() && plan != DetectPlan::Hello {
                    // ALLOW_ANY / audit: a silent client is opaque.
                    Detection::opaque(buf)
                } else {
                    Detection::failed(buf, Reason::Timeout)
                };
                return done(d, &detector);
            }
        };
        let Some(read) = read else { continue };
        let n = match read {
            Ok(0) => {
                // EOF: nothing at all is an opaque (empty) flow; a partial
                // hello or head is malformed.
                let d = if buf.is_empty() {
                    Detection::opaque(buf)
                } else {
                    Detection::failed(buf, Reason::Malformed)
                };
                return done(d, &detector);
            }
            Ok(n) => n,
            Err(e) => {
                return done(
                    Detection::client_left(buf, format!("client: {e}")),
                    &detector,
                );
            }
        };
        let from = buf.len() - n;
        let step = detector.push(&buf[from..]);
        let d = match step {
            Step::NeedMore { .. } => continue,
            Step::Done(found) => Detection::found(buf, found),
            Step::Malformed(m) => {
                tracing::debug!(error = %m, "malformed first flight");
                Detection::failed(buf, Reason::Malformed)
            }
            Step::TooLarge => Detection::failed(buf, Reason::TooLarge),
        };
        return done(d, &detector);
    }
}

/// Relays a decided flow until it ends or is closed from outside
/// (`revoke_on_reload`, the end of a drain: see `drain::closed`; both sides
/// are reset then), and says how it ended for the access log:
/// `(error, reset_by)`. The splice relay's state machine is built here, in
/// this future, not behind another `async fn` layer.
async fn relay_to_end<F>(
    shared: &Shared,
    entry: &str,
    client: TcpStream,
    upstream: TcpStream,
    counters: &Counters,
    idle_timeout: Duration,
    on_bytes: F,
) -> (Option<String>, Option<Side>)
where
    F: Fn(Direction, u64) + Send + Sync,
{
    let closed: Closed<'_> = Box::pin(crate::drain::closed(shared, entry));
    let end = match shared.relay_mode {
        RelayMode::Splice => {
            let meter = Meter::new(counters, &on_bytes);
            let end = Machine::new(&client, &upstream, &shared.pipes, &meter, idle_timeout)
                .closed_by(closed)
                .await;
            relay::close(client, upstream, &end);
            end
        }
        // Boxed: the copy relay (a bench comparison) would otherwise set the
        // size of every flow's future.
        RelayMode::Copy { buf_size } => {
            Box::pin(async move {
                tokio::select! {
                    end = relay::relay_copy(client, upstream, buf_size, counters, idle_timeout, on_bytes) => end,
                    why = closed => RelayEnd::Closed(why),
                }
            })
            .await
        }
    };
    match end {
        RelayEnd::Done => (None, None),
        // Both sides had their say and the client ended with an RST (curl, browsers after
        // TLS): the exchange is over, not failed.
        RelayEnd::ClientReset if counters.up() > 0 && counters.down() > 0 => {
            (None, Some(Side::Client))
        }
        end => (Some(end.to_string()), None),
    }
}

/// The upstream could not be reached: counted per entry, the client gets a
/// 502 (HTTP) or a reset.
async fn upstream_failed(
    shared: &Shared,
    reg: &Registry,
    log: &mut FlowLog,
    client: TcpStream,
    protocol: Protocol,
    v: &Verdict,
    e: ConnectError,
) -> Ended {
    log.rec.error = Some(e.to_string());
    let entry = reg.entry_label(v).to_string();
    shared
        .metrics
        .connect_errors
        .get_or_create(&crate::metrics::EntryLabel { entry })
        .inc();
    match protocol {
        Protocol::Http => deny::answer_and_close(client, &deny::http_502()).await,
        _ => deny::reset(client),
    }
    Ended
}

#[cfg(test)]
mod size_tests {
    /// The size of what an `async fn` taking five arguments returns: its
    /// future, without calling it.
    fn future_size<F, A, B, C, D, E, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every idle flow's task is one `handle` future, so
    /// its size is most of the per-flow memory the bench measures. A change
    /// that grows it must say so here, not surface later as a slower, fatter
    /// proxy. Measured in the test (debug) build on 2026-12-02: 4,528 bytes
    /// while detection and connect lived in the same future as the relay;
    /// 3,216 once they became a boxed phase freed before the relay starts;
    /// 2,200 once the splice relay became one poll-driven state machine
    /// (`relay::machine`) instead of nested `async fn`s in a `select!`;
    /// 1,208 once that machine was built in `relay_to_end` itself (no
    /// `relay_with`/`relay`/`run` layers each keeping what they hand on) and
    /// the task became this future itself, not a wrapper around its box.
    #[test]
    fn the_flow_future_stays_small() {
        let size = future_size(super::handle);
        eprintln!("flow::handle future: {size} bytes");
        assert!(size <= 1280, "flow::handle future grew to {size} bytes");
    }
}

#[cfg(test)]
mod write_first_tests {
    use tokio::io::AsyncReadExt;

    /// More than a direct send can hand the kernel at once (a receiver with
    /// a small window that reads late): what the send leaves goes through
    /// tokio, and every byte arrives once, in order.
    #[tokio::test]
    async fn what_the_direct_send_leaves_is_written_through_tokio() {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.set_recv_buffer_size(4096).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        l.bind(&any.into()).unwrap();
        l.listen(1).unwrap();
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l.into()).unwrap();
        let mut up = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let first: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        // The kernel takes only part of it now (the reader has not run yet):
        // write_first then meets a full socket, and tokio writes the rest.
        use std::os::fd::AsRawFd;
        let taken = nix::sys::socket::send(
            up.as_raw_fd(),
            &first,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )
        .unwrap();
        assert!(
            taken < first.len(),
            "the socket took all {taken} bytes at once"
        );
        super::write_first(&mut up, &first[taken..]).await.unwrap();
        drop(up);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), first.len());
        assert!(got == first, "bytes reordered or lost");
    }
}
