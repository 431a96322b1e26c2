//! Invariants checked on every fuzz input. The fuzz targets (fuzz/fuzz_targets/) call these
//! under libFuzzer; tests/fuzz_corpus.rs compiles this same file into the main crate's tests and
//! replays the committed corpus (fuzz/corpus/<target>/) on stable, so every input the fuzzer
//! ever found interesting, crashes included, stays a regression test.
//!
//! Nothing here may panic except to report a broken invariant.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use portcullis::detect::{Detected, Detector, Protocol, Step, MAX_HEAD};
use portcullis::name::{normalize, Presented};

// -------------------------------------------------------------------------------------------
// Detector (ClientHello and HTTP head)

/// One feeding of the detector: where it stood after each push.
struct Run {
    /// The last answer (final, or NeedMore when the input ran out).
    step: Step,
    /// Bytes pushed when the answer became final (all of them if it never did).
    used: usize,
    examined: u64,
}

/// Pushes `data` in slices of the lengths `next` gives, checking the per-push invariants.
fn feed(data: &[u8], mut next: impl FnMut() -> usize, what: &str) -> Run {
    let mut d = Detector::new();
    let mut pushed = 0;
    let mut step = Step::NeedMore { at_least: 1 };
    let mut hint = 1;
    let mut first = true;
    while first || (pushed < data.len() && !step.is_final()) {
        first = false;
        let n = next().clamp(1, data.len().max(1)).min(data.len() - pushed);
        let chunk = &data[pushed..pushed + n];
        pushed += n;
        step = d.push(chunk);
        match step {
            Step::NeedMore { at_least } => {
                assert!(
                    at_least > pushed,
                    "{what}: hint {at_least} not beyond the {pushed} bytes pushed"
                );
                // The hint never moves backwards: bytes before it cannot change anything.
                assert!(
                    at_least >= hint,
                    "{what}: hint went back {hint} -> {at_least}"
                );
                hint = at_least;
            }
            // A hint past the end of a valid hello would stall its client (the proxy may set
            // SO_RCVLOWAT from it). Refusals may come before the hint: the type byte of the
            // handshake header, say, rules a hello out before the whole header is in.
            Step::Done(_) | Step::TooLarge => assert!(
                pushed >= hint,
                "{what}: decided at {pushed} bytes, before the hint {hint}"
            ),
            Step::Malformed(_) => {}
        }
        // Linear cost, however the input is sliced (a few bytes of slack for the sniffer).
        assert!(
            d.examined() <= 2 * pushed as u64 + 8,
            "{what}: examined {} after {pushed} bytes",
            d.examined()
        );
    }
    if step.is_final() {
        // A final answer is sticky and looks at nothing more.
        let before = d.examined();
        assert_eq!(
            d.push(b"\x16\x03\x01GET "),
            step,
            "{what}: final answer changed"
        );
        assert_eq!(d.examined(), before, "{what}: examined bytes after the end");
    }
    Run {
        used: pushed,
        examined: d.examined(),
        step,
    }
}

/// A small deterministic generator for slicings (xorshift64*), seeded from the input so a
/// replayed corpus file is sliced exactly as when the fuzzer ran it.
struct Rng(u64);

