//! `portcullis wait`: polls the health endpoint until it answers 200, for
//! start-up ordering where native sidecars are not available.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Splits `http://HOST:PORT/PATH`.
fn parse_url(url: &str) -> Result<(String, String), String> {
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
    Ok((authority.to_string(), path.to_string()))
}

fn probe(addr: SocketAddr, authority: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

pub fn wait(url: &str, timeout: Duration) -> Result<(), String> {
    let (authority, path) = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match authority.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    match probe(a, &authority, &path) {
                        Ok(200) => return Ok(()),
                        Ok(code) => last = format!("{url} answered {code}"),
                        Err(e) => last = format!("{url}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("{url}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "portcullis wait: not ready after {timeout:?} ({last})"
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls() {
        assert_eq!(
            super::parse_url("http://127.0.0.1:15021/ready").unwrap(),
            ("127.0.0.1:15021".into(), "/ready".into())
        );
        assert!(super::parse_url("https://x/").is_err());
    }
}
