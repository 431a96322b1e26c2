//! Explicit proxy stage (docs/DESIGN.md §3 "Explicit proxy"): the
//! `explicit_listen` listeners for workloads that cannot have redirect rules.
//! A connection's first request head is read here (httparse, bounded size and
//! time): `CONNECT host:port` becomes a tunnel relayed by the splice relay;
//! anything else is handed to hyper for absolute-form `http://` proxying
//! (see [`http`]). The name is the request's authority: the proxy decides on
//! it, resolves it itself, and never dials loopback, link-local,
//! unspecified, multicast or its own addresses unless the matched entry's
//! `addresses` list them.

pub mod http;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Resolution;
use crate::detect::{Detector, Step};
use crate::name::{normalize, Presented};
use crate::net::{canonical_addr, canonical_ip, OrigDst};
use crate::proxy::deny;
use crate::proxy::flow::write_and_relay;
use crate::proxy::record::FlowLog;
use crate::registry::{Decision, Protocol, Reason, Registry, Upstream, Verdict};
use crate::state::{Generation, Shared};
use crate::upstream::{ConnectError, Connected};
use crate::vocab::Mode;

/// Largest CONNECT / first request head read by hand (the rest is hyper's).
pub const MAX_CONNECT_HEAD: usize = 16 * 1024;

/// What every explicit connection reads besides [`Shared`].
pub struct Explicit {
    /// This host's interface addresses when the listeners started: the
    /// proxy never dials itself through the explicit path.
    pub own: Vec<IpAddr>,
}

/// Binds every `explicit_listen` address and starts accepting.
pub fn start(shared: Arc<Shared>, addrs: &[SocketAddr]) -> io::Result<()> {
    let listeners = super::bind_listeners(addrs)?;
    let ctx = Arc::new(Explicit {
        own: own_addresses(),
    });
    for l in listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "explicit proxy listening");
        }
        tokio::spawn(accept_loop(shared.clone(), ctx.clone(), l));
    }
    Ok(())
}

fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(ifs) = nix::ifaddrs::getifaddrs() {
        for i in ifs {
            let Some(a) = i.address else { continue };
            if let Some(v4) = a.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = a.as_sockaddr_in6() {
                out.push(canonical_ip(IpAddr::V6(v6.ip())));
            }
        }
    }
    out
}

/// Whether the explicit path may never dial `ip` (unless an entry's
/// `addresses` list it): loopback, link-local (cloud metadata at
/// 169.254.169.254 included), unspecified, multicast, broadcast, or ours.
pub fn forbidden(ip: IpAddr, own: &[IpAddr]) -> bool {
    let ip = canonical_ip(ip);
    let special = match ip {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.octets()[0] == 0
                || a.is_multicast()
                || a.is_broadcast()
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (a.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    special || own.contains(&ip)
}

/// Whether `peer` may use the explicit listener at `local`: listed in
/// `explicit_clients`, or (when that is empty) arriving on a loopback
/// listener. Read from the current generation, so a reload applies to new
/// connections.
pub fn client_allowed(clients: &[crate::net::Cidr], local: SocketAddr, peer: SocketAddr) -> bool {
    let ip = canonical_ip(peer.ip());
    if clients.is_empty() {
        return local.ip().is_loopback() && ip.is_loopback();
    }
    clients.iter().any(|c| c.contains(ip))
}

async fn accept_loop(shared: Arc<Shared>, ctx: Arc<Explicit>, listener: TcpListener) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let mut last_warn: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                shared.metrics.accept_errors.inc();
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(%local, error = %e, "explicit accept failed (file descriptors exhausted?): backing off");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gen = shared.generation();
        if !client_allowed(&gen.config().proxy.explicit_clients, local, peer) {
            let mut flow = FlowLog::new(&shared, peer, Mode::Explicit);
            flow.decided(&gen.registry, &Verdict::refused(Reason::ClientNotAllowed));
            flow.rec.error = Some("client outside explicit_clients".into());
            deny::reset(stream);
            continue;
        }
        let Some(guard) = shared.admit() else {
            let mut flow = FlowLog::new(&shared, peer, Mode::Explicit);
            flow.decided(&gen.registry, &Verdict::refused(Reason::Overload));
            flow.rec.error = Some(format!(
                "max_connections ({}) reached",
                shared.max_connections
            ));
            deny::reset(stream);
            continue;
        };
        let s = shared.clone();
        let c = ctx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let span = tracing::debug_span!("explicit", client = %peer, listener = %local);
            let conn = Box::pin(handle(s, c, stream, peer));
            tracing::Instrument::instrument(conn, span).await;
        });
    }
}

