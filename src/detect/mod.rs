//! Stage "detect" (docs/DESIGN.md §3 steps 4-5): classify a flow from the client's first bytes as a TLS
//! ClientHello, an HTTP/1 request head or something opaque, and extract the name it presents.
//!
//! The detector is pure: it never touches a socket. The caller reads (consumes) bytes, keeps them
//! to write upstream later, and hands each new slice to [`Detector::push`]. Every byte is looked
//! at a bounded number of times however the client slices its data, so a client dripping a 64 KiB
//! hello one byte per segment costs linear, not quadratic, work; [`Step::NeedMore`] says how many
//! bytes must have arrived before anything can change, so the caller can set `SO_RCVLOWAT` and
//! sleep instead of waking on every byte.

mod http;
mod tls;

use std::fmt;

use crate::name::Presented;

/// Largest ClientHello (all its records, headers included) or HTTP request head we accept.
pub const MAX_HEAD: usize = 64 * 1024;

pub use crate::vocab::Protocol;

/// The protocol a flow's first byte suggests, when detection could not
/// finish (for the deny answer and the log): a TLS record, an upper-case
/// HTTP method, else opaque.
pub fn guess_protocol(buf: &[u8]) -> Protocol {
    match buf.first() {
        Some(0x16) => Protocol::Tls,
        Some(b) if b.is_ascii_uppercase() => Protocol::Http,
        _ => Protocol::Tcp,
    }
}

/// The outcome of a successful detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub protocol: Protocol,
    /// SNI host_name or Host, normalised (lower case, no trailing dot, no port). `None` when the
    /// client presented no name, presented an IP literal, or the flow is opaque.
    pub name: Option<String>,
    /// The ClientHello carried an encrypted_client_hello extension (real or GREASE).
    pub ech: bool,
}

impl Detected {
    fn opaque() -> Self {
        Detected {
            protocol: Protocol::Tcp,
            name: None,
            ech: false,
        }
    }
}

/// Why a ClientHello or request head was refused. Every variant maps to the reason `malformed`;
/// the variant itself is for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A TLS length field disagrees with the bytes around it.
    BadLength,
    /// A TLS record header carries a version that is not 3.x, or a zero/oversized length.
    BadRecord,
    /// A record of another content type arrived before the ClientHello was complete.
    UnexpectedRecord,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// legacy_version of the ClientHello is not 3.x.
    BadVersion,
    /// Bytes follow the ClientHello inside its last record, or follow its extension block.
    TrailingData,
    /// The extension list does not parse exactly to its declared end.
    ExtensionsTrailing,
    /// The same extension type appears twice (RFC 8446 §4.2 forbids it; two SNI extensions
    /// would otherwise let a client pick which one we read).
    DuplicateExtension,
    /// The server_name extension is malformed (empty list, bad entry lengths).
    BadServerName,
    /// The server_name list holds more than one host_name.
    TwoHostNames,
    /// The server_name list holds a name whose type is not host_name.
    OtherNameType,
    /// The request head has no Host header (or an empty one).
    NoHost,
    /// The request head has several Host headers.
    DuplicateHost,
    /// A header line starts with space or tab (obsolete line folding, RFC 9112 §5.2).
    ObsFold,
    /// The authority of an absolute-form (or CONNECT) target differs from Host.
    AuthorityMismatch,
    /// More header lines than the parser's slots.
    TooManyHeaders,
    /// The request head is not valid HTTP/1 syntax.
    HttpSyntax(&'static str),
    /// The name is neither a valid DNS name nor an IP literal.
    InvalidName,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Malformed::BadLength => "a TLS length field is inconsistent",
            Malformed::BadRecord => "a TLS record header is invalid",
            Malformed::UnexpectedRecord => {
                "a non-handshake TLS record arrived before the ClientHello was complete"
            }
            Malformed::NotClientHello => "the first TLS handshake message is not a ClientHello",
            Malformed::BadVersion => "the ClientHello's legacy_version is not 3.x",
            Malformed::TrailingData => "bytes trail the ClientHello",
            Malformed::ExtensionsTrailing => {
                "the ClientHello's extension list does not parse to its end"
            }
            Malformed::DuplicateExtension => "a ClientHello extension appears twice",
            Malformed::BadServerName => "the server_name extension is malformed",
            Malformed::TwoHostNames => "the server_name extension holds two host_names",
            Malformed::OtherNameType => {
                "the server_name extension holds a name that is not a host_name"
            }
            Malformed::NoHost => "the request has no Host header",
            Malformed::DuplicateHost => "the request has several Host headers",
            Malformed::ObsFold => "the request head uses obsolete line folding",
            Malformed::AuthorityMismatch => "the request target's authority differs from Host",
            Malformed::TooManyHeaders => "the request head has too many header lines",
            Malformed::HttpSyntax(what) => return write!(f, "the request head is invalid: {what}"),
            Malformed::InvalidName => "the name is not a valid DNS name",
        };
        f.write_str(text)
    }
}

