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

/// Splits `http://HOST[:PORT][/PATH]` into the authority (for the Host
/// header), the addresses to try and the path. HOST is an IPv4 address, an
/// IPv6 address in brackets, or `localhost` (127.0.0.1, then ::1); PORT
/// defaults to 80.
fn parse_url(url: &str) -> Result<(String, Vec<SocketAddr>, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: unclosed `[` in the host"))?;
        match after {
            "" => (ip, None),
            p => (
                ip,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{url}: `{p}` after the IPv6 address"))?,
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
            .map_err(|_| format!("{url}: `{p}` is not a port number"))?,
    };
    let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        if authority.starts_with('[') != ip.is_ipv6() {
            return Err(format!(
                "{url}: an IPv6 address goes in brackets, e.g. http://[::1]:15021/ready"
            ));
        }
        vec![ip]
    } else {
        return Err(format!(
            "{url}: the host must be an IP address or localhost (wait does not look names up)"
        ));
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
pub fn wait(url: &str, timeout: Duration) -> Result<(), String> {
    let (authority, addrs, path) = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        for &a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match probe(a, &authority, &path, left) {
                Ok(200) => return Ok(()),
                Ok(code) => last = format!("{url} answered {code}"),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
    Err(format!(
        "portcullis wait: not ready after {} ({last})",
        crate::config::format_duration(timeout)
    ))
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
        assert!(parse_url("https://x/").is_err());
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

    #[test]
    fn names_are_refused_not_looked_up() {
        // A static binary cannot call getaddrinfo: a name is a usage error,
        // said as such, whatever the resolver would have answered.
        for url in [
            "http://example.com:15021/ready",
            "http://portcullis:15021/",
            "http://localhost.:15021/",
        ] {
            let e = parse_url(url).unwrap_err();
            assert!(e.contains("IP address or localhost"), "{url}: {e}");
        }
        for (url, want) in [
            ("http://::1:15021/", "brackets"),
            ("http://[::1/", "unclosed"),
            ("http://[::1]x/", "after the IPv6"),
            ("http://127.0.0.1:http/", "not a port"),
            ("http://127.0.0.1:70000/", "not a port"),
            ("http:///ready", "no host"),
        ] {
            let e = parse_url(url).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
        }
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
        assert!(e.contains("not ready after 500ms"), "{e}");
        assert!(e.contains("refused"), "{e}");
    }
}
