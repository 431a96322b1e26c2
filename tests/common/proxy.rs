//! The proxy under test: its config, its access log (JSON lines on stdout)
//! and its HTTP listeners (admin, health), read from inside a namespace.

use std::io::{self, Write};
use std::time::Duration;

use serde_json::Value;

use super::{connect_in, read_to_end_timeout, Proc};

/// Parses access-log lines (one JSON object a line); panics on a line that is not JSON.
#[track_caller]
pub fn parse_log<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<Value> {
    lines
        .into_iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
        .collect()
}

/// The access log (the proxy's stdout) once it holds at least `n` lines,
/// waiting up to `wait`; panics (with the proxy's logs) if it never does.
#[track_caller]
pub fn access_log(proxy: &mut Proc, n: usize, wait: Duration) -> Vec<Value> {
    let lines = proxy.wait_stdout_lines(n, wait);
    let v = parse_log(lines.iter().map(String::as_str));
    assert!(
        v.len() >= n,
        "wanted {n} log lines, got {} {v:?}\n{}",
        v.len(),
        proxy.logs(4000)
    );
    v
}

/// `GET path` over HTTP/1.0 (the answer is close-delimited, never chunked)
/// to `addr` from inside `ns`, with `Host: host`; the status code, the head
/// (lower-cased) and the body.
pub fn http_get_host(
    ns: &str,
    addr: &str,
    path: &str,
    host: &str,
) -> io::Result<(u16, String, String)> {
    let mut s = connect_in(ns, addr.parse().unwrap(), Duration::from_secs(5))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let (raw, r) = read_to_end_timeout(&mut s, Duration::from_secs(10));
    r?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP head in {text:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
    Ok((code, head.to_ascii_lowercase(), body.to_string()))
}

/// [`http_get_host`] with `Host: addr`; the status code and the body.
pub fn http_get(ns: &str, addr: &str, path: &str) -> io::Result<(u16, String)> {
    http_get_host(ns, addr, path, addr).map(|(code, _, body)| (code, body))
}

/// A config for a world's proxy: top-level keys, `[proxy]` keys (one a line,
/// overriding the short test defaults below), `[redirect]` for [`PROXY_UID`],
/// then `entries` (which may go on with more `[redirect]` keys first).
pub fn proxy_config(top: &str, proxy: &str, entries: &str) -> String {
    let defaults = [
        ("listen", r#"["127.0.0.1:15001", "[::1]:15001"]"#),
        ("health", r#""127.0.0.1:15021""#),
        ("admin", r#""127.0.0.1:15000""#),
        ("hello_timeout", r#""2s""#),
        ("first_byte_timeout", r#""300ms""#),
        ("connect_timeout", r#""2s""#),
        ("drain_min", r#""0s""#),
        ("drain_timeout", r#""2s""#),
    ];
    let given: Vec<&str> = proxy
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    let mut p = String::new();
    for (k, v) in defaults {
        if !given.contains(&k) {
            p.push_str(&format!("{k} = {v}\n"));
        }
    }
    format!(
        "{top}\n[proxy]\n{p}{proxy}\n\n[redirect]\nproxy_uid = 1337\nproxy_gid = 1337\n{entries}"
    )
}

/// The `[[service_entry]]` "api": api.example.com (192.0.2.10, 2001:db8::10 in
/// the world's DNS) on 443 TLS and 80 HTTP. A macro (a literal), so a test's
/// registry constant is `concat!(api_entry!(), r#"..."#)`.
macro_rules! api_entry {
    () => {
        r#"
[[service_entry]]
name = "api"
hosts = ["api.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }]
"#
    };
}
pub(crate) use api_entry;

/// The `[[service_entry]]` "files": *.files.example.com on 443 TLS (a literal,
/// like [`api_entry`]).
macro_rules! files_entry {
    () => {
        r#"
[[service_entry]]
name = "files"
hosts = ["*.files.example.com"]
ports = [{ number = 443, protocol = "TLS" }]
"#
    };
}
pub(crate) use files_entry;

/// A `[[service_entry]]` of resolution NONE: `name` for `host`, only at `address`, on one
/// port (a literal, like [`api_entry`]).
macro_rules! pinned_entry {
    ($name:literal, $host:literal, $address:literal, $port:literal, $protocol:literal) => {
        concat!(
            "\n[[service_entry]]\nname = \"",
            $name,
            "\"\nhosts = [\"",
            $host,
            "\"]\naddresses = [\"",
            $address,
            "\"]\nports = [{ number = ",
            $port,
            ", protocol = \"",
            $protocol,
            "\" }]\nresolution = \"NONE\"\n"
        )
    };
}
pub(crate) use pinned_entry;

/// Asserts that the access-log line `l` holds each `(field, string value)`,
/// all compared at once; a miss names the whole line.
#[track_caller]
pub fn assert_log(l: &Value, want: &[(&str, &str)]) {
    let got: Vec<Option<&str>> = want.iter().map(|(k, _)| l[*k].as_str()).collect();
    let expected: Vec<Option<&str>> = want.iter().map(|(_, v)| Some(*v)).collect();
    assert_eq!(got, expected, "{l}");
}