impl std::error::Error for Malformed {}

/// The detector's answer after each push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// need at least this many bytes in total (pushed so far) before another step can progress
    NeedMore {
        at_least: usize,
    },
    Done(Detected),
    Malformed(Malformed),
    TooLarge,
}

impl Step {
    /// True for every answer but `NeedMore`: pushing more bytes will not change it.
    pub fn is_final(&self) -> bool {
        !matches!(self, Step::NeedMore { .. })
    }
}

/// Incremental classifier of a flow's first bytes. Feed it with [`Detector::push`] until the
/// answer is final; after that it repeats the final answer and looks at nothing more.
#[derive(Debug)]
pub struct Detector {
    state: State,
    /// Bytes looked at by the sniffing phase (the later phases count their own).
    sniff_examined: u64,
    /// What the protocol parser had looked at when the answer became final.
    finished_examined: u64,
}

#[derive(Debug)]
enum State {
    Sniff(Sniff),
    Tls(tls::TlsState),
    Http(http::HttpState),
    Finished(Step),
}

/// Where the sniffer stands in the first bytes.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Nothing seen yet.
    Start,
    /// Saw 0x16 (and perhaps 0x03): a TLS record header may be starting.
    TlsHeader,
    /// Inside an upper-case token that may be an HTTP method.
    Method,
    /// Inside the request target (at least one byte seen when `len > 0`).
    Target { len: usize },
    /// Matched this many bytes of " HTTP/1." after the target (the leading space included).
    Version { matched: usize },
}

/// The request line up to the version digit: matched byte by byte after the target.
const HTTP1_VERSION: &[u8] = b" HTTP/1.";
/// RFC 9110 has longer methods, but none of the ones in use exceeds this; longer tokens are
/// treated as opaque rather than buffered.
const MAX_METHOD: usize = 16;

#[derive(Debug)]
struct Sniff {
    /// Every byte pushed so far; handed to the protocol parser once the protocol is known. It
    /// only grows past a few bytes while a long HTTP request target streams in.
    buf: Vec<u8>,
    phase: Phase,
}

/// What one sniffed byte tells.
enum Sniffed {
    Undecided,
    Tls,
    Http,
    Opaque,
}

impl Sniff {
    fn step(&mut self, b: u8) -> Sniffed {
        let pos = self.buf.len();
        self.buf.push(b);
        match self.phase {
            Phase::Start => {
                if b == 0x16 {
                    self.phase = Phase::TlsHeader;
                    Sniffed::Undecided
                } else if b.is_ascii_uppercase() {
                    self.phase = Phase::Method;
                    Sniffed::Undecided
                } else {
                    Sniffed::Opaque
                }
            }
            // A TLS record header starts 0x16 0x03 0x00..=0x04 (SSL 3.0 to TLS 1.3 record versions).
            Phase::TlsHeader => match (pos, b) {
                (1, 0x03) => Sniffed::Undecided,
                (2, 0x00..=0x04) => Sniffed::Tls,
                _ => Sniffed::Opaque,
            },
            Phase::Method => {
                if b == b' ' {
                    self.phase = Phase::Target { len: 0 };
                    Sniffed::Undecided
                } else if b.is_ascii_uppercase() && pos < MAX_METHOD {
                    Sniffed::Undecided
                } else {
                    Sniffed::Opaque
                }
            }
            Phase::Target { len } => {
                if b == b' ' && len > 0 {
                    self.phase = Phase::Version { matched: 1 };
                    Sniffed::Undecided
                } else if b > b' ' && b != 0x7f {
                    // Visible ASCII or obs-text: the HTTP parser judges the target's syntax later.
                    self.phase = Phase::Target { len: len + 1 };
                    Sniffed::Undecided
                } else {
                    Sniffed::Opaque
                }
            }
            Phase::Version { matched } => {
                if HTTP1_VERSION.get(matched) != Some(&b) {
                    // Includes the HTTP/2 preface "PRI * HTTP/2.0": it is not HTTP/1.
                    Sniffed::Opaque
                } else if matched + 1 == HTTP1_VERSION.len() {
                    Sniffed::Http
                } else {
                    self.phase = Phase::Version {
                        matched: matched + 1,
                    };
                    Sniffed::Undecided
                }
            }
        }
    }
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

impl Detector {
    pub fn new() -> Self {
        Detector {
            state: State::Sniff(Sniff {
                buf: Vec::new(),
                phase: Phase::Start,
            }),
            sniff_examined: 0,
            finished_examined: 0,
        }
    }