/// Connects to `addrs` within what is left of the flow's `connect_timeout`
/// (resolution took the rest). Explicit upstreams start at hop 0: they are
/// never a redirected flow coming back.
async fn dial<'a>(
    shared: &'a Shared,
    addrs: &[SocketAddr],
    deadline: tokio::time::Instant,
) -> Result<crate::upstream::Connected<'a>, ConnectError> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    shared.dialer.connect(addrs, left, 0).await
}

/// The record of a request for `target:port`: its authority, name and
/// (for an IP literal) destination are known before anything is decided.
pub(crate) fn explicit_log(
    shared: &Arc<Shared>,
    client: SocketAddr,
    target: &Target,
    port: u16,
) -> FlowLog {
    let mut log = FlowLog::new(shared, client, Mode::Explicit);
    log.rec.authority = Some(target.authority(port));
    log.rec.name = target.name().map(str::to_string);
    log.rec.dst = target.ip().map(|ip| SocketAddr::new(ip, port));
    log
}

/// The host part of a request's authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A DNS name, normalised.
    Name(String),
    /// An IP literal: matches only entries whose `addresses` contain it.
    Ip(IpAddr),
}

impl Target {
    /// Parses the host of an authority (`[v6]` brackets allowed).
    pub fn parse(host: &str) -> Option<Target> {
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(host);
        match normalize(host) {
            Presented::Name(n) => Some(Target::Name(n)),
            Presented::IpLiteral => unbracketed
                .trim_end_matches('.')
                .parse::<IpAddr>()
                .ok()
                .map(|ip| Target::Ip(canonical_ip(ip))),
            Presented::Invalid => None,
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Target::Name(n) => Some(n),
            Target::Ip(_) => None,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Target::Name(_) => None,
            Target::Ip(ip) => Some(*ip),
        }
    }

    pub fn authority(&self, port: u16) -> String {
        match self {
            Target::Name(n) => format!("{n}:{port}"),
            Target::Ip(ip) => SocketAddr::new(*ip, port).to_string(),
        }
    }
}

