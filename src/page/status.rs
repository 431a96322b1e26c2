//! `portcullis status [--url http://127.0.0.1:15000]`: the traffic page's
//! summary as a table, for a terminal over SSH. It reads `/api/summary` and
//! `/api/denied` with a small HTTP/1.1 GET over a `TcpStream`: the URL's
//! host must be an IP literal or `localhost` (never a name lookup, so the
//! static build needs no resolver library; the admin listener answers only
//! loopback anyway).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Largest answer read (the summary of a registry of thousands of entries
/// is well below).
const MAX_BODY: usize = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

/// The admin base URL split into the addresses to try and the authority
/// (for the Host header).
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub addrs: Vec<SocketAddr>,
    pub authority: String,
    pub base_path: String,
}

/// Parses `http://HOST[:PORT][/PATH]`: HOST is an IPv4 literal, `[IPv6]`
/// or `localhost` (127.0.0.1, then ::1); PORT defaults to 80.
pub fn parse_target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("{url}: unclosed [ in the host"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{url}: junk after ]"))?,
            ),
        };
        let ip: Ipv6Addr = h
            .parse()
            .map_err(|_| format!("{url}: {h} is not an IPv6 address"))?;
        (vec![IpAddr::V6(ip)], port)
    } else {
        let (h, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ips = if h.eq_ignore_ascii_case("localhost") {
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]
        } else {
            let ip: Ipv4Addr = h.parse().map_err(|_| {
                format!("{url}: the host must be an IP address or localhost (no name lookups)")
            })?;
            vec![IpAddr::V4(ip)]
        };
        (ips, port)
    };
    let port: u16 = match port {
        None => 80,
        Some(p) => p
            .parse()
            .map_err(|_| format!("{url}: {p:?} is not a port"))?,
    };
    Ok(Target {
        addrs: host
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
        authority: authority.to_string(),
        base_path: path.trim_end_matches('/').to_string(),
    })
}