    /// Feed newly received bytes (the caller keeps all bytes itself too and later writes them upstream).
    /// Cost must be linear in the total bytes pushed: never re-scan the whole buffer per call.
    pub fn push(&mut self, new: &[u8]) -> Step {
        let step = match &mut self.state {
            State::Finished(step) => return step.clone(),
            State::Tls(t) => t.push(new),
            State::Http(h) => h.push(new),
            State::Sniff(s) => {
                let mut decided = None;
                for (i, &b) in new.iter().enumerate() {
                    self.sniff_examined += 1;
                    match s.step(b) {
                        Sniffed::Undecided => {}
                        v => {
                            decided = Some((v, i + 1));
                            break;
                        }
                    }
                }
                match decided {
                    None if s.buf.len() >= MAX_HEAD => Step::TooLarge,
                    None => Step::NeedMore {
                        // Any single byte may rule a candidate protocol out.
                        at_least: s.buf.len() + 1,
                    },
                    Some((verdict, used)) => {
                        let prefix = std::mem::take(&mut s.buf);
                        let rest = new.get(used..).unwrap_or_default();
                        match verdict {
                            Sniffed::Tls => {
                                let mut t = tls::TlsState::new();
                                let first = t.push(&prefix);
                                let step = if first.is_final() {
                                    first
                                } else {
                                    t.push(rest)
                                };
                                self.state = State::Tls(t);
                                step
                            }
                            Sniffed::Http => {
                                // The sniffed request line holds no line break, so the search
                                // for the end of the head starts after it.
                                let mut h = http::HttpState::new(prefix);
                                let step = h.push(rest);
                                self.state = State::Http(h);
                                step
                            }
                            Sniffed::Opaque | Sniffed::Undecided => Step::Done(Detected::opaque()),
                        }
                    }
                }
            }
        };
        if step.is_final() {
            self.finished_examined = self.parser_examined();
            self.state = State::Finished(step.clone());
        }
        step
    }

    /// bytes the detector actually examined so far (for the metric portcullis_detect_bytes_examined_total; must stay <= ~2x bytes pushed however the input is sliced)
    pub fn examined(&self) -> u64 {
        self.sniff_examined + self.parser_examined()
    }

