//! The life of one flow: original destination and loop guard, detection,
//! decision, upstream, relay, and the one access-log line at its end.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant as TokioInstant;

use crate::access_log::{timestamp, FlowRecord};
use crate::detect::{Detector, Protocol, Step};
use crate::metrics::ConnLabels;
use crate::net::{canonical_addr, OrigDst};
use crate::proxy::deny;
use crate::proxy::upstream::{ConnectError, Hop, LOOP_HOPS};
use crate::registry::{Decision, DetectPlan, FlowFacts, FlowProtocol, Reason, Registry, Verdict};
use crate::relay::{Counters, Direction, RelayEnd};
use crate::state::{Generation, Shared};

/// What detection learnt from the client's first bytes.
struct Detection {
    /// Every byte read from the client so far: written upstream first.
    buf: Vec<u8>,
    protocol: FlowProtocol,
    name: Option<String>,
    ech: bool,
    failure: Option<Reason>,
    /// The client went away or failed during detection.
    client_error: Option<String>,
}

impl Detection {
    fn facts(&self, dst: OrigDst) -> FlowFacts<'_> {
        FlowFacts {
            dst,
            protocol: self.protocol,
            name: self.name.as_deref(),
            detect_failure: self.failure,
        }
    }
}

/// Per-flow accounting, turned into the access-log line and metrics.
struct Flow {
    started: Instant,
    rec: FlowRecord,
    counted: bool,
    /// The loop guard's hop count (see `OwnSockets`); the upstream socket inherits it.
    hop: Hop,
}

impl Flow {
    fn new(client: SocketAddr) -> Flow {
        Flow {
            started: Instant::now(),
            rec: FlowRecord::new(client, "transparent"),
            counted: false,
            hop: 0,
        }
    }

    fn detected(&mut self, det: &Detection) {
        self.rec.protocol = det.protocol.as_str();
        self.rec.name = det.name.clone();
        self.rec.ech = det.ech;
    }

    /// Records the verdict and counts the flow in `portcullis_connections_total`.
    fn decided(&mut self, shared: &Shared, reg: &Registry, v: &Verdict) {
        record_verdict(shared, reg, v, &mut self.rec, &mut self.counted);
    }

    fn finish(mut self, shared: &Shared, counters: &Counters) {
        self.rec.bytes_up = counters.up();
        self.rec.bytes_down = counters.down();
        self.rec.duration_ms = self.started.elapsed().as_millis() as u64;
        if shared.access_log.enabled() {
            self.rec.ts = timestamp(SystemTime::now());
        }
        shared.log(&self.rec);
    }
}

fn guess_protocol(buf: &[u8]) -> FlowProtocol {
    match buf.first() {
        Some(0x16) => FlowProtocol::Tls,
        Some(b) if b.is_ascii_uppercase() => FlowProtocol::Http,
        _ => FlowProtocol::Tcp,
    }
}

fn flow_protocol(p: Protocol) -> FlowProtocol {
    match p {
        Protocol::Tls => FlowProtocol::Tls,
        Protocol::Http => FlowProtocol::Http,
        Protocol::Opaque => FlowProtocol::Tcp,
    }
}