impl Rng {
    fn from_data(data: &[u8]) -> Rng {
        // FNV-1a
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Feeds `data` whole, a byte per push and in pseudo-random slices; every feeding must give the
/// same answer at the same byte, and the answer must agree with independent readings of the
/// bytes (see [`check_tls`] and [`check_http`]).
pub fn detector(data: &[u8]) {
    // Bounded like the proxy: nothing past MAX_HEAD plus a margin is ever pushed.
    let data = &data[..data.len().min(MAX_HEAD + 1024)];
    let bytewise = feed(data, || 1, "one byte per push");
    let whole = feed(data, || usize::MAX, "one push");

    let mut rng = Rng::from_data(data);
    let sliced = feed(
        data,
        || match rng.next() % 4 {
            0 => 1,
            1 => 2 + (rng.next() % 6) as usize,
            2 => (rng.next() % 300) as usize,
            _ => (rng.next() % 5000) as usize,
        },
        "random slices",
    );
    for other in [&whole, &sliced] {
        assert_eq!(other.step, bytewise.step, "slicings disagree");
    }
    // Exactly the prefix the byte-wise feeding used decides the same way in one push.
    if bytewise.step.is_final() {
        let prefix = feed(&data[..bytewise.used], || usize::MAX, "decided prefix");
        assert_eq!(prefix.step, bytewise.step, "the deciding prefix disagrees");
        assert_eq!(prefix.used, bytewise.used);
        assert!(prefix.examined <= 2 * bytewise.used as u64 + 8);
    }

    let head = &data[..bytewise.used];
    match &bytewise.step {
        Step::Done(d) => {
            check_name(d);
            match d.protocol {
                Protocol::Tls => check_tls(head, d),
                Protocol::Http => check_http(head, d),
                Protocol::Tcp => assert!(d.name.is_none() && !d.ech, "{d:?}"),
            }
        }
        Step::NeedMore { .. } => {
            assert!(
                data.len() < MAX_HEAD + 1024,
                "undecided after {}",
                data.len()
            );
        }
        Step::Malformed(_) | Step::TooLarge => {}
    }
}

/// Structure-aware entry to the ClientHello parser: `data` is a selector byte and a ClientHello
/// body; the message header and the record framing are made here (records of a size chosen by
/// the selector), so the fuzzer spends its time on the hello's own fields. The answer must not
/// depend on the framing.
pub fn client_hello(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let body = &body[..body.len().min(MAX_HEAD)];
    let mut msg = vec![1];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(body);
    let frame = |max: usize| {
        let mut out = Vec::new();
        for chunk in msg.chunks(max) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    };
    let max = match sel % 4 {
        0 => 1 << 14,
        1 => 1 + usize::from(sel),
        2 => 64,
        _ => 1 + usize::from(sel % 8),
    };
    let framed = frame(max);
    detector(&framed);
    let whole = frame(1 << 14);
    if framed.len() <= MAX_HEAD && whole.len() <= MAX_HEAD {
        assert_eq!(
            Detector::new().push(&framed),
            Detector::new().push(&whole),
            "the answer depends on the record framing ({max}-byte records)"
        );
    }
}

/// A name is what `name::normalize` makes of itself: lower case, no trailing dot, valid.
fn check_name(d: &Detected) {
    if let Some(n) = &d.name {
        assert_eq!(normalize(n), Presented::Name(n.clone()), "{d:?}");
    }
}

/// What `raw` normalises to, as the detector should report it.
fn presented(raw: &[u8]) -> Option<Option<String>> {
    let s = std::str::from_utf8(raw).ok()?;
    match normalize(s) {
        Presented::Name(n) => Some(Some(n)),
        Presented::IpLiteral => Some(None),
        Presented::Invalid => None,
    }
}

/// An independent, deliberately naive reading of the ClientHello's records: the SNI that a TLS
/// server would see must be the one the detector reported.
fn check_tls(head: &[u8], d: &Detected) {
    assert!(
        head.starts_with(&[0x16, 0x03]),
        "TLS without a record header"
    );
    // Reassemble the handshake bytes from the records of `head`.
    let mut hs = Vec::new();
    let mut rest = head;
    while !rest.is_empty() {
        assert!(
            rest.len() >= 5 && rest[0] == 0x16,
            "TLS: records do not tile the hello"
        );
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        assert!(rest.len() >= 5 + len, "TLS: decided inside a record");
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    assert_eq!(hs.first(), Some(&1), "not a ClientHello");
    let body_len = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
    assert_eq!(
        hs.len(),
        4 + body_len,
        "TLS: the records hold more than the hello"
    );
    let body = &hs[4..];
    // version, random, session id, suites, compression
    let mut at = 2 + 32;
    at += 1 + usize::from(body[at]);
    at += 2 + usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
    at += 1 + usize::from(body[at]);
    let mut names: Vec<&[u8]> = Vec::new();
    let mut sni_exts = 0;
    let mut ech = false;
    if at < body.len() {
        let ext_len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        let mut ext = &body[at + 2..at + 2 + ext_len];
        assert_eq!(
            at + 2 + ext_len,
            body.len(),
            "TLS: bytes after the extensions"
        );
        while !ext.is_empty() {
            let kind = u16::from_be_bytes([ext[0], ext[1]]);
            let len = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
            let data = &ext[4..4 + len];
            ext = &ext[4 + len..];
            match kind {
                0 => {
                    sni_exts += 1;
                    let mut list = &data[2..];
                    while !list.is_empty() {
                        let n = usize::from(u16::from_be_bytes([list[1], list[2]]));
                        // whatever the type: a lenient reader may take any entry as the name
                        assert_eq!(
                            list[0], 0,
                            "TLS: a name of another type than host_name accepted"
                        );
                        names.push(&list[3..3 + n]);
                        list = &list[3 + n..];
                    }
                }
                0xfe0d => ech = true,
                _ => {}
            }
        }
    }
    assert!(sni_exts <= 1, "two server_name extensions accepted");
    assert!(names.len() <= 1, "two host_names accepted");
    assert_eq!(d.ech, ech, "ech flag");
    match names.first() {
        None => assert_eq!(d.name, None, "a name without a host_name"),
        Some(raw) => assert_eq!(
            presented(raw),
            Some(d.name.clone()),
            "SNI {:?} reported as {:?}",
            String::from_utf8_lossy(raw),
            d.name
        ),
    }
}

/// An independent, lenient reading of the request head, as a sloppy upstream might do it:
/// every line that looks like a Host header counts. Exactly one must, naming what the detector
/// reported, and no line may hide a second line behind a bare CR.
fn check_http(head: &[u8], d: &Detected) {
    assert!(
        head.ends_with(b"\n"),
        "HTTP decided before the end of the head"
    );
    assert!(!d.ech);
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    assert!(
        !request_line
            .strip_suffix(b"\r")
            .unwrap_or(request_line)
            .contains(&b'\r'),
        "bare CR in the request line"
    );
    let mut hosts: Vec<&[u8]> = Vec::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(!line.contains(&b'\r'), "bare CR inside a header line");
        assert!(!line.contains(&0), "NUL inside a header line");
        let trimmed = trim(line);
        if trimmed.len() >= 4 && trimmed[..4].eq_ignore_ascii_case(b"host") {
            let after = trim(&trimmed[4..]);
            if let Some(value) = after.strip_prefix(b":") {
                hosts.push(trim(value));
            }
        }
    }
    assert_eq!(
        hosts.len(),
        1,
        "Host lines seen by a lenient reader: {hosts:?}"
    );
    let value = hosts[0];
    let host = without_port(value);
    assert_eq!(
        presented(host),
        Some(d.name.clone()),
        "Host {:?} reported as {:?}",
        String::from_utf8_lossy(value),
        d.name
    );

    // The request target as a WHATWG URL parser reads it (backslashes are slashes, the slashes
    // after the scheme are optional): an absolute-form target must name the same host, or an
    // upstream that routes by the target could go elsewhere.
    let mut parts = request_line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    if method != b"CONNECT" && !target.starts_with(b"/") && target != b"*" {
        let colon = target
            .iter()
            .position(|&b| b == b':')
            .expect("an absolute-form target has a scheme");
        let rest = &target[colon + 1..];
        let slashes = rest
            .iter()
            .take_while(|&&b| b == b'/' || b == b'\\')
            .count();
        let rest = &rest[slashes..];
        let end = rest
            .iter()
            .position(|&b| matches!(b, b'/' | b'\\' | b'?' | b'#'))
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        let at = authority
            .iter()
            .rposition(|&b| b == b'@')
            .map_or(0, |i| i + 1);
        assert_eq!(
            presented(without_port(&authority[at..])),
            Some(d.name.clone()),
            "target {:?} names another host than Host {:?}",
            String::from_utf8_lossy(target),
            String::from_utf8_lossy(value)
        );
    }
}

/// `host[:port]` or `[v6][:port]`: the host.
fn without_port(value: &[u8]) -> &[u8] {
    if value.first() == Some(&b'[') {
        match value.iter().position(|&b| b == b']') {
            Some(close) => &value[..=close],
            None => value,
        }
    } else if value.iter().filter(|&&b| b == b':').count() == 1 {
        &value[..value.iter().position(|&b| b == b':').unwrap_or(0)]
    } else {
        value
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &s[start..end]
}

// -------------------------------------------------------------------------------------------
// Config loader

/// `Config::parse` on arbitrary text: an error names the file first; a valid config goes
/// through everything that consumes one (registry, summary, explain, rule rendering).
pub fn config(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/portcullis/fuzz.toml");
    let cfg = match portcullis::config::Config::parse(path, src) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let msg = e.to_string();
            // (an `include`d file at fault is named instead: its own file and line)
            assert!(
                msg.starts_with("/etc/portcullis/fuzz.toml") || src.contains("include"),
                "an error that does not name the file: {msg:?}"
            );
            return;
        }
    };
    let _ = portcullis::registry::Registry::new(cfg.clone());
    // What /config serves.
    let _ = serde_json::to_string(&*cfg);
    let _ = portcullis::explain::summary(&cfg);
    let resolvers: [IpAddr; 2] = [
        "192.0.2.53".parse().unwrap(),
        "2001:db8::53".parse().unwrap(),
    ];
    let rules = portcullis::init::render::render(&cfg, &resolvers);
    let _ = rules.dry_run_text();
    for family in rules.families() {
        let _ = family.restore_input();
    }
    // Explain a flow to every port the config names, presenting each of its hosts.
    let mut dsts: Vec<SocketAddr> = Vec::new();
    for e in cfg.entries.iter().take(8) {
        for p in e.ports.iter().take(4) {
            dsts.push(SocketAddr::new("192.0.2.10".parse().unwrap(), p.number));
            dsts.push(SocketAddr::new("2001:db8::10".parse().unwrap(), p.number));
            for c in e.addresses.iter().take(2) {
                dsts.push(SocketAddr::new(c.addr(), p.number));
            }
        }
    }
    let names: Vec<String> = cfg
        .entries
        .iter()
        .take(8)
        .flat_map(|e| {
            e.hosts
                .iter()
                .take(2)
                .map(|h| h.to_string().replace("*.", "w."))
        })
        .chain(["x.example.com".to_string()])
        .collect();
    for dst in dsts.iter().take(16) {
        let _ = portcullis::explain::explain(cfg.clone(), *dst, None, None);
        for n in names.iter().take(4) {
            let _ = portcullis::explain::explain(cfg.clone(), *dst, Some(n), None);
            let _ = portcullis::explain::explain(cfg.clone(), *dst, None, Some(n));
        }
    }
}