    fn parser_examined(&self) -> u64 {
        match &self.state {
            State::Tls(t) => t.examined(),
            State::Http(h) => h.examined(),
            State::Sniff(_) => 0,
            State::Finished(_) => self.finished_examined,
        }
    }
}

/// Normalises a name presented by a client (SNI host_name, or Host without its port) with the
/// project's one normalisation ([`crate::name::normalize`]), so that detection, the registry and
/// `explain` agree on what a name is.
///
/// `Ok(None)` for IP literals: they are no name, so they match no host (docs/DESIGN.md §3.5).
pub(crate) fn normalize_name(raw: &[u8]) -> Result<Option<String>, Malformed> {
    // Names are ASCII; other bytes (UTF-8 or not) can only be invalid.
    let text = std::str::from_utf8(raw).map_err(|_| Malformed::InvalidName)?;
    match crate::name::normalize(text) {
        Presented::Name(name) => Ok(Some(name)),
        Presented::IpLiteral => Ok(None),
        Presented::Invalid => Err(Malformed::InvalidName),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Step {
        Detector::new().push(input)
    }

    fn opaque() -> Step {
        Step::Done(Detected::opaque())
    }

    #[test]
    fn names_are_normalised() {
        let ok = |s: &str| normalize_name(s.as_bytes());
        assert_eq!(ok("API.Example.COM."), Ok(Some("api.example.com".into())));
        assert_eq!(ok("_svc.example.com"), Ok(Some("_svc.example.com".into())));
        assert_eq!(ok("localhost"), Ok(Some("localhost".into())));
        assert_eq!(ok("192.0.2.7"), Ok(None));
        assert_eq!(ok("192.0.2.7."), Ok(None));
        assert_eq!(ok("[2001:db8::1]"), Ok(None));
        assert_eq!(ok("2001:db8::1"), Ok(None));
        assert_eq!(ok("[2001:db8::1]."), Ok(None));
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "a.b..",
            "-a.example",
            "a-.example",
            "exa mple.com",
            "ex*ample.com",
            "[example.com]",
            "[::1",
            "fe80::1%eth0",
            "bücher.example",
            "a.example..",
        ] {
            assert_eq!(ok(bad), Err(Malformed::InvalidName), "{bad:?}");
        }
        assert_eq!(normalize_name(b"\xff.example"), Err(Malformed::InvalidName));
        let label = "a".repeat(63);
        assert!(ok(&format!("{label}.com")).is_ok());
        assert_eq!(ok(&format!("a{label}.com")), Err(Malformed::InvalidName));
        let long = ["abcdefghi"; 26].join("."); // 259 bytes
        assert_eq!(ok(&long), Err(Malformed::InvalidName));
        let just = format!("{}.a", ["abcdefghi"; 25].join(".")); // 251 bytes
        assert!(ok(&just).is_ok());
    }

    #[test]
    fn opaque_protocols() {
        assert_eq!(run(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), opaque());
        assert_eq!(run(b"SSH-2.0-OpenSSH_9.2p1\r\n"), opaque());
        assert_eq!(
            run(&[0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f]),
            opaque()
        );
        assert_eq!(run(b"\x16\x03\x05\x00\x10"), opaque());
        assert_eq!(run(b"\x16\x02"), opaque());
        assert_eq!(run(b"get / HTTP/1.1\r\n"), opaque());
        assert_eq!(run(b"GET  / HTTP/1.1\r\n"), opaque());
        assert_eq!(run(b"GET /\r\n"), opaque());
        assert_eq!(run(b"GET / HTTP/2\r\n"), opaque());
        assert_eq!(run(b"ABCDEFGHIJKLMNOPQ / HTTP/1.1\r\n"), opaque());
        assert_eq!(run(b"\x80\x2e\x01\x03\x01"), opaque());
    }

    #[test]
    fn prefixes_of_recognisable_things_wait() {
        for prefix in [
            &b""[..],
            b"\x16",
            b"\x16\x03",
            b"P",
            b"PRI * HTTP/",
            b"GET",
            b"GET ",
            b"GET /x",
            b"GET /x HTTP/1",
            b"ABCDEFGHIJKLMNOP",
        ] {
            assert_eq!(
                run(prefix),
                Step::NeedMore {
                    at_least: prefix.len() + 1
                },
                "{prefix:?}"
            );
        }
    }

    #[test]
    fn a_final_answer_is_repeated_without_more_work() {
        let mut d = Detector::new();
        assert_eq!(d.push(b"SSH-2.0-x\r\n"), opaque());
        let seen = d.examined();
        // "SSH-": the hyphen ends what could have been an HTTP method.
        assert_eq!(seen, 4);
        assert_eq!(d.push(b"more"), opaque());
        assert_eq!(d.examined(), seen);
    }

    #[test]
    fn a_huge_request_target_is_too_large() {
        let mut d = Detector::new();
        assert!(matches!(d.push(b"GET /"), Step::NeedMore { .. }));
        let step = d.push(&vec![b'a'; MAX_HEAD]);
        assert_eq!(step, Step::TooLarge);
    }

    #[test]
    fn mutated_inputs_never_panic_and_stay_linear() {
        // A cheap deterministic fuzz over all three paths: mutate and re-slice seeds.
        let seeds: [&[u8]; 4] = [
            b"GET http://a.example/x HTTP/1.1\r\nHost: a.example:80\r\nX: y\r\n\r\n",
            b"CONNECT [::1]:443 HTTP/1.1\nHost: [::1]:443\n\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            &[0x16, 3, 1, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0],
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].to_vec();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes.insert(at, [b'\r', b'\n', b' ', b':', b'['][(next() % 5) as usize]),
                    _ => {
                        bytes.remove(at);
                    }
                }
                if bytes.is_empty() {
                    bytes.push(0);
                }
            }
            let mut d = Detector::new();
            let mut pushed = 0;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = 1 + (next() as usize) % 8;
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                pushed += chunk.len();
                match d.push(chunk) {
                    Step::NeedMore { at_least } => assert!(at_least > pushed),
                    _ => break,
                }
            }
            assert!(d.examined() <= 2 * pushed as u64, "{bytes:?}");
        }
    }

    #[test]
    fn malformed_messages_display() {
        assert_eq!(
            Malformed::TwoHostNames.to_string(),
            "the server_name extension holds two host_names"
        );
        assert_eq!(
            Malformed::HttpSyntax("invalid token").to_string(),
            "the request head is invalid: invalid token"
        );
    }
}
