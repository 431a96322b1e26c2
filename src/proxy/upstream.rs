//! Connect stage: resolving names (TTL cache, stale answers when the resolver
//! fails) and dialling the upstream plan of DESIGN §3 step 7 within
//! `connect_timeout`, with every socket marked when `mark` is set and
//! registered so the loop guard can recognise it coming back.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::net::canonical_ip;
use crate::registry::Upstream;

/// How long an answer is kept for serving stale when the resolver fails.
const STALE_FOR: Duration = Duration::from_secs(3600);

pub enum Resolved {
    Addrs(Vec<IpAddr>, Duration),
    /// The name has no A/AAAA records (a definitive answer).
    NoAnswer,
}

/// hickory's tokio runtime, except that every DNS socket carries `mark`
/// (DESIGN §2: with mark-based exclusion, every socket of the proxy, the
/// resolver's included, is marked).
#[derive(Clone)]
pub struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    mark: Option<u32>,
}

fn marked_socket(
    addr: SocketAddr,
    ty: Type,
    proto: Protocol,
    mark: Option<u32>,
) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(proto),
    )?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    Ok(sock)
}

impl RuntimeProvider for MarkedRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = tokio::net::UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.inner.create_handle()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let sock = marked_socket(server, Type::STREAM, Protocol::TCP, mark)?;
            if let Some(b) = bind {
                sock.bind(&b.into())?;
            }
            sock.set_tcp_nodelay(true)?;
            let tsock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
            match tokio::time::timeout(
                wait_for.unwrap_or(Duration::from_secs(5)),
                tsock.connect(server),
            )
            .await
            {
                Ok(r) => r.map(AsyncIoTokioAsStd),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "DNS TCP connect timed out",
                )),
            }
        })
    }

    fn bind_udp(
        &self,
        local: SocketAddr,
        _server: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let sock = marked_socket(local, Type::DGRAM, Protocol::UDP, mark)?;
            sock.bind(&local.into())?;
            tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(sock))
        })
    }
}

/// A resolver whose last good answer per name survives resolver outages.
pub struct Resolver {
    inner: Option<hickory_resolver::Resolver<MarkedRuntime>>,
    stale: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

impl Resolver {
    /// Reads /etc/resolv.conf and the hosts file; `mark` goes on every
    /// DNS socket.
    pub fn new(mark: Option<u32>) -> Resolver {
        let runtime = MarkedRuntime {
            inner: TokioRuntimeProvider::default(),
            mark,
        };
        let inner = hickory_resolver::Resolver::builder(runtime).and_then(|mut b| {
            b.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
            b.options_mut().timeout = Duration::from_secs(2);
            b.options_mut().attempts = 2;
            b.build()
        });
        let inner = match inner {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "cannot configure the DNS resolver from /etc/resolv.conf: resolution DNS entries will fail with reason dns");
                None
            }
        };
        Resolver {
            inner,
            stale: Mutex::new(HashMap::new()),
        }
    }

    /// A and AAAA of `name` (looked up as an absolute name: no search
    /// domains). The TTL-respecting cache is hickory's; on a resolver failure
    /// the last good answer is served.
    pub async fn lookup(&self, name: &str) -> Resolved {
        let Some(inner) = &self.inner else {
            return Resolved::NoAnswer;
        };
        let absolute = format!("{}.", name.trim_end_matches('.'));
        match inner.lookup_ip(absolute.as_str()).await {
            Ok(l) => {
                let ttl = l.valid_until().saturating_duration_since(Instant::now());
                let addrs: Vec<IpAddr> = l.iter().map(canonical_ip).collect();
                if addrs.is_empty() {
                    return Resolved::NoAnswer;
                }
                if let Ok(mut s) = self.stale.lock() {
                    if s.len() > 100_000 {
                        s.clear();
                    }
                    s.insert(name.to_string(), (addrs.clone(), Instant::now()));
                }
                Resolved::Addrs(addrs, ttl)
            }
            Err(e) => {
                let definitive = e.is_no_records_found();
                if !definitive {
                    if let Ok(s) = self.stale.lock() {
                        if let Some((addrs, at)) = s.get(name) {
                            if at.elapsed() < STALE_FOR {
                                tracing::warn!(name, error = %e, "resolver failed: serving the last good answer");
                                return Resolved::Addrs(addrs.clone(), Duration::from_secs(5));
                            }
                        }
                    }
                    tracing::warn!(name, error = %e, "resolver failed");
                }
                Resolved::NoAnswer
            }
        }
    }
}

/// How many times in a row a flow has come from one of the proxy's own upstream sockets that
/// was still inside its connect window (0: an ordinary client).
pub type Hop = u8;

/// A flow whose hop count reaches this is a loop and is reset (DESIGN §3 step 1): a real loop
/// is stopped at its second pass through the proxy.
pub const LOOP_HOPS: Hop = 2;

/// How long after its connect completed an upstream socket still counts for the loop guard.
/// A real loop comes back within the upstream's own handshake (the proxy connects to itself),
/// so only the accept queue and the scheduler stand between the two; a client that NAT
/// remapped onto the port of an older upstream socket is not counted at all.
pub const LOOP_WINDOW: Duration = Duration::from_secs(1);

