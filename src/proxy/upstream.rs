//! Connect stage: resolving names (TTL cache, stale answers when the resolver
//! fails) and dialling the upstream plan of docs/DESIGN.md §3 step 7 within
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
/// (docs/DESIGN.md §2: with mark-based exclusion, every socket of the proxy, the
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

/// The local addresses of the proxy's own upstream sockets, with where each
/// one is going: a flow arriving from such an address to that destination is
/// our own connection redirected back to us (docs/DESIGN.md §3 step 1). Registered
/// right after connect(2) starts (the kernel has chosen the source address
/// and port by then), before the handshake can complete and be accepted.
#[derive(Default)]
pub struct OwnSockets {
    by_local: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl OwnSockets {
    fn insert(&self, local: SocketAddr, dst: SocketAddr) {
        if let Ok(mut m) = self.by_local.lock() {
            m.insert(local, dst);
        }
    }
    fn remove(&self, local: SocketAddr) {
        if let Ok(mut m) = self.by_local.lock() {
            m.remove(&local);
        }
    }
    pub fn is_loop(&self, peer: SocketAddr, dst: SocketAddr) -> bool {
        let peer = crate::net::canonical_addr(peer);
        self.by_local
            .lock()
            .map(|m| m.get(&peer) == Some(&dst))
            .unwrap_or(false)
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

    /// Tries `addrs` in turn; `timeout` bounds all attempts together.
    pub async fn connect(
        &self,
        addrs: &[SocketAddr],
        timeout: Duration,
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
            match self.connect_one(*addr, share).await {
                Ok(c) => return Ok(c),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => last = ConnectError::Timeout,
                Err(_) => last = ConnectError::Refused,
            }
        }
        Err(last)
    }

    async fn connect_one(&self, addr: SocketAddr, timeout: Duration) -> io::Result<Connected<'_>> {
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
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        // The SYN is on its way and the source address is chosen: register
        // it for the loop guard before the handshake can complete.
        let local = sock
            .local_addr()?
            .as_socket()
            .map(crate::net::canonical_addr)
            .ok_or_else(|| io::Error::other("upstream socket has no local address"))?;
        self.own.insert(local, addr);
        let guard = PortGuard {
            own: &self.own,
            local: Some(local),
        };
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
    local: Option<SocketAddr>,
}

impl Drop for PortGuard<'_> {
    fn drop(&mut self) {
        if let Some(l) = self.local {
            self.own.remove(l);
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
        own.insert("192.0.2.2:40000".parse().unwrap(), dst);
        assert!(own.is_loop("192.0.2.2:40000".parse().unwrap(), dst));
        assert!(own.is_loop("[::ffff:192.0.2.2]:40000".parse().unwrap(), dst));
        // Same port from another host (gateway mode), or to another
        // destination: an ordinary client, not our own socket.
        assert!(!own.is_loop("198.18.0.2:40000".parse().unwrap(), dst));
        assert!(!own.is_loop(
            "192.0.2.2:40000".parse().unwrap(),
            "192.0.2.11:7000".parse().unwrap()
        ));
        own.remove("192.0.2.2:40000".parse().unwrap());
        assert!(!own.is_loop("192.0.2.2:40000".parse().unwrap(), dst));
    }
}
