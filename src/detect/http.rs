//! Stage "detect", HTTP/1 part: collects a request head, then reads the name from Host.
//!
//! The end of the head is found by scanning each new byte once (looking back at most two bytes,
//! so a terminator split across pushes is still seen); the complete head is then parsed once with
//! httparse. Anything that would let the client show one name to us and another to the upstream
//! (several Host headers, folded lines, an absolute-form target naming another authority) is
//! refused as malformed.

use super::{normalize_name, Detected, Malformed, Protocol, Step, MAX_HEAD};

/// Header slots for httparse; a head with more lines is refused rather than half-read.
const MAX_HEADERS: usize = 128;

#[derive(Debug)]
pub(crate) struct HttpState {
    /// The head so far (never beyond its end, never beyond `MAX_HEAD`).
    head: Vec<u8>,
    /// Bytes of `head` already searched for the end of the head.
    scanned: usize,
    examined: u64,
}

impl HttpState {
    /// `request_line` is what the sniffer matched (method, target, " HTTP/1."): it holds no line
    /// break, so the search for the end starts after it.
    pub(crate) fn new(request_line: Vec<u8>) -> Self {
        let scanned = request_line.len();
        HttpState {
            head: request_line,
            scanned,
            examined: 0,
        }
    }

    pub(crate) fn examined(&self) -> u64 {
        self.examined
    }

    pub(crate) fn push(&mut self, new: &[u8]) -> Step {
        let room = MAX_HEAD.saturating_sub(self.head.len());
        self.head
            .extend_from_slice(new.get(..room.min(new.len())).unwrap_or_default());
        while self.scanned < self.head.len() {
            let i = self.scanned;
            self.scanned += 1;
            self.examined += 1;
            let byte = self.head.get(i).copied();
            let back = |n: usize| i.checked_sub(n).and_then(|j| self.head.get(j)).copied();
            match byte {
                // The head ends with an empty line: "\r\n\r\n", or bare "\n\n" (and the mixed
                // forms) as tolerated by RFC 9112 §2.2 and httparse.
                Some(b'\n')
                    if back(1) == Some(b'\n')
                        || (back(1) == Some(b'\r') && back(2) == Some(b'\n')) =>
                {
                    self.head.truncate(i + 1);
                    self.examined += self.head.len() as u64;
                    return match parse_head(&self.head) {
                        Ok(detected) => Step::Done(detected),
                        Err(m) => Step::Malformed(m),
                    };
                }
                // A line starting with whitespace continues the previous one (obs-fold): a
                // recipient could join it to Host, so refuse it outright, as soon as it shows.
                Some(b' ' | b'\t') if back(1) == Some(b'\n') => {
                    return Step::Malformed(Malformed::ObsFold);
                }
                _ => {}
            }
        }
        // The fewest bytes that could still end the head: one after a line break, else two.
        let last = self.head.last().copied();
        let before = self
            .head
            .len()
            .checked_sub(2)
            .and_then(|j| self.head.get(j));
        let fewest = match (before, last) {
            (_, Some(b'\n')) | (Some(b'\n'), Some(b'\r')) => 1,
            _ => 2,
        };
        let at_least = self.head.len() + fewest;
        if at_least > MAX_HEAD {
            return Step::TooLarge;
        }
        Step::NeedMore { at_least }
    }
}

/// Parses a complete request head and extracts its name.
fn parse_head(head: &[u8]) -> Result<Detected, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        // Our end-of-head scan and httparse disagree: the head is not what it seems.
        Ok(_) => return Err(Malformed::HttpSyntax("unterminated head")),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooManyHeaders),
        Err(e) => return Err(Malformed::HttpSyntax(syntax_reason(e))),
    }

    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => return Err(Malformed::NoHost),
        (Some(_), Some(_)) => return Err(Malformed::DuplicateHost),
        (Some(h), None) => h.value,
    };
    let host = trim_ows(host);
    if host.is_empty() {
        return Err(Malformed::NoHost);
    }
    let host = strip_port(host)?;

    let target = req.path.unwrap_or_default();
    let is_connect = req.method == Some("CONNECT");
    if let Some(authority) = target_authority(target.as_bytes(), is_connect)? {
        let authority = strip_port(authority)?;
        if comparable(authority) != comparable(host) {
            return Err(Malformed::AuthorityMismatch);
        }
    }

    Ok(Detected {
        protocol: Protocol::Http,
        name: normalize_name(host)?,
        ech: false,
    })
}

