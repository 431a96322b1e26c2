//! Serving stage of the `health` and `admin` listeners (docs/DESIGN.md §4):
//! each connection is admitted under a cap per peer address and a cap in
//! total, then served by hyper's HTTP/1 connection with a header-read
//! timeout and an idle timeout. Both caps are held as permits for the
//! connection's whole life, so the listeners' file descriptors are bounded
//! and reserved inside the budget `max_connections = "auto"` computes
//! (`reserved_fds`); no flood of them, health being reachable from other
//! hosts, can cost an egress flow.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ProxySettings;
use crate::metrics::{EndpointLabels, ListenerLabel};
use crate::state::Shared;

/// How many connections one listener holds at once, in total and per peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_peer: usize,
}

/// `health` (kubelet probes, Prometheus; reachable from other hosts). A
/// probe or a scrape holds one connection for a moment; eight per address
/// leave room for a node's liveness, readiness and startup probes and a
/// scraper, and one flooding host takes at most 8 of the 64.
pub const HEALTH_LIMITS: Limits = Limits {
    total: 64,
    per_peer: 8,
};

/// `admin` (local: the operator, `portcullis status`, `wait`).
pub const ADMIN_LIMITS: Limits = Limits {
    total: 32,
    per_peer: 16,
};

/// From the moment a connection may send a request head (accept, or the end
/// of the previous response on a kept-alive connection) until the head is
/// complete. Probes and scrapers send theirs at once.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection on which no byte has moved either way for this long (a
/// client that stopped reading a response, or stalled a body) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest request head accepted (hyper's read buffer; its floor is 8 KiB).
const MAX_BUF: usize = 16 * 1024;

/// File descriptors the enabled listeners may hold: their listening socket,
/// their connection cap, and the one connection being refused at a time.
pub fn reserved_fds(proxy: &ProxySettings) -> u64 {
    // what a listener may hold (its caps count all its addresses together),
    // plus two for its listening sockets (one per family)
    let one = |on: bool, l: Limits| if on { 2 + l.total as u64 } else { 0 };
    one(!proxy.health.is_empty(), HEALTH_LIMITS) + one(proxy.admin.is_some(), ADMIN_LIMITS)
}

/// Whom a per-peer cap counts together. Every loopback address is one peer
/// (a local process can pick any source in 127.0.0.0/8); an IPv6 peer is its
/// /64 (one host usually holds a whole /64); an IPv4-mapped IPv6 address is
/// its IPv4 address.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PeerKey {
    Loopback,
    V4(std::net::Ipv4Addr),
    V6Prefix64(u64),
}

impl PeerKey {
    pub fn of(ip: IpAddr) -> PeerKey {
        let ip = crate::net::canonical_ip(ip);
        if ip.is_loopback() {
            return PeerKey::Loopback;
        }
        match ip {
            IpAddr::V4(a) => PeerKey::V4(a),
            IpAddr::V6(a) => PeerKey::V6Prefix64((u128::from(a) >> 64) as u64),
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Loopback => f.write_str("loopback"),
            PeerKey::V4(a) => write!(f, "{a}"),
            PeerKey::V6Prefix64(p) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*p) << 64)),
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    PeerLimit,
    TotalLimit,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::PeerLimit => "peer_limit",
            Refused::TotalLimit => "total_limit",
        }
    }
}

/// The caps of one listener. The total is a semaphore whose owned permit a
/// connection holds until it is closed; the per-peer count is checked and
/// taken under one lock. Both are exact however many accept loops share them.
pub struct ConnLimiter {
    pub name: &'static str,
    pub limits: Limits,
    total: Arc<Semaphore>,
    peers: Mutex<HashMap<PeerKey, usize>>,
}

/// A connection's place under both caps; dropping it gives both back.
pub struct ConnPermit {
    _total: OwnedSemaphorePermit,
    limiter: Arc<ConnLimiter>,
    key: PeerKey,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limiter.release_peer(self.key);
    }
}

impl ConnLimiter {
    pub fn new(name: &'static str, limits: Limits) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            name,
            limits,
            total: Arc::new(Semaphore::new(limits.total.min(Semaphore::MAX_PERMITS))),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for a connection from `ip`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let key = PeerKey::of(ip);
        {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let n = peers.entry(key).or_insert(0);
            if *n >= self.limits.per_peer {
                return Err(Refused::PeerLimit);
            }
            *n += 1;
        }
        match self.total.clone().try_acquire_owned() {
            Ok(total) => Ok(ConnPermit {
                _total: total,
                limiter: self.clone(),
                key,
            }),
            Err(_) => {
                self.release_peer(key);
                Err(Refused::TotalLimit)
            }
        }
    }

    fn release_peer(&self, key: PeerKey) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = peers.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                peers.remove(&key);
            }
        }
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.limits.total.min(Semaphore::MAX_PERMITS) - self.total.available_permits()
    }
}

/// Binds `addr` for the listener `name`.
pub async fn bind(name: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {name} {addr}: {e}")))
}