/// Handles one accepted connection to its end.
pub async fn handle(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let gen = shared.generation();
    let mut flow = Flow::new(peer);
    let counters = Counters::new();
    let reg = &gen.registry;

    // Step 1: the loop guard.
    let dst = match crate::sys::original_dst(&client, local) {
        Some(d) if canonical_addr(d) != canonical_addr(local) => OrigDst::new(d),
        _ => {
            let v = Registry::loop_verdict();
            flow.decided(&shared, reg, &v);
            deny::reset(client);
            flow.rec.error = Some("not redirected: connected straight to the listener".into());
            flow.finish(&shared, &counters);
            return;
        }
    };
    flow.rec.dst = Some(dst.0);
    flow.hop = shared.dialer.own.hop(peer, dst.0, Instant::now());
    if flow.hop == 1 {
        // One pass through the proxy from its own socket's address: a loop, or a client NAT
        // moved onto that port. Let it through; a loop comes back once more and is reset then.
        tracing::debug!(%peer, dst = %dst.0, "flow from the address of an upstream socket of ours");
    }
    if flow.hop >= LOOP_HOPS {
        let v = Registry::loop_verdict();
        flow.decided(&shared, reg, &v);
        deny::reset(client);
        flow.rec.error = Some(
            "the proxy's own upstream connection came back: is proxy_uid/mark excluded?".into(),
        );
        flow.finish(&shared, &counters);
        return;
    }

    // Step 3: a TCP entry that admits D.ip decides at once.
    if let Some(v) = reg.decide_by_address(dst, &*gen.resolved) {
        flow.decided(&shared, reg, &v);
        connect_and_relay(
            &shared,
            &gen,
            client,
            dst,
            v,
            Vec::new(),
            FlowProtocol::Tcp,
            None,
            &mut flow,
            &counters,
        )
        .await;
        flow.finish(&shared, &counters);
        return;
    }

    let plan = reg.detect_plan(dst);
    if plan == DetectPlan::ConnectFirst {
        connect_first(&shared, &gen, client, dst, &mut flow, &counters).await;
        flow.finish(&shared, &counters);
        return;
    }
    let mut client = client;
    let det = detect(&shared, &gen, &mut client, plan, None).await;

    flow.detected(&det);
    if let Some(e) = det.client_error {
        // The client left before we could decide; nothing to answer.
        let v = reg.refuse(det.failure.unwrap_or(Reason::Malformed), dst);
        flow.decided(&shared, reg, &v);
        flow.rec.error = Some(e);
        flow.finish(&shared, &counters);
        return;
    }
    let v = reg.decide(&det.facts(dst), &*gen.resolved);
    if v.decision == Decision::Deny {
        flow.decided(&shared, reg, &v);
        deny::deny(
            client,
            det.protocol,
            det.name.as_deref(),
            dst.port(),
            v.reason.unwrap_or(Reason::NotInRegistry),
        )
        .await;
        flow.finish(&shared, &counters);
        return;
    }
    let protocol = det.protocol;
    let name = det.name.clone();
    connect_and_relay(
        &shared,
        &gen,
        client,
        dst,
        v,
        det.buf,
        protocol,
        name.as_deref(),
        &mut flow,
        &counters,
    )
    .await;
    flow.finish(&shared, &counters);
}

/// ALLOW_ANY on a port without TLS/HTTP entries: the server may speak
/// first, so connect to D now, relay its bytes at once, and classify the
/// client's first bytes (for the log) as they come.
async fn connect_first(
    shared: &Shared,
    gen: &Generation,
    mut client: TcpStream,
    dst: OrigDst,
    flow: &mut Flow,
    counters: &Counters,
) {
    let reg = &gen.registry;
    let v = reg.refuse(Reason::NotInRegistry, dst);
    let addrs = vec![dst.0];
    let up = match shared
        .dialer
        .connect(&addrs, gen.config().proxy.connect_timeout, flow.hop)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            flow.decided(shared, reg, &v);
            upstream_failed(shared, reg, &v, client, FlowProtocol::Tcp, e, flow).await;
            return;
        }
    };
    flow.rec.upstream = Some(up.addr);
    let crate::proxy::upstream::Connected {
        stream: mut up_stream,
        addr: _,
        guard: _guard,
    } = up;
    let det = detect(
        shared,
        gen,
        &mut client,
        DetectPlan::ConnectFirst,
        Some((&mut up_stream, counters)),
    )
    .await;
    flow.detected(&det);
    let v = reg.decide(&det.facts(dst), &*gen.resolved);
    flow.decided(shared, reg, &v);
    if let Some(e) = det.client_error {
        flow.rec.error = Some(e);
        deny::reset(client);
        return;
    }
    let entry = reg.entry_label(&v).to_string();
    write_and_relay(
        shared, gen, client, up_stream, det.buf, &entry, flow, counters,
    )
    .await;
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
            let d = Detection {
                protocol: guess_protocol(&buf),
                buf,
                name: None,
                ech: false,
                failure: Some(Reason::TooLarge),
                client_error: None,
            };
            return done(d, &detector);
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
                            let d = Detection { protocol: guess_protocol(&buf), buf, name: None, ech: false, failure: None, client_error: Some(why.into()) };
                            return done(d, &detector);
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
                    Detection { buf, protocol: FlowProtocol::Tcp, name: None, ech: false, failure: None, client_error: None }
                } else {
                    Detection { protocol: guess_protocol(&buf), buf, name: None, ech: false, failure: Some(Reason::Timeout), client_error: None }
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
                    Detection {
                        buf,
                        protocol: FlowProtocol::Tcp,
                        name: None,
                        ech: false,
                        failure: None,
                        client_error: None,
                    }
                } else {
                    Detection {
                        protocol: guess_protocol(&buf),
                        buf,
                        name: None,
                        ech: false,
                        failure: Some(Reason::Malformed),
                        client_error: None,
                    }
                };
                return done(d, &detector);
            }
            Ok(n) => n,
            Err(e) => {
                let d = Detection {
                    protocol: guess_protocol(&buf),
                    buf,
                    name: None,
                    ech: false,
                    failure: None,
                    client_error: Some(format!("client: {e}")),
                };
                return done(d, &detector);
            }
        };
        let from = buf.len() - n;
        let step = detector.push(&buf[from..]);
        let d = match step {
            Step::NeedMore { .. } => continue,
            Step::Done(found) => Detection {
                buf,
                protocol: flow_protocol(found.protocol),
                name: found.name,
                ech: found.ech,
                failure: None,
                client_error: None,
            },
            Step::Malformed(m) => {
                tracing::debug!(error = %m, "malformed first flight");
                Detection {
                    protocol: guess_protocol(&buf),
                    buf,
                    name: None,
                    ech: false,
                    failure: Some(Reason::Malformed),
                    client_error: None,
                }
            }
            Step::TooLarge => Detection {
                protocol: guess_protocol(&buf),
                buf,
                name: None,
                ech: false,
                failure: Some(Reason::TooLarge),
                client_error: None,
            },
        };
        return done(d, &detector);
    }
}

