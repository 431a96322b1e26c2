//! Connect stage: resolving names (TTL cache, stale answers when the resolver
//! fails) and dialling the upstream plan of docs/DESIGN.md §3 step 7 within
//! `connect_timeout`, with every socket marked when `mark` is set and
//! registered so the loop guard can recognise it coming back.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpStream;

use crate::name::HostPattern;
use crate::net::canonical_ip;
use crate::registry::{Registry, Upstream, Verdict};

pub use super::resolve::{Resolved, Resolver, Scope};

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
    /// No upstream answered within `connect_timeout`.
    Timeout,
    /// The last attempt failed with this error (refused, no local port,
    /// unreachable, ...): kept so the log says which.
    Io(io::Error),
}

impl ConnectError {
    fn from_io(e: io::Error) -> ConnectError {
        if e.kind() == io::ErrorKind::TimedOut {
            ConnectError::Timeout
        } else {
            ConnectError::Io(e)
        }
    }

    /// The access log's `error` token (README "Access log").
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnectError::Dns => "dns",
            ConnectError::Timeout => "connect_timeout",
            ConnectError::Io(e) => match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => "connect_refused",
                // bind(0) or connect(2) found no free local port
                // (net.ipv4.ip_local_port_range exhausted) or no source
                // address: a problem on this host, not the upstream's.
                Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => "connect_no_local_port",
                Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::ENETDOWN) => {
                    "connect_unreachable"
                }
                Some(libc::ECONNRESET) => "connect_reset",
                _ => "connect_error",
            },
        }
    }
}

/// What the access log's `error` says: the token, and for an error without
/// a token of its own, the system's message too.
impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) if self.as_str() == "connect_error" => {
                write!(f, "connect_error: {e}")
            }
            _ => f.write_str(self.as_str()),
        }
    }
}

/// Where the resolver keeps a name of this verdict: exact hosts apart,
/// names under a wildcard entry in that entry's bounded share.
fn scope(reg: &Registry, v: &Verdict, name: &str) -> Scope {
    let Some(i) = v.entry else {
        return Scope::Wildcard(String::new());
    };
    let e = reg.entry(i);
    let exact = e
        .hosts
        .iter()
        .any(|h| matches!(h, HostPattern::Exact(x) if x == name));
    if exact {
        Scope::Exact
    } else {
        Scope::Wildcard(e.name.clone())
    }
}

pub struct Dialer {
    pub resolver: Resolver,
    pub own: OwnSockets,
    pub mark: Option<u32>,
}

impl Dialer {
    /// The candidate addresses of a plan, in the order to try them.
    /// Resolution counts inside `connect_timeout` (`deadline` is the flow's
    /// end of it): it may take three quarters of what is left, then gives
    /// up with what has come (stale answers included), so connecting to
    /// them still has time.
    pub async fn candidates(
        &self,
        plan: &Upstream,
        reg: &Registry,
        v: &Verdict,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<SocketAddr>, ConnectError> {
        match plan {
            Upstream::Original(a) => Ok(vec![*a]),
            Upstream::Static(v) => Ok(v.clone()),
            Upstream::Resolve { name, port, dst } => {
                let dst_ip = canonical_ip(dst.ip());
                let scope = scope(reg, v, name);
                let now = tokio::time::Instant::now();
                let until = now + deadline.saturating_duration_since(now) * 3 / 4;
                match self
                    .resolver
                    .resolve(name, &scope, Some(dst_ip), Some(until))
                    .await
                {
                    Resolved::NoAnswer => Err(ConnectError::Dns),
                    Resolved::Addrs(addrs, _) => {
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
                }
            }
        }
    }

    /// Tries `addrs` in turn; `timeout` bounds all attempts together.
    pub async fn connect(
        &self,
        addrs: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Connected<'_>, ConnectError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = ConnectError::Timeout;
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
                Err(e) => {
                    tracing::debug!(upstream = %addr, error = %e, "connect failed");
                    last = ConnectError::from_io(e);
                }
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