fn syntax_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line break",
        httparse::Error::Token => "invalid method or target",
        httparse::Error::Version => "invalid HTTP version",
        _ => "invalid request head",
    }
}

fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |e| e + 1);
    value.get(start..end).unwrap_or_default()
}

/// `host[:port]`, `[v6][:port]`, or a bare IPv6 address (several colons): the host part.
fn strip_port(authority: &[u8]) -> Result<&[u8], Malformed> {
    let (host, port) = if authority.first() == Some(&b'[') {
        let close = authority
            .iter()
            .position(|&b| b == b']')
            .ok_or(Malformed::InvalidName)?;
        let (host, rest) = authority.split_at(close + 1);
        match rest.split_first() {
            None => (host, &b""[..]),
            Some((b':', port)) => (host, port),
            Some(_) => return Err(Malformed::InvalidName),
        }
    } else {
        match authority.iter().filter(|&&b| b == b':').count() {
            0 => (authority, &b""[..]),
            1 => {
                let colon = authority.iter().position(|&b| b == b':').unwrap_or(0);
                let (host, port) = authority.split_at(colon);
                (host, port.get(1..).unwrap_or_default())
            }
            // Not valid in Host, but an unbracketed IPv6 literal is still an IP literal.
            _ => (authority, &b""[..]),
        }
    };
    // RFC 3986 allows an empty port; anything else must be a port number.
    let valid_port = port.iter().all(u8::is_ascii_digit)
        && port.len() <= 5
        && std::str::from_utf8(port)
            .ok()
            .is_none_or(|p| p.is_empty() || p.parse::<u16>().is_ok());
    if !valid_port {
        return Err(Malformed::InvalidName);
    }
    Ok(host)
}

/// The authority of an absolute-form target (`scheme://[userinfo@]host[:port]/...`), or of a
/// CONNECT request's authority-form target. `None` for origin-form (`/...`, including
/// "/redirect?to=http://elsewhere") and asterisk-form (`*`).
///
/// Any other target is refused, and so is an authority with bytes RFC 3986 does not allow
/// there: URL parsers disagree on such shapes (a WHATWG parser reads `http:evil/`,
/// `http:\\evil/` and `http://evil\@good/` as naming host `evil`, an RFC 3986 reader finds
/// no authority or host `good`), so an upstream could route by a host we never compared.
fn target_authority(target: &[u8], is_connect: bool) -> Result<Option<&[u8]>, Malformed> {
    if is_connect {
        return Ok(Some(target));
    }
    if target.first() == Some(&b'/') || target == b"*" {
        return Ok(None);
    }
    const NOT_A_TARGET: Malformed =
        Malformed::HttpSyntax("the request target is neither origin-form nor absolute-form");
    let sep = target
        .windows(3)
        .position(|w| w == b"://")
        .ok_or(NOT_A_TARGET)?;
    let scheme = target.get(..sep).unwrap_or_default();
    let is_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !is_scheme {
        return Err(NOT_A_TARGET);
    }
    let rest = target.get(sep + 3..).unwrap_or_default();
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = rest.get(..end).unwrap_or_default();
    // RFC 3986 §3.2: unreserved, pct-encoded, sub-delims, ":", "@", and "[" "]" of IP-literals.
    let authority_byte = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@[]".contains(b);
    if !authority.iter().all(authority_byte) {
        return Err(Malformed::HttpSyntax(
            "the request target's authority holds characters RFC 3986 does not allow",
        ));
    }
    // Userinfo is not part of the host: "http://user:pw@host/".
    let host_start = authority
        .iter()
        .rposition(|&b| b == b'@')
        .map_or(0, |at| at + 1);
    Ok(authority.get(host_start..))
}

/// Host as compared with the target's authority: case-insensitive, one trailing dot ignored.
fn comparable(host: &[u8]) -> Vec<u8> {
    let lower = host.to_ascii_lowercase();
    match lower.strip_suffix(b".") {
        Some(stripped) => stripped.to_vec(),
        None => lower,
    }
}

