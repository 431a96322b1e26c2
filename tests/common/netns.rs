//! Running code inside a network namespace from the test process itself.
//!
//! `in_ns` runs a closure on a fresh thread that has joined the namespace with
//! setns(2) (only that thread changes namespace). Sockets created there stay in
//! that namespace for their whole life, so a `TcpStream` made by `connect` can be
//! used from any thread afterwards.
//!
//! A bare setns does NOT apply /etc/netns/NAME/resolv.conf: never resolve host
//! names on such a thread (only socket addresses are accepted here). To resolve,
//! run a process with `ip netns exec` (see `Cmd`).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Path of a named namespace's handle.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Runs `f` on a new thread inside network namespace `ns` and returns its result.
/// Panics if the namespace cannot be entered (the closure then never runs, so it
/// can never act in the machine's own namespace by mistake).
pub fn in_ns<T, F>(ns: &str, f: F) -> T
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = netns_path(ns);
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&path).unwrap_or_else(|e| panic!("cannot enter netns {}: {e}", path.display()));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn enter(path: &PathBuf) -> io::Result<()> {
    let file = File::open(path)?;
    let want = file.metadata()?;
    // SAFETY: plain syscall on a valid fd; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Paranoia: prove that this thread is now in the wanted namespace.
    let now = std::fs::metadata("/proc/thread-self/ns/net")?;
    if now.dev() != want.dev() || now.ino() != want.ino() {
        return Err(io::Error::other("setns did not move the thread"));
    }
    Ok(())
}

/// Connects to `addr` from inside `ns` (a plain client socket owned by the test
/// process: uid 0, so iptables owner matches for the proxy's uid do not apply).
pub fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_ns(ns, || {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// Address families of /proc/net/{tcp,udp}{,6} rows.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn proc_sockets(kind: &str, only_state: Option<&str>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for file in [kind.to_string(), format!("{kind}6")] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 {
                continue;
            }
            if only_state.is_some_and(|st| cols[3] != st) {
                continue;
            }
            if let Some(a) = parse_proc_addr(cols[1]) {
                out.push(a);
            }
        }
    }
    out
}

/// TCP sockets in LISTEN state inside `ns`.
pub fn tcp_listeners(ns: &str) -> Vec<SocketAddr> {
    in_ns(ns, || proc_sockets("tcp", Some("0A")))
}

/// Bound UDP sockets inside `ns`.
pub fn udp_sockets(ns: &str) -> Vec<SocketAddr> {
    in_ns(ns, || proc_sockets("udp", None))
}

/// Whether a listener bound to `bound` accepts connections to `want`.
fn covers(bound: &SocketAddr, want: &SocketAddr) -> bool {
    if bound.port() != want.port() {
        return false;
    }
    if bound.ip() == want.ip() || bound.ip().is_unspecified() && bound.is_ipv4() == want.is_ipv4() {
        return true;
    }
    // a dual-stack [::] listener also takes IPv4
    matches!(bound.ip(), IpAddr::V6(v6) if v6.is_unspecified())
}

/// Calls `ok` until it returns true (then true) or `timeout` passes (then false),
/// sleeping 1 ms, 2 ms, 4 ms ... 25 ms between calls.
pub fn poll_until<F: FnMut() -> bool>(timeout: Duration, mut ok: F) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Waits until something in `ns` listens on TCP `addr` (an unspecified IP in
/// `addr` means "any address, this port"). Does not connect, so a proxy under
/// test sees no stray flow. Returns false after `timeout`.
pub fn wait_tcp_in(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    poll_until(timeout, || {
        tcp_listeners(ns)
            .iter()
            .any(|b| covers(b, &addr) || addr.ip().is_unspecified() && b.port() == addr.port())
    })
}

/// Waits until a UDP socket in `ns` is bound to `addr` (or to its port, any IP).
pub fn wait_udp_in(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    poll_until(timeout, || {
        udp_sockets(ns)
            .iter()
            .any(|b| covers(b, &addr) || addr.ip().is_unspecified() && b.port() == addr.port())
    })
}

/// A TCP socket of a namespace as /proc/net/tcp{,6} shows it: local and remote
/// address as the socket itself sees them (NAT is invisible here) and its owner.
#[derive(Clone, Copy, Debug)]
pub struct TcpRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub uid: u32,
}

/// Every TCP socket inside `ns` (listeners included).
pub fn tcp_sockets(ns: &str) -> Vec<TcpRow> {
    in_ns(ns, || {
        let mut out = Vec::new();
        for file in ["tcp", "tcp6"] {
            let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() < 8 {
                    continue;
                }
                if let (Some(local), Some(remote), Ok(uid)) = (
                    parse_proc_addr(cols[1]),
                    parse_proc_addr(cols[2]),
                    cols[7].parse(),
                ) {
                    out.push(TcpRow { local, remote, uid });
                }
            }
        }
        out
    })
}