/// Splits a CONNECT target (authority-form `host:port`, `[v6]:port`).
pub fn parse_authority(s: &str) -> Option<(Target, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || host.contains('@') || host.contains('/') {
        return None;
    }
    if host.contains(':') && !host.starts_with('[') {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some((Target::parse(host)?, port))
}

/// The entry an explicit request for `target` on `port` matches, with the
/// protocol of its port there: an exact host wins over wildcards, a longer
/// wildcard over a shorter one, then the earlier entry. An IP literal
/// matches only entries whose `addresses` contain it. With `protocol`, only
/// ports of that protocol count (TLS flows match TLS ports, and so on).
pub fn match_entry(
    reg: &Registry,
    target: &Target,
    port: u16,
    protocol: Option<Protocol>,
) -> Result<(usize, Protocol), Reason> {
    let mut best: Option<((u8, usize), usize, Protocol)> = None;
    for (i, e) in reg.entries().iter().enumerate() {
        let Some(p) = e.port(port) else { continue };
        let wanted = match protocol {
            None => true,
            Some(Protocol::Tls) => p.protocol == Protocol::Tls,
            Some(Protocol::Http) => p.protocol == Protocol::Http,
            Some(Protocol::Tcp) => p.protocol == Protocol::Tcp,
        };
        if !wanted {
            continue;
        }
        let rank = match target {
            Target::Ip(ip) => {
                if e.addresses.iter().any(|c| c.contains(*ip)) {
                    Some((0u8, 0usize))
                } else {
                    None
                }
            }
            Target::Name(n) => e
                .hosts
                .iter()
                .filter(|h| h.matches(n))
                .map(|h| match h {
                    crate::name::HostPattern::Exact(_) => (0u8, 0usize),
                    crate::name::HostPattern::Wildcard(s) => (1u8, usize::MAX - s.len()),
                })
                .min(),
        };
        if let Some(r) = rank {
            if best.as_ref().is_none_or(|(b, _, _)| r < *b) {
                best = Some((r, i, p.protocol));
            }
        }
    }
    best.map(|(_, i, p)| (i, p)).ok_or(Reason::NotInRegistry)
}

/// The verdict for an explicit request: an entry allows it, or the policy
/// turns the reason into deny, audit or passthrough.
pub fn verdict(reg: &Registry, entry: Result<usize, Reason>, port: u16) -> Verdict {
    match entry {
        Ok(i) => Verdict {
            decision: Decision::Allow,
            entry: Some(i),
            reason: None,
            upstream: None,
        },
        Err(r) => {
            // No original destination here: the upstream is chosen by
            // `upstream_addrs`, not by the registry.
            let mut v = reg.refuse(r, OrigDst::new(SocketAddr::from(([0, 0, 0, 0], port))));
            v.upstream = None;
            v
        }
    }
}

/// Where to connect for an allowed or passed request: the entry's STATIC
/// endpoints, or what the name resolves to (restricted to the entry's
/// `addresses`, if any), without the addresses the explicit path never
/// dials. `Err` is the reason to deny with.
pub async fn upstream_addrs(
    shared: &Shared,
    gen: &Generation,
    ctx: &Explicit,
    v: &Verdict,
    target: &Target,
    port: u16,
) -> Result<(Vec<SocketAddr>, tokio::time::Instant), Reason> {
    let entry = v.entry.map(|i| gen.registry.entry(i));
    let plan = match (entry, target) {
        (Some(e), _) if e.resolution == Resolution::Static => Upstream::Static(
            e.endpoints
                .iter()
                .map(|ep| SocketAddr::new(ep.address, ep.port.unwrap_or(port)))
                .collect(),
        ),
        (_, Target::Ip(ip)) => Upstream::Original(SocketAddr::new(*ip, port)),
        (_, Target::Name(n)) => Upstream::Resolve {
            name: n.clone(),
            port,
            dst: SocketAddr::from(([0, 0, 0, 0], port)),
        },
    };
    let timeout = gen.config().proxy.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let lookup = shared.dialer.candidates(&plan, &gen.registry, v, deadline);
    let addrs = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(a)) => a,
        Ok(Err(_)) | Err(_) => return Err(Reason::Dns),
    };
    let listed = |ip: IpAddr| entry.is_some_and(|e| e.addresses.iter().any(|c| c.contains(ip)));
    let static_plan = matches!(plan, Upstream::Static(_));
    let in_entry: Vec<SocketAddr> = addrs
        .into_iter()
        .map(canonical_addr)
        .filter(|a| static_plan || entry.is_none_or(|e| e.admits_ip(a.ip())))
        .collect();
    if in_entry.is_empty() {
        return Err(Reason::AddressMismatch);
    }
    let allowed: Vec<SocketAddr> = in_entry
        .into_iter()
        .filter(|a| listed(a.ip()) || !forbidden(a.ip(), &ctx.own))
        .collect();
    if allowed.is_empty() {
        return Err(Reason::ForbiddenAddress);
    }
    Ok((allowed, deadline))
}

/// A stream that first replays bytes already read from it.
pub struct PrefixedIo<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> PrefixedIo<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        PrefixedIo {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The first request head of a connection.
enum Head {
    /// CONNECT: its authority text, and bytes that followed the head.
    Connect(String, Vec<u8>),
    /// Anything else: every byte read so far (hyper parses it again).
    Other(Vec<u8>),
}

/// Reads until the first request head is complete (at most
/// [`MAX_CONNECT_HEAD`] bytes, within `hello_timeout`).
async fn read_head(stream: &mut TcpStream, timeout: Duration) -> Result<Head, (Reason, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if req.method == Some("CONNECT") {
                    let target = req.path.unwrap_or_default().to_string();
                    return Ok(Head::Connect(target, buf[len..].to_vec()));
                }
                return Ok(Head::Other(buf));
            }
            Ok(httparse::Status::Partial) => {
                // A request that is not CONNECT is hyper's to frame: hand it
                // over as soon as the method shows it.
                if let Some(m) = req.method {
                    if m != "CONNECT" {
                        return Ok(Head::Other(buf));
                    }
                }
            }
            Err(e) => return Err((Reason::Malformed, format!("request head: {e}"))),
        }
        if buf.len() >= MAX_CONNECT_HEAD {
            return Err((Reason::TooLarge, "request head too large".into()));
        }
        buf.reserve(4096);
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            Err(_) => return Err((Reason::Timeout, "no complete request head in time".into())),
            Ok(Ok(0)) if buf.is_empty() => return Err((Reason::Malformed, String::new())),
            Ok(Ok(0)) => return Err((Reason::Malformed, "client closed mid-head".into())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err((Reason::Malformed, format!("client: {e}"))),
        }
    }
}

