//! `portcullis wait`: polls the health endpoint until it answers 200, for
//! start-up ordering where native sidecars are not available (run it first
//! in the application container: `portcullis wait && exec app`).
//!
//! The host of the URL is an IP address or `localhost`, never a name to look
//! up: the shipped binary is static, and glibc's getaddrinfo cannot work in a
//! static binary (it loads NSS modules at run time). The health endpoint is
//! the pod's own, so an address is all `wait` ever needs.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::config::format_duration;

/// Why `wait` gave up. Every message names the command: it is often the
/// first line of a container's log (`portcullis wait && exec app`).
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("portcullis wait: {url}: {problem}")]
    Url { url: String, problem: UrlProblem },
    #[error("portcullis wait: not ready after {} ({last})", format_duration(*timeout))]
    NotReady { timeout: Duration, last: Probe },
}

/// What is wrong with the `--url`: only `http://IP[:PORT][/PATH]` is taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("only http:// URLs are supported")]
    NotHttp,
    #[error("no host")]
    NoHost,
    #[error("unclosed `[` in the host")]
    UnclosedBracket,
    #[error("`{0}` after the IPv6 address")]
    AfterIpv6(String),
    #[error("`{0}` is not a port number")]
    NotAPort(String),
    #[error("an IPv6 address goes in brackets, e.g. http://[::1]:15021/ready")]
    Ipv6WithoutBrackets,
    #[error("the host must be an IP address or localhost (wait does not look names up)")]
    NotAnAddress,
}

/// The last probe before the deadline, said in the timeout's message.
#[derive(Debug, thiserror::Error)]
pub enum Probe {
    #[error("no attempt")]
    None,
    #[error("{url} answered {code}")]
    Answered { url: String, code: u16 },
    #[error("{url}: {source}")]
    Failed { url: String, source: std::io::Error },
}

/// Splits `http://HOST[:PORT][/PATH]` into the authority (for the Host
/// header), the addresses to try and the path. HOST is an IPv4 address, an
/// IPv6 address in brackets, or `localhost` (127.0.0.1, then ::1); PORT
/// defaults to 80.
fn parse_url(url: &str) -> Result<(String, Vec<SocketAddr>, String), WaitError> {
    let bad = |problem| WaitError::Url {
        url: url.to_string(),
        problem,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad(UrlProblem::NotHttp))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad(UrlProblem::NoHost));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6
            .split_once(']')
            .ok_or_else(|| bad(UrlProblem::UnclosedBracket))?;
        match after {
            "" => (ip, None),
            p => (
                ip,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad(UrlProblem::AfterIpv6(p.to_string())))?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        None => 80,
        Some(p) => p
            .parse()
            .map_err(|_| bad(UrlProblem::NotAPort(p.to_string())))?,
    };
    let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        if authority.starts_with('[') != ip.is_ipv6() {
            return Err(bad(UrlProblem::Ipv6WithoutBrackets));
        }
        vec![ip]
    } else {
        return Err(bad(UrlProblem::NotAnAddress));
    };
    let addrs = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    Ok((authority.to_string(), addrs, path.to_string()))
}

fn probe(addr: SocketAddr, authority: &str, path: &str, budget: Duration) -> std::io::Result<u16> {
    // Never past the caller's deadline, and never longer than a probe needs.
    let t = budget.clamp(Duration::from_millis(10), Duration::from_secs(2));
    let mut s = TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: portcullis-wait\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    // The status line may arrive in pieces.
    while !head.contains(&b'\n') && head.len() < 256 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    status_code(&head).ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

fn status_code(head: &[u8]) -> Option<u16> {
    let line = String::from_utf8_lossy(head);
    let mut it = line.split_whitespace();
    if !it.next()?.starts_with("HTTP/") {
        return None;
    }
    it.next()?.parse().ok()
}

/// Polls `url` until it answers 200 (then Ok) or `timeout` passes (then the
/// last thing that went wrong).
pub fn wait(url: &str, timeout: Duration) -> Result<(), WaitError> {
    let (authority, addrs, path) = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let mut last = Probe::None;
    loop {
        for &a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match probe(a, &authority, &path, left) {
                Ok(200) => return Ok(()),
                Ok(code) => {
                    last = Probe::Answered {
                        url: url.to_string(),
                        code,
                    }
                }
                Err(source) => {
                    last = Probe::Failed {
                        url: url.to_string(),
                        source,
                    }
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
    Err(WaitError::NotReady { timeout, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:15021/ready").unwrap(),
            (
                "127.0.0.1:15021".into(),
                vec![sa("127.0.0.1:15021")],
                "/ready".into()
            )
        );
        assert_eq!(
            parse_url("http://[::1]:15021").unwrap(),
            ("[::1]:15021".into(), vec![sa("[::1]:15021")], "/".into())
        );
        assert_eq!(
            parse_url("http://LocalHost:15021/ready").unwrap().1,
            [sa("127.0.0.1:15021"), sa("[::1]:15021")]
        );
        assert_eq!(
            parse_url("http://10.0.0.1/").unwrap().1,
            [sa("10.0.0.1:80")]
        );
        assert_eq!(
            parse_url("http://[fd00::1]").unwrap().1,
            [sa("[fd00::1]:80")]
        );
    }

    fn problem(url: &str) -> UrlProblem {
        match parse_url(url) {
            Err(WaitError::Url { url: u, problem }) if u == url => problem,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn names_are_refused_not_looked_up() {
        // A static binary cannot call getaddrinfo: a name is a usage error,
        // said as such, whatever the resolver would have answered.
        for url in [
            "http://example.com:15021/ready",
            "http://portcullis:15021/",
            "http://localhost.:15021/",
        ] {
            assert_eq!(problem(url), UrlProblem::NotAnAddress, "{url}");
        }
        for (url, want) in [
            ("https://x/", UrlProblem::NotHttp),
            ("http://::1:15021/", UrlProblem::Ipv6WithoutBrackets),
            ("http://[::1/", UrlProblem::UnclosedBracket),
            ("http://[::1]x/", UrlProblem::AfterIpv6("x".into())),
            (
                "http://127.0.0.1:http/",
                UrlProblem::NotAPort("http".into()),
            ),
            (
                "http://127.0.0.1:70000/",
                UrlProblem::NotAPort("70000".into()),
            ),
            ("http:///ready", UrlProblem::NoHost),
        ] {
            assert_eq!(problem(url), want, "{url}");
        }
        // the message names the command and the URL as given
        assert_eq!(
            parse_url("http://[::1]x/").unwrap_err().to_string(),
            "portcullis wait: http://[::1]x/: `x` after the IPv6 address"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    #[test]
    fn times_out_naming_the_last_failure() {
        // a port nothing listens on: refused at once, retried until the deadline
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let t = Instant::now();
        let e = wait(&format!("http://{addr}/ready"), Duration::from_millis(500)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(500));
        assert!(
            matches!(&e, WaitError::NotReady { last: Probe::Failed { source, .. }, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(
            e.starts_with(&format!(
                "portcullis wait: not ready after 500ms (http://{addr}/ready: "
            )),
            "{e}"
        );
        assert!(e.contains("refused"), "{e}");
    }
}
