//! Connect stage: resolving names (TTL cache, stale answers when the resolver
//! fails; `resolve`) and dialling the upstream plan of docs/DESIGN.md §3 step 7
//! within `connect_timeout`, with every socket marked when `mark` is set and
//! registered so the loop guard can recognise it coming back.
//!
//! A module of its own rather than a part of `proxy`: the [`Dialer`] (and its
//! resolver) lives in `state::Shared`, which the background resolution of DNS
//! TCP entries and every flow read, so `state` needs these types while the
//! accept loop and the flows in `proxy` need `state`. Here, beside `state`
//! and below both, the data path depends on `state` and `state` on neither
//! `proxy` nor anything that serves. This module itself reads only `config`,
//! `name`, `net` and `registry`.

pub mod resolve;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpStream;

use crate::name::HostPattern;
use crate::net::canonical_ip;
use crate::registry::{Registry, Upstream, Verdict};

pub use resolve::{Resolved, Resolver, Scope};

/// How many times in a row a flow has come from one of the proxy's own upstream sockets that
/// was still inside its connect window (0: an ordinary client).
pub type Hop = u8;

/// A flow whose hop count reaches this is a loop and is reset (docs/DESIGN.md §3 step 1): a real loop
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
/// back to us (docs/DESIGN.md §3 step 1). A port is registered right after bind(2) (an explicit
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

    /// Tries `addrs` in turn; `timeout` bounds all attempts together. `hop` is the hop count
    /// of the flow the connection is for (the loop guard's, see [`OwnSockets`]).
    pub async fn connect(
        &self,
        addrs: &[SocketAddr],
        timeout: Duration,
        hop: Hop,
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
            match self.connect_one(*addr, share, hop).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(upstream = %addr, error = %e, "connect failed");
                    last = ConnectError::from_io(e);
                }
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
        // Over loopback and veth the whole handshake is processed inside connect(2) (the
        // SYN-ACK waits in the socket's backlog until connect releases it), so the socket is
        // often connected already: getpeername says so, and the flow goes on without a turn
        // of the event loop for the writable event. Elsewhere this costs one failed call.
        if stream.peer_addr().is_err() {
            match tokio::time::timeout(timeout, stream.writable()).await {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
            // Writable: connected or failed. peer_addr (getpeername) says which in one call;
            // only a failure pays a second one (SO_ERROR) for the reason the log names.
            if let Err(e) = stream.peer_addr() {
                return Err(stream.take_error()?.unwrap_or(e));
            }
        }
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