#[allow(clippy::too_many_arguments)]
async fn connect_and_relay(
    shared: &Shared,
    gen: &Generation,
    client: TcpStream,
    dst: OrigDst,
    v: Verdict,
    first: Vec<u8>,
    protocol: FlowProtocol,
    name: Option<&str>,
    flow: &mut Flow,
    counters: &Counters,
) {
    let reg = &gen.registry;
    let cfg = gen.config();
    let Some(plan) = v.upstream.clone() else {
        flow.decided(shared, reg, &v);
        deny::deny(
            client,
            protocol,
            name,
            dst.port(),
            v.reason.unwrap_or(Reason::NotInRegistry),
        )
        .await;
        return;
    };
    // Resolution counts inside connect_timeout (docs/DESIGN.md §3 step 7).
    let deadline = tokio::time::Instant::now() + cfg.proxy.connect_timeout;
    let (v, addrs) = match shared.dialer.candidates(&plan, reg, &v, deadline).await {
        Ok(a) => (v, a),
        Err(_) => {
            // The name resolves to nothing: deny `dns`, or pass to D
            // under audit / ALLOW_ANY.
            let v2 = reg.dns_failed(dst);
            if v2.decision == Decision::Deny {
                flow.decided(shared, reg, &v2);
                deny::deny(client, protocol, name, dst.port(), Reason::Dns).await;
                return;
            }
            (v2, vec![dst.0])
        }
    };
    flow.decided(shared, reg, &v);
    let up = match shared
        .dialer
        .connect(
            &addrs,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
            flow.hop,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            upstream_failed(shared, reg, &v, client, protocol, e, flow).await;
            return;
        }
    };
    flow.rec.upstream = Some(up.addr);
    let entry = reg.entry_label(&v).to_string();
    let crate::proxy::upstream::Connected {
        stream,
        addr: _,
        guard: _guard,
    } = up;
    write_and_relay(shared, gen, client, stream, first, &entry, flow, counters).await;
}

/// Writes the bytes read during detection upstream, then relays until the
/// flow ends. Bytes are counted as they move, errors included.
#[allow(clippy::too_many_arguments)]
async fn write_and_relay(
    shared: &Shared,
    gen: &Generation,
    client: TcpStream,
    mut upstream: TcpStream,
    first: Vec<u8>,
    entry: &str,
    flow: &mut Flow,
    counters: &Counters,
) {
    let (up_counter, down_counter) = shared.metrics.byte_counters(entry);
    // Server bytes relayed while the client's were being classified.
    down_counter.inc_by(counters.down());
    if !first.is_empty() {
        let idle = gen.config().proxy.idle_timeout;
        let wrote = tokio::time::timeout(idle, upstream.write_all(&first)).await;
        if let Err(e) = wrote.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle_timeout",
            ))
        }) {
            flow.rec.error = Some(format!("upstream: {e}"));
            deny::reset(client);
            deny::reset(upstream);
            return;
        }
        counters.up.fetch_add(first.len() as u64, Ordering::Relaxed);
        up_counter.inc_by(first.len() as u64);
    }
    // The detection buffer (16 KiB reserved) is not kept for the flow's life.
    drop(first);
    let on_bytes = |dir, n| match dir {
        Direction::Up => {
            up_counter.inc_by(n);
        }
        Direction::Down => {
            down_counter.inc_by(n);
        }
    };
    let (error, reset_by) = relay_to_end(
        shared,
        entry,
        client,
        upstream,
        counters,
        gen.config().proxy.idle_timeout,
        on_bytes,
    )
    .await;
    flow.rec.error = error;
    flow.rec.reset_by = reset_by;
}