/// One upstream socket as the loop guard knows it.
struct Own {
    /// Its local IP, once connect(2) has chosen it.
    ip: Option<IpAddr>,
    dst: SocketAddr,
    /// The hop count of the flow it belongs to.
    hop: Hop,
    /// When its connect completed (None while connecting).
    connected: Option<Instant>,
}

/// The proxy's own upstream sockets, by local port, with where each one is going: a flow
/// arriving from such an address to that destination may be our own connection redirected
/// back to us (DESIGN §3 step 1). A port is registered right after bind(2) (an explicit
/// `bind(0)` keeps it exclusive), before connect(2) sends the SYN, so a loop can never be
/// accepted before its upstream socket is known.
///
/// A single address match is not proof of a loop: in a pod the workload shares the proxy's
/// address, and NAT may move a client's source port onto a live upstream socket's port (see
/// README, "The loop guard"). So a match counts only while the socket is inside its connect
/// window, and a flow is reset only at the second counted match in a row ([`LOOP_HOPS`]).
#[derive(Default)]
pub struct OwnSockets {
    by_port: Mutex<HashMap<u16, Own>>,
}

impl OwnSockets {
    fn insert(&self, port: u16, dst: SocketAddr, hop: Hop) {
        if let Ok(mut m) = self.by_port.lock() {
            m.insert(
                port,
                Own {
                    ip: None,
                    dst,
                    hop,
                    connected: None,
                },
            );
        }
    }
    fn set_ip(&self, port: u16, ip: IpAddr) {
        if let Ok(mut m) = self.by_port.lock() {
            if let Some(o) = m.get_mut(&port) {
                o.ip = Some(canonical_ip(ip));
            }
        }
    }
    fn connected(&self, port: u16, at: Instant) {
        if let Ok(mut m) = self.by_port.lock() {
            if let Some(o) = m.get_mut(&port) {
                o.connected = Some(at);
            }
        }
    }
    fn remove(&self, port: u16) {
        if let Ok(mut m) = self.by_port.lock() {
            m.remove(&port);
        }
    }

    /// The hop count of a flow from `peer` to `dst` accepted at `now`: one more than the
    /// matching upstream socket's flow if `peer` and `dst` are exactly one of our upstream
    /// sockets' local address and destination and that socket is still connecting or
    /// connected less than [`LOOP_WINDOW`] ago; else 0. [`LOOP_HOPS`] or more: a loop.
    pub fn hop(&self, peer: SocketAddr, dst: SocketAddr, now: Instant) -> Hop {
        let peer = crate::net::canonical_addr(peer);
        let dst = crate::net::canonical_addr(dst);
        let Ok(m) = self.by_port.lock() else {
            return 0;
        };
        match m.get(&peer.port()) {
            Some(o)
                if o.dst == dst
                    && o.ip.is_none_or(|ip| ip == peer.ip())
                    && o.connected
                        .is_none_or(|t| now.saturating_duration_since(t) < LOOP_WINDOW) =>
            {
                o.hop.saturating_add(1)
            }
            _ => 0,
        }
    }
}

/// An established upstream connection; its port stays registered with the
/// loop guard as long as `guard` lives.
pub struct Connected<'a> {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub guard: PortGuard<'a>,
}

#[derive(Debug)]
pub enum ConnectError {
    /// The name resolved to nothing (reason `dns`).
    Dns,
    Refused,
    Timeout,
}

impl ConnectError {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnectError::Dns => "dns",
            ConnectError::Refused => "connect_refused",
            ConnectError::Timeout => "connect_timeout",
        }
    }
}

pub struct Dialer {
    pub resolver: Resolver,
    pub own: OwnSockets,
    pub mark: Option<u32>,
}

impl Dialer {
    /// The candidate addresses of a plan, in the order to try them.
    pub async fn candidates(&self, plan: &Upstream) -> Result<Vec<SocketAddr>, ConnectError> {
        match plan {
            Upstream::Original(a) => Ok(vec![*a]),
            Upstream::Static(v) => Ok(v.clone()),
            Upstream::Resolve { name, port, dst } => match self.resolver.lookup(name).await {
                Resolved::NoAnswer => Err(ConnectError::Dns),
                Resolved::Addrs(addrs, _) => {
                    let dst_ip = canonical_ip(dst.ip());
                    if addrs.contains(&dst_ip) {
                        // The client dialled what the name resolves to.
                        return Ok(vec![SocketAddr::new(dst_ip, *port)]);
                    }
                    // A client presenting an allowed name while dialling
                    // some other IP reaches only what the name resolves to.
                    let mut v: Vec<SocketAddr> =
                        addrs.iter().map(|ip| SocketAddr::new(*ip, *port)).collect();
                    v.sort_by_key(|a| a.is_ipv4() != dst_ip.is_ipv4());
                    Ok(v)
                }
            },
        }
    }

