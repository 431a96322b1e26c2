//! Accept stage: listeners and the accept loop; the shared state every flow
//! reads (the current config generation, metrics, the dialer, the pipe pool,
//! the connection limit) lives in `state`.

pub mod deny;
pub mod explicit;
pub mod flow;
pub mod record;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::registry::{Reason, Verdict};
use crate::state::Shared;
use crate::vocab::Mode;

/// Binds every `listen` address. IPv6 listeners are IPV6_V6ONLY (so the
/// listener's family decides how to read SO_ORIGINAL_DST); an IPv6 address
/// that cannot be bound because IPv6 is off is a warning, not a failure.
pub fn bind_listeners(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in addrs {
        match bind_one(*addr) {
            Ok(l) => out.push(l),
            Err(e) if ipv6_unavailable(*addr, &e) => {
                tracing::warn!(%addr, error = %e, "IPv6 listener not bound (IPv6 disabled?): continuing without it");
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr}: {e}"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(io::Error::other("no listen address could be bound"));
    }
    Ok(out)
}

/// Whether binding `addr` failed only because this host (or namespace) has
/// no IPv6.
pub(crate) fn ipv6_unavailable(addr: SocketAddr, e: &io::Error) -> bool {
    addr.is_ipv6()
        && matches!(
            e.raw_os_error(),
            Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT)
        )
}

/// One listener; IPv6 is IPV6_V6ONLY.
pub(crate) fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, false)?)
}

/// One listening socket, not yet registered with any runtime; with `reuse_port`, more sockets
/// can be bound to the same address (by this uid) and the kernel spreads new connections over
/// them.
fn bind_std(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from their listener (Linux copies the listener's TCP
    // state into each child): set once here rather than by a setsockopt per flow.
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Binds every `listen` address `workers` times with SO_REUSEPORT: one listener per address for
/// each worker runtime, so that a flow is accepted, decided and relayed on one thread
/// (docs/DESIGN.md, "Threads"). Returns the listeners of each worker (registered with no runtime yet: the
/// worker does that). A port 0 is bound once and the others join the port it got. Failures as
/// in [`bind_listeners`].
pub fn bind_worker_listeners(
    addrs: &[SocketAddr],
    workers: usize,
) -> io::Result<Vec<Vec<std::net::TcpListener>>> {
    let workers = workers.max(1);
    let mut out: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = 0;
    for addr in addrs {
        let first = match bind_std(*addr, true) {
            Ok(l) => l,
            Err(e) if ipv6_unavailable(*addr, &e) => {
                tracing::warn!(%addr, error = %e, "IPv6 listener not bound (IPv6 disabled?): continuing without it");
                continue;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr}: {e}"),
                ))
            }
        };
        let actual = first.local_addr()?;
        out[0].push(first);
        for w in out.iter_mut().skip(1) {
            let l = bind_std(actual, true)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {actual}: {e}")))?;
            w.push(l);
        }
        bound += 1;
    }
    if bound == 0 {
        return Err(io::Error::other("no listen address could be bound"));
    }
    Ok(out)
}

/// Connection ids for the per-flow tracing span.
static NEXT_FLOW_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Accepts until the process exits. Accept errors (EMFILE and the like) are
/// logged, counted and backed off instead of spinning or exiting.
pub async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let mut last_warn: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(guard) = shared.admit() else {
                    overload(&shared, stream, peer);
                    continue;
                };
                let s = shared.clone();
                let id = NEXT_FLOW_ID.fetch_add(1, Ordering::Relaxed);
                let span = tracing::debug_span!("flow", id, client = %peer, listener = %local);
                // The task is the flow's future itself: no wrapper future
                // keeps a moved-from copy of its arguments beside it.
                let flow = flow::handle(s, stream, peer, local, guard);
                if span.is_disabled() {
                    // Without debug logging the span is empty: not carried by every flow.
                    tokio::spawn(flow);
                } else {
                    tokio::spawn(tracing::Instrument::instrument(flow, span));
                }
            }
            Err(e) => {
                shared.metrics.accept_errors.inc();
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(%local, error = %e, "accept failed (file descriptors exhausted?): backing off");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn overload(shared: &Arc<Shared>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let mut log = record::FlowLog::new(shared, peer, Mode::Transparent);
    let gen = shared.generation();
    let why = format!("max_connections ({}) reached", shared.max_connections);
    log.refused(&gen.registry, &Verdict::refused(Reason::Overload), why);
    deny::reset(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds of listener hand out sockets with Nagle off, without a
    /// setsockopt per accepted flow: the listener's TCP_NODELAY is inherited.
    #[tokio::test]
    async fn accepted_sockets_inherit_tcp_nodelay() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let shared = bind_listeners(&[loopback]).unwrap().remove(0);
        let worker = bind_worker_listeners(&[loopback], 1)
            .unwrap()
            .remove(0)
            .remove(0);
        let worker = TcpListener::from_std(worker).unwrap();
        for l in [&shared, &worker] {
            let addr = l.local_addr().unwrap();
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            assert!(!client.nodelay().unwrap(), "a socket starts with Nagle on");
            let (accepted, _) = l.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "accepted on {addr}");
        }
    }
}