#[cfg(test)]
mod tests {
    use super::super::Detector;
    use super::*;

    fn detect(bytes: &[u8]) -> Step {
        Detector::new().push(bytes)
    }

    fn http(name: Option<&str>) -> Step {
        Step::Done(Detected {
            protocol: Protocol::Http,
            name: name.map(str::to_owned),
            ech: false,
        })
    }

    fn malformed(m: Malformed) -> Step {
        Step::Malformed(m)
    }

    #[test]
    fn request_heads() {
        let cases: Vec<(&str, &[u8], Step)> = vec![
            ("plain", b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", http(Some("api.example.com"))),
            ("port", b"GET / HTTP/1.1\r\nHost: api.example.com:8080\r\n\r\n", http(Some("api.example.com"))),
            ("case, dot, spaces", b"GET / HTTP/1.1\r\nhOST:   API.Example.com.:80  \r\n\r\n", http(Some("api.example.com"))),
            ("bare LF", b"GET / HTTP/1.1\nHost: a.example\n\n", http(Some("a.example"))),
            ("HTTP/1.0", b"POST /x HTTP/1.0\r\nHost: a.example\r\n\r\n", http(Some("a.example"))),
            ("ipv6 with port", b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n", http(None)),
            ("ipv6", b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", http(None)),
            ("ipv4 with port", b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", http(None)),
            ("absolute-form same authority", b"GET http://user:pw@API.example.com:80/x?y HTTP/1.1\r\nHost: api.example.com\r\n\r\n", http(Some("api.example.com"))),
            ("absolute-form without path", b"GET http://a.example HTTP/1.1\r\nHost: a.example:80\r\n\r\n", http(Some("a.example"))),
            ("url in query is origin-form", b"GET /r?to=http://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", http(Some("a.example"))),
            ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", http(Some("a.example"))),
            ("connect same", b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", http(Some("a.example"))),
            ("a body after the head is not read", b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nHost:", http(Some("a.example"))),
            ("no host", b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", malformed(Malformed::NoHost)),
            ("empty host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", malformed(Malformed::NoHost)),
            ("duplicate host", b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n", malformed(Malformed::DuplicateHost)),
            ("obs-fold", b"GET / HTTP/1.1\r\nX-A: 1\r\n Host: b.example\r\nHost: a.example\r\n\r\n", malformed(Malformed::ObsFold)),
            ("obs-fold tab", b"GET / HTTP/1.1\r\nHost: a.example\r\n\tb.example\r\n\r\n", malformed(Malformed::ObsFold)),
            ("absolute-form mismatch", b"GET http://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::AuthorityMismatch)),
            ("absolute-form userinfo trick", b"GET http://a.example@b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::AuthorityMismatch)),
            ("https absolute-form mismatch", b"GET HTTPS://b.example:443/ HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::AuthorityMismatch)),
            ("backslash before userinfo", b"GET http://b.example\\@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::HttpSyntax("the request target's authority holds characters RFC 3986 does not allow"))),
            ("scheme without slashes", b"GET http:b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::HttpSyntax("the request target is neither origin-form nor absolute-form"))),
            ("backslashes for slashes", b"GET http:\\\\b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::HttpSyntax("the request target is neither origin-form nor absolute-form"))),
            ("authority-form without CONNECT", b"GET b.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::HttpSyntax("the request target is neither origin-form nor absolute-form"))),
            ("connect mismatch", b"CONNECT b.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n", malformed(Malformed::AuthorityMismatch)),
            ("invalid host", b"GET / HTTP/1.1\r\nHost: a_b!.example\r\n\r\n", malformed(Malformed::InvalidName)),
            ("bad port", b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n", malformed(Malformed::InvalidName)),
            ("port out of range", b"GET / HTTP/1.1\r\nHost: a.example:70000\r\n\r\n", malformed(Malformed::InvalidName)),
            ("unclosed bracket", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", malformed(Malformed::InvalidName)),
            ("bad header name", b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", malformed(Malformed::HttpSyntax("invalid header name"))),
            ("bad version digit", b"GET / HTTP/1.x\r\nHost: a.example\r\n\r\n", malformed(Malformed::HttpSyntax("invalid HTTP version"))),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(detect(bytes), want, "{what}");
            // The same, one byte per push.
            let mut d = Detector::new();
            let mut last = None;
            for b in bytes {
                last = Some(d.push(std::slice::from_ref(b)));
                if last.as_ref().is_some_and(Step::is_final) {
                    break;
                }
            }
            assert_eq!(last, Some(want), "{what}, dripped");
        }
    }

    #[test]
    fn too_many_headers() {
        let mut head = b"GET / HTTP/1.1\r\nHost: a.example\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert_eq!(detect(&head), malformed(Malformed::TooManyHeaders));
    }

    #[test]
    fn head_size_limit() {
        let head = |filler: usize| {
            let mut h = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: ".to_vec();
            h.resize(h.len() + filler, b'p');
            h.extend_from_slice(b"\r\n\r\n");
            h
        };
        let base = head(0).len();
        let exact = head(MAX_HEAD - base);
        assert_eq!(exact.len(), MAX_HEAD);
        assert_eq!(detect(&exact), http(Some("a.example")));
        let over = head(MAX_HEAD - base + 1);
        assert_eq!(detect(&over), Step::TooLarge);
        // Decided as soon as no ending can fit any more: "...p\r\n" could still end with one
        // "\n", but once the "\r" arrives the shortest ending needs one byte too many.
        let mut d = Detector::new();
        assert_eq!(
            d.push(&over[..MAX_HEAD - 1]),
            Step::NeedMore { at_least: MAX_HEAD }
        );
        assert_eq!(d.push(&over[MAX_HEAD - 1..MAX_HEAD]), Step::TooLarge);
    }

    #[test]
    fn need_more_counts_the_shortest_possible_ending() {
        let mut d = Detector::new();
        assert_eq!(d.push(b"GET / HTTP/1.1"), Step::NeedMore { at_least: 16 });
        assert_eq!(d.push(b"\r"), Step::NeedMore { at_least: 17 });
        assert_eq!(d.push(b"\n"), Step::NeedMore { at_least: 17 });
        assert_eq!(d.push(b"\r"), Step::NeedMore { at_least: 18 });
        assert_eq!(d.push(b"\n"), malformed(Malformed::NoHost));
    }

    #[test]
    fn sixty_kib_head_dripped_examines_at_most_twice() {
        let mut head = b"GET /index.html HTTP/1.1\r\nHost: big.example\r\n".to_vec();
        let mut i = 0;
        while head.len() < 60 * 1024 {
            head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(500)).as_bytes());
            i += 1;
        }
        head.extend_from_slice(b"\r\n");
        assert!(i < MAX_HEADERS);
        let mut d = Detector::new();
        let mut last = None;
        for (n, b) in head.iter().enumerate() {
            let step = d.push(std::slice::from_ref(b));
            if n + 1 < head.len() {
                match step {
                    Step::NeedMore { at_least } => {
                        assert!(at_least > n + 1 && at_least <= head.len())
                    }
                    other => panic!("at {n}: {other:?}"),
                }
            }
            last = Some(step);
        }
        assert_eq!(last, Some(http(Some("big.example"))));
        assert!(
            d.examined() <= 2 * head.len() as u64,
            "{} > 2 x {}",
            d.examined(),
            head.len()
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        assert_eq!(strip_port(b"a.example:"), Ok(&b"a.example"[..]));
        assert_eq!(strip_port(b"[::1]:443"), Ok(&b"[::1]"[..]));
        assert_eq!(strip_port(b"[::1]x"), Err(Malformed::InvalidName));
        assert_eq!(strip_port(b"::1"), Ok(&b"::1"[..]));
        assert_eq!(target_authority(b"http://h/p", false), Ok(Some(&b"h"[..])));
        assert_eq!(
            target_authority(b"http://u@h?q", false),
            Ok(Some(&b"h"[..]))
        );
        assert_eq!(target_authority(b"/p", false), Ok(None));
        assert_eq!(target_authority(b"*", false), Ok(None));
        for odd in [
            &b"1http://h/"[..],
            b"http:h/",
            b"http:/h/",
            b"http:\\\\h/",
            b"h:80",
            b"http://a\\@h/",
            b"http://a\"@h/",
        ] {
            assert!(
                target_authority(odd, false).is_err(),
                "{}",
                String::from_utf8_lossy(odd)
            );
        }
    }
}