    /// Tries `addrs` in turn; `timeout` bounds all attempts together. `hop` is the hop count
    /// of the flow the connection is for (the loop guard's, see [`OwnSockets`]).
    pub async fn connect(
        &self,
        addrs: &[SocketAddr],
        timeout: Duration,
        hop: Hop,
    ) -> Result<Connected<'_>, ConnectError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = ConnectError::Refused;
        for (i, addr) in addrs.iter().enumerate() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ConnectError::Timeout);
            }
            // Leave the later candidates a share of the time.
            let left = deadline - now;
            let share = if i + 1 < addrs.len() { left / 2 } else { left };
            match self.connect_one(*addr, share, hop).await {
                Ok(c) => return Ok(c),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => last = ConnectError::Timeout,
                Err(_) => last = ConnectError::Refused,
            }
        }
        Err(last)
    }

    async fn connect_one(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        hop: Hop,
    ) -> io::Result<Connected<'_>> {
        let sock = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        if let Some(m) = self.mark {
            sock.set_mark(m)?;
        }
        sock.set_tcp_nodelay(true)?;
        // An explicit bind(0) takes a port no other socket of this host
        // holds (connect's own choice may share a port across destinations).
        // Shared ports made the kernel's REDIRECT remap client source ports
        // onto ours, which the loop guard then could not tell from a loop
        // (measured: ~1 in 10,000 flows reset in tests/soak.rs without it).
        let any: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        sock.bind(&SockAddr::from(any))?;
        // Register the port for the loop guard before the SYN leaves: over loopback a
        // redirected SYN can be answered and accepted before connect(2) even returns.
        let port = sock
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("upstream socket has no local address"))?;
        self.own.insert(port, addr, hop);
        let guard = PortGuard {
            own: &self.own,
            port: Some(port),
        };
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        // connect(2) has chosen the source address: the guard now compares all of it.
        if let Some(local) = sock.local_addr()?.as_socket() {
            self.own.set_ip(port, local.ip());
        }
        let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
        match tokio::time::timeout(timeout, stream.writable()).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        // Writable without an error can still mean "not connected" on some
        // paths; peer_addr says for sure.
        stream.peer_addr()?;
        self.own.connected(port, Instant::now());
        Ok(Connected {
            stream,
            addr,
            guard,
        })
    }
}

/// Deregisters an upstream socket from the loop guard when dropped.
pub struct PortGuard<'a> {
    own: &'a OwnSockets,
    port: Option<u16>,
}

impl Drop for PortGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.port {
            self.own.remove(p);
        }
    }
}

/// Whether this process may set SO_MARK (the self-exclusion probe of `run`).
pub fn mark_works(mark: u32) -> bool {
    Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| s.set_mark(mark))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_guard_compares_the_whole_address() {
        let own = OwnSockets::default();
        let dst: SocketAddr = "192.0.2.10:7000".parse().unwrap();
        let now = Instant::now();
        own.insert(40000, dst, 0);
        // Before connect(2) has chosen the local IP, the port and destination decide.
        assert_eq!(own.hop("192.0.2.2:40000".parse().unwrap(), dst, now), 1);
        own.set_ip(40000, "192.0.2.2".parse().unwrap());
        assert_eq!(own.hop("192.0.2.2:40000".parse().unwrap(), dst, now), 1);
        assert_eq!(
            own.hop("[::ffff:192.0.2.2]:40000".parse().unwrap(), dst, now),
            1
        );
        // Same port from another host (gateway mode), or to another
        // destination: an ordinary client, not our own socket.
        assert_eq!(own.hop("198.18.0.2:40000".parse().unwrap(), dst, now), 0);
        assert_eq!(
            own.hop(
                "192.0.2.2:40000".parse().unwrap(),
                "192.0.2.11:7000".parse().unwrap(),
                now
            ),
            0
        );
        own.remove(40000);
        assert_eq!(own.hop("192.0.2.2:40000".parse().unwrap(), dst, now), 0);
    }

    #[test]
    fn loop_guard_counts_hops_inside_the_connect_window() {
        let own = OwnSockets::default();
        let dst: SocketAddr = "192.0.2.10:7000".parse().unwrap();
        let peer: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        let t0 = Instant::now();
        own.insert(40000, dst, 0);
        own.set_ip(40000, peer.ip());
        // Connecting, or connected within the window: the first match is hop 1 (let through).
        assert_eq!(own.hop(peer, dst, t0), 1);
        own.connected(40000, t0);
        assert_eq!(own.hop(peer, dst, t0 + LOOP_WINDOW / 2), 1);
        // An older connected socket: a client NAT remapped onto its port, not a loop.
        assert_eq!(own.hop(peer, dst, t0 + LOOP_WINDOW), 0);
        assert_eq!(own.hop(peer, dst, t0 + LOOP_WINDOW * 10), 0);
        // The upstream of a hop-1 flow coming back again: the second hop, a loop.
        own.insert(40001, dst, 1);
        assert_eq!(
            own.hop("192.0.2.2:40001".parse().unwrap(), dst, t0),
            LOOP_HOPS
        );
    }
}