/// A simple answer to a client before any tunnel exists, then close.
pub fn status_answer(code: u16, text: &str, reason: Option<Reason>, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(r) = reason {
        out.push_str(&format!("X-Portcullis-Reason: {}\r\n", r.as_str()));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

async fn handle(shared: Arc<Shared>, ctx: Arc<Explicit>, mut stream: TcpStream, peer: SocketAddr) {
    let gen = shared.generation();
    let head = read_head(&mut stream, gen.config().proxy.hello_timeout).await;
    match head {
        Ok(Head::Other(buf)) => http::serve(shared, ctx, stream, buf, peer).await,
        Ok(Head::Connect(authority, rest)) => {
            connect(&shared, &gen, &ctx, stream, peer, &authority, rest).await
        }
        Err((_, e)) if e.is_empty() => {
            // Connected and left without a byte: not a request.
        }
        Err((reason, e)) => {
            let mut flow = FlowLog::new(&shared, peer, Mode::Explicit);
            flow.rec.protocol = Protocol::Http;
            flow.decided(&gen.registry, &Verdict::refused(reason));
            flow.rec.error = Some(e);
            let (code, text) = match reason {
                Reason::Timeout => (408, "Request Timeout"),
                Reason::TooLarge => (431, "Request Header Fields Too Large"),
                _ => (400, "Bad Request"),
            };
            let body = format!("portcullis: bad proxy request: {}\n", reason.as_str());
            deny::answer_and_close(stream, &status_answer(code, text, Some(reason), &body)).await;
        }
    }
}

/// `CONNECT host:port` (docs/DESIGN.md §3 "Explicit proxy").
async fn connect(
    shared: &Arc<Shared>,
    gen: &Generation,
    ctx: &Explicit,
    mut client: TcpStream,
    peer: SocketAddr,
    authority: &str,
    rest: Vec<u8>,
) {
    let reg = &gen.registry;
    let Some((target, port)) = parse_authority(authority) else {
        let mut flow = FlowLog::new(shared, peer, Mode::Explicit);
        flow.decided(reg, &Verdict::refused(Reason::Malformed));
        flow.rec.error = Some(format!("CONNECT target {authority:?} is not host:port"));
        let body = "portcullis: CONNECT needs host:port\n";
        deny::answer_and_close(
            client,
            &status_answer(400, "Bad Request", Some(Reason::Malformed), body),
        )
        .await;
        return;
    };
    let mut flow = explicit_log(shared, peer, &target, port);
    let first = match_entry(reg, &target, port, None);
    let kind = first.map(|(_, p)| p).ok();
    match kind {
        Some(Protocol::Tls) | Some(Protocol::Http) => {
            tunnel_detect(shared, gen, ctx, client, &target, port, rest, flow).await
        }
        _ => {
            // A TCP port, or no entry at all: decide on the name now.
            flow.rec.protocol = Protocol::Tcp;
            let v = verdict(reg, first.map(|(i, _)| i), port);
            if v.decision == Decision::Deny {
                flow.decided(reg, &v);
                deny_before_200(client, &target, port, v.reason).await;
                return;
            }
            let (addrs, deadline) = match upstream_addrs(shared, gen, ctx, &v, &target, port).await
            {
                Ok(a) => a,
                Err(r) => {
                    flow.decided(reg, &Verdict::refused(r));
                    deny_before_200(client, &target, port, Some(r)).await;
                    return;
                }
            };
            flow.decided(reg, &v);
            let up = match dial(shared, &addrs, deadline).await {
                Ok(c) => c,
                Err(e) => {
                    connect_failed(shared, reg, &v, &mut flow, &e);
                    let (code, text) = match e {
                        ConnectError::Timeout => (504, "Gateway Timeout"),
                        _ => (502, "Bad Gateway"),
                    };
                    let body = format!("portcullis: upstream unreachable: {}\n", e.as_str());
                    deny::answer_and_close(client, &status_answer(code, text, None, &body)).await;
                    return;
                }
            };
            flow.rec.upstream = Some(up.addr);
            if let Err(e) = client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
            {
                flow.rec.error = Some(format!("client: {e}"));
                return;
            }
            let entry = reg.entry_label(&v);
            let Connected {
                stream,
                addr: _,
                guard,
            } = up;
            let first = rest;
            write_and_relay(shared, gen, &mut flow, client, stream, first, entry, guard).await;
        }
    }
}

/// Denied before `200`: `403` with the reason in a header and the body.
async fn deny_before_200(client: TcpStream, target: &Target, port: u16, reason: Option<Reason>) {
    let r = reason.unwrap_or(Reason::NotInRegistry);
    let shown = target.authority(port);
    let body = format!("portcullis: {shown} denied: {}\n", r.as_str());
    deny::answer_and_close(client, &status_answer(403, "Forbidden", Some(r), &body)).await;
}

pub(crate) fn connect_failed(
    shared: &Shared,
    reg: &Registry,
    v: &Verdict,
    flow: &mut FlowLog,
    e: &ConnectError,
) {
    flow.rec.error = Some(e.to_string());
    shared
        .metrics
        .connect_errors
        .get_or_create(&crate::metrics::EntryLabel {
            entry: reg.entry_label(v).to_string(),
        })
        .inc();
}

/// CONNECT to a TLS or HTTP port of an entry: `200`, then the tunnel's first
/// bytes go through our detector; the name inside must be the CONNECT name;
/// only an allowed flow gets an upstream connection.
#[allow(clippy::too_many_arguments)]
async fn tunnel_detect(
    shared: &Arc<Shared>,
    gen: &Generation,
    ctx: &Explicit,
    mut client: TcpStream,
    target: &Target,
    port: u16,
    mut buf: Vec<u8>,
    mut flow: FlowLog,
) {
    let reg = &gen.registry;
    if let Err(e) = client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
    {
        flow.rec.error = Some(format!("client: {e}"));
        flow.decided(reg, &Verdict::refused(Reason::Malformed));
        return;
    }
    let start = tokio::time::Instant::now();
    let deadline = start + gen.config().proxy.hello_timeout;
    let mut detector = Detector::new();
    let mut step = if buf.is_empty() {
        Step::NeedMore { at_least: 1 }
    } else {
        detector.push(&buf)
    };
    let mut client_error: Option<String> = None;
    let mut failure: Option<Reason> = None;
    while !step.is_final() {
        if buf.len() >= crate::detect::MAX_HEAD + 16 * 1024 {
            failure = Some(Reason::TooLarge);
            break;
        }
        buf.reserve(16 * 1024);
        let from = buf.len();
        match tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await {
            Err(_) => {
                failure = Some(Reason::Timeout);
                break;
            }
            Ok(Ok(0)) => {
                if buf.is_empty() {
                    client_error = Some("client closed the tunnel before sending".into());
                }
                failure = Some(Reason::Malformed);
                break;
            }
            Ok(Ok(_)) => step = detector.push(&buf[from..]),
            Ok(Err(e)) => {
                client_error = Some(format!("client: {e}"));
                failure = Some(Reason::Malformed);
                break;
            }
        }
    }
    shared.metrics.detect_examined.inc_by(detector.examined());
    shared
        .metrics
        .detect_seconds
        .observe(start.elapsed().as_secs_f64());
    let (protocol, inner) = match step {
        Step::Done(d) => {
            flow.rec.ech = d.ech;
            (d.protocol, d.name)
        }
        Step::Malformed(m) => {
            tracing::debug!(error = %m, "malformed first flight in a CONNECT tunnel");
            failure = Some(Reason::Malformed);
            (crate::detect::guess_protocol(&buf), None)
        }
        Step::TooLarge => {
            failure = Some(Reason::TooLarge);
            (crate::detect::guess_protocol(&buf), None)
        }
        Step::NeedMore { .. } => (crate::detect::guess_protocol(&buf), None),
    };
    flow.rec.protocol = protocol;
    // The name inside the tunnel must be the one the CONNECT asked for: SNI
    // absent or equal, Host equal (an IP literal inside is no name).
    let mismatch = match (protocol, inner.as_deref(), target) {
        (Protocol::Tls, Some(sni), Target::Name(n)) if sni != n => Some(Reason::SniMismatch),
        (Protocol::Tls, Some(_), Target::Ip(_)) => Some(Reason::SniMismatch),
        (Protocol::Http, Some(h), Target::Name(n)) if h != n => Some(Reason::HostMismatch),
        (Protocol::Http, None, Target::Name(_)) => Some(Reason::HostMismatch),
        (Protocol::Http, Some(_), Target::Ip(_)) => Some(Reason::HostMismatch),
        _ => None,
    };
    if let (Some(n), Some(Reason::SniMismatch | Reason::HostMismatch)) = (&inner, mismatch) {
        flow.rec.error = Some(format!("the tunnel presents {n}"));
    }
    let entry = match failure.or(mismatch) {
        Some(r) => Err(r),
        None => match_entry(reg, target, port, Some(protocol)).map(|(i, _)| i),
    };
    let v = verdict(reg, entry, port);
    if let Some(e) = client_error {
        flow.decided(reg, &v);
        flow.rec.error = Some(e);
        return;
    }
    if v.decision == Decision::Deny {
        flow.decided(reg, &v);
        deny::deny(
            client,
            protocol,
            target.name(),
            port,
            v.reason.unwrap_or(Reason::NotInRegistry),
        )
        .await;
        return;
    }
    let (addrs, deadline) = match upstream_addrs(shared, gen, ctx, &v, target, port).await {
        Ok(a) => a,
        Err(r) => {
            flow.decided(reg, &Verdict::refused(r));
            deny::deny(client, protocol, target.name(), port, r).await;
            return;
        }
    };
    flow.decided(reg, &v);
    let up = match dial(shared, &addrs, deadline).await {
        Ok(c) => c,
        Err(e) => {
            connect_failed(shared, reg, &v, &mut flow, &e);
            match protocol {
                Protocol::Http => deny::answer_and_close(client, &deny::http_502()).await,
                _ => deny::reset(client),
            }
            return;
        }
    };
    flow.rec.upstream = Some(up.addr);
    let entry = reg.entry_label(&v);
    let Connected {
        stream,
        addr: _,
        guard,
    } = up;
    write_and_relay(shared, gen, &mut flow, client, stream, buf, entry, guard).await;
}

/// `explain --connect HOST:PORT [--sni NAME | --host NAME]` or
/// `explain --url http://...`: the decision the explicit proxy would take.
/// Like `explain`, it never resolves; it says what would be resolved.
pub fn explain(
    cfg: Arc<crate::config::Config>,
    connect: Option<&str>,
    url: Option<&str>,
    sni: Option<&str>,
    host: Option<&str>,
) -> Result<String, String> {
    use std::fmt::Write as _;
    let reg = Registry::new(cfg.clone());
    let mut out = String::new();
    let (target, port, protocol, inner, request) = match (connect, url) {
        (Some(c), _) => {
            let (t, port) =
                parse_authority(c).ok_or_else(|| format!("--connect {c:?}: expected HOST:PORT"))?;
            let kind = match_entry(&reg, &t, port, None).ok().map(|(_, p)| p);
            let (protocol, inner) = match (sni, host, kind) {
                (Some(s), _, _) => (Protocol::Tls, Some(s.to_string())),
                (_, Some(h), _) => (Protocol::Http, Some(h.to_string())),
                // Without --sni/--host: a client presenting the CONNECT name.
                (_, _, Some(Protocol::Tls)) => (Protocol::Tls, t.name().map(str::to_string)),
                (_, _, Some(Protocol::Http)) => (Protocol::Http, t.name().map(str::to_string)),
                _ => (Protocol::Tcp, None),
            };
            let detect = matches!(kind, Some(Protocol::Tls | Protocol::Http));
            (
                t,
                port,
                protocol,
                inner,
                if detect {
                    "connect-detect"
                } else {
                    "connect-tcp"
                },
            )
        }
        (None, Some(u)) => {
            let uri: hyper::Uri = u.parse().map_err(|e| format!("--url {u:?}: {e}"))?;
            let (t, port) = http::absolute_target(&hyper::Method::GET, &uri)
                .map_err(|e| format!("--url {u:?}: {e} (the proxy answers 400)"))?;
            (
                t,
                port,
                Protocol::Http,
                host.map(str::to_string),
                "absolute-form",
            )
        }
        (None, None) => return Err("explain needs --dst, --connect or --url".into()),
    };
    let _ = writeln!(
        out,
        "request: {} {} (explicit proxy)",
        if request == "absolute-form" {
            "GET http://"
        } else {
            "CONNECT"
        },
        target.authority(port)
    );
    match request {
        "connect-detect" => {
            let _ = writeln!(out, "port {port}: an entry's {} port: the proxy answers 200, reads the tunnel's first bytes with its detector, and decides; the SNI must be absent or {0}, the Host must be {0} (else sni_mismatch / host_mismatch)", target.authority(port));
        }
        "connect-tcp" => {
            let _ = writeln!(out, "port {port}: no TLS/HTTP entry for this name: decided on the name before answering (403 when denied; else connect, then 200, or 502/504)");
        }
        _ => {}
    }
    let presented = inner.as_deref().map(Target::parse);
    let mismatch = match (&presented, protocol) {
        (Some(None), _) => Some(Reason::Malformed),
        (Some(Some(p)), Protocol::Tls) if *p != target => Some(Reason::SniMismatch),
        (Some(Some(p)), Protocol::Http) if *p != target => Some(Reason::HostMismatch),
        _ => None,
    };
    let entry = match mismatch {
        Some(r) => Err(r),
        None => match_entry(&reg, &target, port, Some(protocol)).map(|(i, _)| i),
    };
    let v = verdict(&reg, entry, port);
    if let Some(i) = &inner {
        let _ = writeln!(out, "presented inside: {} {i:?}", protocol);
    }
    let _ = writeln!(out, "decision: {}", v.decision.as_str());
    let _ = writeln!(
        out,
        "reason: {}",
        v.reason.map(|r| r.as_str()).unwrap_or("matched")
    );
    match v.entry {
        Some(i) => {
            let e = reg.entry(i);
            let _ = writeln!(out, "entry: {} ({}:{})", e.name, e.source.display(), e.line);
        }
        None => {
            let _ = writeln!(out, "entry: none ({})", reg.entry_label(&v));
        }
    }
    if v.decision == Decision::Deny {
        let _ = writeln!(
            out,
            "upstream: none (denied: no upstream connection is opened)"
        );
    } else {
        let e = v.entry.map(|i| reg.entry(i));
        match (e, &target) {
            (Some(e), _) if e.resolution == Resolution::Static => {
                let l: Vec<String> = e
                    .endpoints
                    .iter()
                    .map(|ep| SocketAddr::new(ep.address, ep.port.unwrap_or(port)).to_string())
                    .collect();
                let _ = writeln!(
                    out,
                    "upstream: {} (STATIC endpoints, in turn)",
                    l.join(", ")
                );
            }
            (_, Target::Ip(ip)) => {
                let _ = writeln!(out, "upstream: {}", SocketAddr::new(*ip, port));
            }
            (_, Target::Name(n)) => {
                let _ = writeln!(out, "upstream: would resolve {n} (A and AAAA; explain never resolves) and connect to the answers on port {port} in turn{}", match e {
                    Some(e) if !e.addresses.is_empty() => " that are in the entry's addresses",
                    _ => "",
                });
            }
        }
        let _ = writeln!(out, "note: whatever the policy, the explicit path never connects to loopback, link-local (169.254.0.0/16, fe80::/10), unspecified, multicast or the proxy's own addresses unless the matched entry's addresses list them (reason forbidden_address)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn reg(toml: &str) -> Registry {
        Registry::new(Arc::new(
            Config::parse(Path::new("t.toml"), toml).expect("valid"),
        ))
    }

    const ENTRIES: &str = r#"
[proxy]
listen = []
explicit_listen = ["127.0.0.1:3128"]
[[service_entry]]
name = "api"
hosts = ["api.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }]
[[service_entry]]
name = "files"
hosts = ["*.files.example.com"]
ports = [{ number = 443, protocol = "TLS" }]
[[service_entry]]
name = "db"
hosts = ["db.example.com"]
resolution = "DNS"
ports = [{ number = 5432, protocol = "TCP" }]
[[service_entry]]
name = "metadata"
hosts = ["meta.internal"]
addresses = ["169.254.169.254/32"]
resolution = "NONE"
ports = [{ number = 80, protocol = "HTTP" }, { number = 7000, protocol = "TCP" }]
"#;

    #[test]
    fn authority_forms() {
        assert_eq!(
            parse_authority("API.example.com.:443"),
            Some((Target::Name("api.example.com".into()), 443))
        );
        assert_eq!(
            parse_authority("[2001:db8::10]:443"),
            Some((Target::Ip("2001:db8::10".parse().unwrap()), 443))
        );
        assert_eq!(
            parse_authority("192.0.2.10:7000"),
            Some((Target::Ip("192.0.2.10".parse().unwrap()), 7000))
        );
        for bad in [
            "api.example.com",
            "api.example.com:0",
            "api.example.com:99999",
            ":443",
            "user@api.example.com:443",
            "2001:db8::10:443",
            "bad_name!:443",
            "http://api.example.com:443",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn matching_by_name_port_and_protocol() {
        let r = reg(ENTRIES);
        let name = |n: &str| Target::Name(n.into());
        assert_eq!(
            match_entry(&r, &name("api.example.com"), 443, None),
            Ok((0, Protocol::Tls))
        );
        assert_eq!(
            match_entry(&r, &name("api.example.com"), 80, None),
            Ok((0, Protocol::Http))
        );
        assert_eq!(
            match_entry(&r, &name("x.files.example.com"), 443, None),
            Ok((1, Protocol::Tls))
        );
        assert_eq!(
            match_entry(&r, &name("files.example.com"), 443, None),
            Err(Reason::NotInRegistry)
        );
        assert_eq!(
            match_entry(&r, &name("db.example.com"), 5432, None),
            Ok((2, Protocol::Tcp))
        );
        // HTTP on a TLS-only port matches nothing.
        assert_eq!(
            match_entry(&r, &name("api.example.com"), 443, Some(Protocol::Http)),
            Err(Reason::NotInRegistry)
        );
        // An IP literal matches only entries whose addresses contain it.
        assert_eq!(
            match_entry(&r, &Target::Ip("192.0.2.10".parse().unwrap()), 443, None),
            Err(Reason::NotInRegistry)
        );
        assert_eq!(
            match_entry(
                &r,
                &Target::Ip("169.254.169.254".parse().unwrap()),
                7000,
                None
            ),
            Ok((3, Protocol::Tcp))
        );
    }

    #[test]
    fn forbidden_addresses() {
        let own = vec!["192.0.2.2".parse().unwrap()];
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "192.0.2.2",
        ] {
            assert!(forbidden(ip.parse().unwrap(), &own), "{ip}");
        }
        for ip in ["192.0.2.10", "2001:db8::10", "10.0.0.1", "fec0::1"] {
            assert!(!forbidden(ip.parse().unwrap(), &own), "{ip}");
        }
    }

    #[test]
    fn clients() {
        let lo: SocketAddr = "127.0.0.1:3128".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:3128".parse().unwrap();
        let c = vec!["198.18.0.0/24".parse().unwrap()];
        assert!(client_allowed(&[], lo, "127.0.0.1:5000".parse().unwrap()));
        assert!(!client_allowed(
            &[],
            any,
            "198.18.0.2:5000".parse().unwrap()
        ));
        assert!(client_allowed(&c, any, "198.18.0.2:5000".parse().unwrap()));
        assert!(client_allowed(
            &c,
            any,
            "[::ffff:198.18.0.2]:5000".parse().unwrap()
        ));
        assert!(!client_allowed(&c, any, "198.18.1.2:5000".parse().unwrap()));
    }

    #[test]
    fn explain_explicit_requests() {
        let cfg = Arc::new(Config::parse(Path::new("t.toml"), ENTRIES).expect("valid"));
        let x = |c: Option<&str>, u: Option<&str>, sni: Option<&str>| {
            explain(cfg.clone(), c, u, sni, None).expect("explained")
        };
        let t = x(Some("api.example.com:443"), None, None);
        assert!(
            t.contains("decision: allow") && t.contains("entry: api"),
            "{t}"
        );
        assert!(t.contains("answers 200"), "{t}");
        let t = x(Some("api.example.com:443"), None, Some("www.example.org"));
        assert!(t.contains("reason: sni_mismatch"), "{t}");
        let t = x(Some("www.example.org:443"), None, None);
        assert!(
            t.contains("decision: deny") && t.contains("not_in_registry"),
            "{t}"
        );
        let t = x(Some("db.example.com:5432"), None, None);
        assert!(
            t.contains("decision: allow") && t.contains("before answering"),
            "{t}"
        );
        let t = x(None, Some("http://api.example.com/x"), None);
        assert!(t.contains("decision: allow"), "{t}");
        assert!(explain(
            cfg.clone(),
            None,
            Some("https://api.example.com/"),
            None,
            None
        )
        .is_err());
        assert!(explain(cfg, Some("nope"), None, None, None).is_err());
    }

    #[tokio::test]
    async fn prefixed_io_replays_then_reads() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = PrefixedIo::new(b"hello".to_vec(), b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
