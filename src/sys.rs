//! Socket and process facts the kernel holds: the original destination of a
//! redirected flow, file-descriptor limits.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// SO_ORIGINAL_DST of a redirected connection, by the listener's family
/// (IPv6 listeners are IPV6_V6ONLY, so the family is never mixed). A
/// connection made straight to the listener reports the listener's own
/// address, which the caller treats as "not redirected".
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    addr.ok().and_then(|a| a.as_socket())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// `max_connections = "auto"`: what the open-file limit allows. A flow holds
/// two sockets and, only while bytes are in flight, a pipe pair from the
/// pool; keep a reserve for listeners, the resolver and the log, plus
/// `endpoint_fds`: what the health and admin listeners may hold at most
/// (`endpoint::reserved_fds`), so no flood of them costs an egress flow.
pub fn auto_max_connections(nofile: u64, max_pipes: usize, endpoint_fds: u64) -> usize {
    let reserve = 64 + 2 * max_pipes as u64 + endpoint_fds;
    (nofile.saturating_sub(reserve) / 2).max(16) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_budget_reserves_the_endpoints() {
        // 20,000 fds, 256 pipes, health and admin on (66 + 34)
        assert_eq!(
            auto_max_connections(20_000, 256, 100),
            (20_000 - 64 - 512 - 100) / 2
        );
        // The whole budget: flows at two sockets each, the pipe pool, the
        // reserve and the endpoints never exceed the limit.
        for nofile in [1024u64, 2048, 4096, 65_536] {
            let flows = auto_max_connections(nofile, 256, 100) as u64;
            assert!(2 * flows + 2 * 256 + 64 + 100 <= nofile, "{nofile}");
        }
    }
}