/// Writes a verdict into a flow's record and counts the flow once in
/// `portcullis_connections_total` (a later verdict, e.g. after a failed
/// connect, updates the record but is not counted again). Shared by the
/// transparent flow and the explicit proxy's requests.
pub(crate) fn record_verdict(
    shared: &Shared,
    reg: &Registry,
    v: &Verdict,
    rec: &mut FlowRecord,
    counted: &mut bool,
) {
    rec.decision = v.decision.as_str();
    rec.reason = v.reason.map(|r| r.as_str());
    let label = reg.entry_label(v).to_string();
    rec.entry = v.entry.map(|_| label.clone());
    if !*counted {
        *counted = true;
        shared
            .metrics
            .connections
            .get_or_create(&ConnLabels {
                decision: v.decision.as_str(),
                protocol: rec.protocol,
                entry: label,
                reason: v.reason.map(|r| r.as_str()).unwrap_or(""),
            })
            .inc();
    }
}

/// Relays a decided flow (transparent, or an explicit tunnel) until it ends
/// or is closed from outside, and says how it ended for the access log:
/// `(error, reset_by)`.
pub(crate) async fn relay_to_end<F>(
    shared: &Shared,
    entry: &str,
    client: TcpStream,
    upstream: TcpStream,
    counters: &crate::relay::Counters,
    idle_timeout: std::time::Duration,
    on_bytes: F,
) -> (Option<String>, Option<&'static str>)
where
    F: Fn(Direction, u64) + Send + Sync,
{
    // Closed from outside: revoke_on_reload (a reload removed the entry) or
    // the end of a drain (see drain::closed). Both sides are reset, not
    // closed with FIN: a FIN would tell the client that a cut stream ended.
    let fds = (client.as_raw_fd(), upstream.as_raw_fd());
    let closed = async {
        let why = crate::drain::closed(shared, entry).await;
        for fd in [fds.0, fds.1] {
            // Both sockets are owned by the relay future of the select! below, which
            // is alive (not yet dropped) while this branch is polled; dropping it
            // afterwards closes them, now with an RST.
            crate::sys::reset_on_close(fd);
        }
        why
    };
    let end = tokio::select! {
        // Built in place: a relay future held in a local and moved into
        // select! would take its size twice in every flow.
        end = crate::relay::relay_with(
            shared.relay_mode,
            client,
            upstream,
            &shared.pipes,
            counters,
            idle_timeout,
            on_bytes,
        ) => end,
        why = closed => return (Some(why.to_string()), None),
    };
    match end {
        RelayEnd::Done => (None, None),
        // Both sides had their say and the client ended with an RST (curl, browsers after
        // TLS): the exchange is over, not failed.
        RelayEnd::ClientReset if counters.up() > 0 && counters.down() > 0 => (None, Some("client")),
        end => (Some(end.to_string()), None),
    }
}

async fn upstream_failed(
    shared: &Shared,
    reg: &Registry,
    v: &Verdict,
    client: TcpStream,
    protocol: FlowProtocol,
    e: ConnectError,
    flow: &mut Flow,
) {
    flow.rec.error = Some(e.to_string());
    shared
        .metrics
        .connect_errors
        .get_or_create(&crate::metrics::EntryLabel {
            entry: reg.entry_label(v).to_string(),
        })
        .inc();
    match protocol {
        FlowProtocol::Http => deny::answer_and_close(client, &deny::http_502()).await,
        _ => deny::reset(client),
    }
}

#[cfg(test)]
mod size_tests {
    /// The size of what an `async fn` taking four arguments returns: its
    /// future, without calling it.
    fn future_size<F, A, B, C, D, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every idle flow holds one boxed `handle` future (plus its task), so
    /// its size is most of the per-flow memory the bench measures (about
    /// 5 KiB per idle flow). A change that grows it must say so here, not
    /// surface later as a slower, fatter proxy. Measured in the test (debug)
    /// build on 2026-12-02: 4,336 bytes, then 4,528 once the relay's end
    /// (revocation, reset_by) became one function shared with the explicit
    /// proxy's tunnels.
    #[test]
    fn the_flow_future_stays_small() {
        let size = future_size(super::handle);
        eprintln!("flow::handle future: {size} bytes");
        assert!(size <= 4608, "flow::handle future grew to {size} bytes");
    }
}