/// GET `path` from the target: the body of a 200 answer.
pub fn get(t: &Target, path: &str) -> Result<Vec<u8>, String> {
    let mut last = String::from("no address");
    for a in &t.addrs {
        match get_one(*a, &t.authority, &format!("{}{path}", t.base_path)) {
            Ok(b) => return Ok(b),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(last)
}

fn get_one(addr: SocketAddr, authority: &str, path: &str) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: portcullis-status\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_BODY {
                    return Err("answer too large".into());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    parse_response(&raw)
}

/// The body of a complete HTTP/1.1 response (Content-Length, chunked, or
/// until close), if its status is 200.
fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("truncated answer".into()),
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let mut chunked = false;
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        }
    }
    let rest = &raw[head_len..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or("truncated body")?.to_vec()
    } else {
        rest.to_vec()
    };
    if code != 200 {
        let text = String::from_utf8_lossy(&body);
        return Err(format!("answered {code}: {}", text.trim()));
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&b[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or("truncated chunk")?);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// A name for a terminal: control characters escaped.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn table(head: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if right[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn map_text(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{}={}", clean(k), n(v)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// The status text from `/api/summary` and `/api/denied` answers.
pub fn render(url: &str, summary: &Value, denied: &Value, all: bool) -> String {
    let s = |k: &str| summary[k].as_str().unwrap_or("?").to_string();
    let mut out = String::new();
    let reload = &summary["reload"];
    let reload_text = if summary["reload_ok"].as_bool().unwrap_or(true) {
        match reload["last_reload"].as_str() {
            Some(t) => format!("ok (last {t})"),
            None => "ok (no reload yet)".into(),
        }
    } else {
        format!(
            "FAILED: {}",
            clean(reload["last_error"].as_str().unwrap_or("?"))
        )
    };
    out.push_str(&format!(
        "portcullis {} at {url}: policy {}, audit {}, {}, active flows {}\nconfig {}: reload {reload_text}\n",
        s("version"),
        s("policy"),
        if summary["audit"].as_bool().unwrap_or(false) {
            "on"
        } else {
            "off"
        },
        if summary["draining"].as_bool().unwrap_or(false) {
            "DRAINING"
        } else if summary["ready"].as_bool().unwrap_or(false) {
            "ready"
        } else {
            "not ready"
        },
        n(&summary["active"]),
        clean(&s("config_path")),
    ));
    if reload["rerun_init"].as_bool().unwrap_or(false) {
        out.push_str("rules: re-run `portcullis init` (the policy or [redirect] changed)\n");
    }
    let entries = summary["entries"].as_array().cloned().unwrap_or_default();
    let mut shown: Vec<&Value> = entries
        .iter()
        .filter(|e| all || n(&e["flows_total"]) > 0)
        .collect();
    shown.sort_by(|a, b| {
        n(&b["flows_total"])
            .cmp(&n(&a["flows_total"]))
            .then(a["name"].as_str().cmp(&b["name"].as_str()))
    });
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|e| {
            let f = &e["flows"];
            vec![
                clean(e["name"].as_str().unwrap_or("?")),
                e["kind"].as_str().unwrap_or("?").to_string(),
                n(&e["flows_total"]).to_string(),
                n(&f["allow"]).to_string(),
                n(&f["deny"]).to_string(),
                n(&f["audit"]).to_string(),
                n(&f["passthrough"]).to_string(),
                n(&e["bytes_up"]).to_string(),
                n(&e["bytes_down"]).to_string(),
                map_text(&e["denials"]),
                e["last_seen"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            "ENTRY",
            "KIND",
            "FLOWS",
            "ALLOW",
            "DENY",
            "AUDIT",
            "PASS",
            "BYTES_UP",
            "BYTES_DOWN",
            "DENIALS",
            "LAST_SEEN",
        ],
        &rows,
        &[
            false, false, true, true, true, true, true, true, true, false, false,
        ],
    ));
    let idle = entries.len() - shown.len();
    if idle > 0 {
        out.push_str(&format!(
            "({idle} entries without flows not shown; --all lists them)\n"
        ));
    }
    let t = &summary["totals"];
    out.push_str(&format!(
        "total: {} flows (allow {}, deny {}, audit {}, passthrough {}), {} bytes up, {} bytes down\n",
        ["allow", "deny", "audit", "passthrough"]
            .iter()
            .map(|d| n(&t["flows"][*d]))
            .sum::<u64>(),
        n(&t["flows"]["allow"]),
        n(&t["flows"]["deny"]),
        n(&t["flows"]["audit"]),
        n(&t["flows"]["passthrough"]),
        n(&t["bytes_up"]),
        n(&t["bytes_down"]),
    ));
    let names = denied["names"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "\ntop denied and audited names ({} of {}; {} records held, at most {}):\n",
        names.len(),
        n(&denied["names_total"]),
        n(&denied["held"]),
        n(&denied["max"]),
    ));
    if !names.is_empty() {
        let rows: Vec<Vec<String>> = names
            .iter()
            .map(|d| {
                vec![
                    clean(d["name"].as_str().unwrap_or("?")),
                    n(&d["count"]).to_string(),
                    n(&d["decisions"]["deny"]).to_string(),
                    n(&d["decisions"]["audit"]).to_string(),
                    d["ports"]
                        .as_array()
                        .map(|p| {
                            p.iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default(),
                    map_text(&d["reasons"]),
                    d["last_seen"].as_str().unwrap_or("-").to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "NAME",
                "COUNT",
                "DENY",
                "AUDIT",
                "PORTS",
                "REASONS",
                "LAST_SEEN",
            ],
            &rows,
            &[false, true, true, true, false, false, false],
        ));
        out.push_str(
            "(`curl URL/denied?format=toml` gives the service entries that would allow them)\n",
        );
    }
    out
}

/// `portcullis status`: fetches and renders; Err is the message to print.
pub fn status(url: &str, top: usize, all: bool) -> Result<String, String> {
    let t = parse_target(url)?;
    let fetch = |path: &str| -> Result<Value, String> {
        let body = get(&t, path).map_err(|e| format!("portcullis status: {url}{path}: {e}"))?;
        serde_json::from_slice(&body)
            .map_err(|e| format!("portcullis status: {url}{path}: not JSON: {e}"))
    };
    let summary = fetch("/api/summary")?;
    let denied = fetch(&format!("/api/denied?limit={top}"))?;
    Ok(render(url, &summary, &denied, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = parse_target("http://127.0.0.1:15000").unwrap();
        assert_eq!(t.addrs, vec!["127.0.0.1:15000".parse().unwrap()]);
        assert_eq!(t.authority, "127.0.0.1:15000");
        assert_eq!(t.base_path, "");
        let t = parse_target("http://localhost:15000/").unwrap();
        assert_eq!(
            t.addrs,
            vec![
                "127.0.0.1:15000".parse().unwrap(),
                "[::1]:15000".parse().unwrap()
            ]
        );
        let t = parse_target("http://[::1]:9/x/").unwrap();
        assert_eq!(t.addrs, vec!["[::1]:9".parse().unwrap()]);
        assert_eq!(t.base_path, "/x");
        assert_eq!(
            parse_target("http://10.0.0.1").unwrap().addrs,
            vec!["10.0.0.1:80".parse().unwrap()]
        );
        for bad in [
            "https://127.0.0.1",
            "http://admin.example:15000",
            "http://[::1",
            "http://127.0.0.1:http",
            "127.0.0.1:15000",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").unwrap(),
            b"hi"
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
            )
            .unwrap(),
            b"abcde"
        );
        let e = parse_response(b"HTTP/1.1 421 Misdirected\r\ncontent-length: 4\r\n\r\nnope")
            .unwrap_err();
        assert!(e.contains("421") && e.contains("nope"), "{e}");
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi").is_err());
    }

    #[test]
    fn names_are_cleaned_for_the_terminal() {
        assert_eq!(clean("a\u{1b}[31mb"), "a\\u{1b}[31mb");
    }
}