/// Accepts on `listener` until the process exits, serving `app` on every
/// connection the limiter admits; refused connections are reset at once,
/// counted in `portcullis_endpoint_refused_total{listener,reason}` and logged
/// (at most one line per listener every 5 s, with the count since the last).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limiter: Arc<ConnLimiter>,
    shared: Arc<Shared>,
) {
    let name = limiter.name;
    let labels = |reason: &'static str| EndpointLabels {
        listener: name,
        reason,
    };
    let mut last_warn: Option<Instant> = None;
    let mut refused_since_warn: u64 = 0;
    let mut last_accept_warn: Option<Instant> = None;
    let metrics = &shared.metrics;
    // Every series exists from the start, so rate() and alerts see a 0.
    for r in [Refused::PeerLimit, Refused::TotalLimit] {
        let _ = metrics.endpoint_refused.get_or_create(&labels(r.as_str()));
    }
    for r in ["header_timeout", "idle_timeout"] {
        let _ = metrics.endpoint_closed.get_or_create(&labels(r));
    }
    let held = metrics
        .endpoint_connections
        .get_or_create(&ListenerLabel { listener: name })
        .clone();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                metrics.accept_errors.inc();
                if last_accept_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(listener = name, error = %e, "accept failed: backing off");
                    last_accept_warn = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match limiter.admit(peer.ip()) {
            Ok(permit) => {
                held.inc();
                let held = held.clone();
                let app = app.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let end = serve_one(stream, app).await;
                    if let Some(reason) = end {
                        shared
                            .metrics
                            .endpoint_closed
                            .get_or_create(&labels(reason))
                            .inc();
                    }
                    held.dec();
                    drop(permit);
                });
            }
            Err(why) => {
                metrics
                    .endpoint_refused
                    .get_or_create(&labels(why.as_str()))
                    .inc();
                crate::proxy::deny::reset(stream);
                refused_since_warn += 1;
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(
                        listener = name,
                        peer = %PeerKey::of(peer.ip()),
                        reason = why.as_str(),
                        refused = refused_since_warn,
                        per_peer = limiter.limits.per_peer,
                        total = limiter.limits.total,
                        "connection refused: listener at its connection limit"
                    );
                    last_warn = Some(Instant::now());
                    refused_since_warn = 0;
                }
            }
        }
    }
}

/// Serves one connection; returns the timeout that ended it, if one did.
async fn serve_one(stream: TcpStream, app: Router) -> Option<&'static str> {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(io, TowerToHyperService::new(app));
    tokio::select! {
        r = conn => match r {
            Err(e) if e.is_timeout() => Some("header_timeout"),
            _ => None,
        },
        _ = activity.idle_for(IDLE_TIMEOUT) => Some("idle_timeout"),
    }
}

/// When bytes last moved on a connection (milliseconds since `base`).
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A stream that notes every read or write that moved bytes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_keyed_by_host() {
        let k = |s: &str| PeerKey::of(s.parse().unwrap());
        assert_eq!(k("127.0.0.1"), PeerKey::Loopback);
        assert_eq!(k("127.5.6.7"), PeerKey::Loopback);
        assert_eq!(k("::1"), PeerKey::Loopback);
        assert_eq!(k("::ffff:127.0.0.2"), PeerKey::Loopback);
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    /// Many threads racing for places: exactly the caps are handed out,
    /// and every place comes back when its permit is dropped.
    #[test]
    fn caps_are_exact_under_concurrent_admission() {
        let limiter = ConnLimiter::new(
            "t",
            Limits {
                total: 20,
                per_peer: 7,
            },
        );
        let peers: Vec<IpAddr> = (1..=5)
            .map(|i| format!("192.0.2.{i}").parse().unwrap())
            .collect();
        for round in 0..20 {
            let barrier = Arc::new(std::sync::Barrier::new(16));
            let held: Vec<Vec<(IpAddr, ConnPermit)>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..16)
                    .map(|t| {
                        let limiter = limiter.clone();
                        let barrier = barrier.clone();
                        let peers = &peers;
                        s.spawn(move || {
                            barrier.wait();
                            let mut got = Vec::new();
                            for i in 0..10 {
                                let ip = peers[(t + i + round) % peers.len()];
                                if let Ok(p) = limiter.admit(ip) {
                                    got.push((ip, p));
                                }
                            }
                            got
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let all: Vec<&(IpAddr, ConnPermit)> = held.iter().flatten().collect();
            assert_eq!(all.len(), 20, "round {round}: total cap");
            assert_eq!(limiter.held(), 20);
            for ip in &peers {
                let n = all.iter().filter(|(a, _)| a == ip).count();
                assert!(n <= 7, "round {round}: {n} places for {ip}");
            }
            let other: IpAddr = "198.51.100.1".parse().unwrap();
            assert_eq!(
                limiter.admit(other).err(),
                Some(Refused::TotalLimit),
                "round {round}"
            );
            drop(held);
            assert_eq!(limiter.held(), 0, "round {round}: places given back");
            assert!(limiter.peers.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn one_peer_cannot_take_another_peers_place() {
        let limiter = ConnLimiter::new(
            "t",
            Limits {
                total: 10,
                per_peer: 4,
            },
        );
        let flood: IpAddr = "198.18.0.2".parse().unwrap();
        let probe: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<ConnPermit> = (0..100).filter_map(|_| limiter.admit(flood).ok()).collect();
        assert_eq!(held.len(), 4);
        assert_eq!(limiter.admit(flood).err(), Some(Refused::PeerLimit));
        let probes: Vec<ConnPermit> = (0..4).map(|_| limiter.admit(probe).unwrap()).collect();
        assert_eq!(limiter.admit(probe).err(), Some(Refused::PeerLimit));
        drop(held);
        assert!(limiter.admit(flood).is_ok());
        drop(probes);
    }
}
