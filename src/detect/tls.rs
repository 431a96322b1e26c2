//! Stage "detect", TLS part: reassembles a ClientHello from TLS records that may arrive in any
//! slicing and be fragmented over several records, then parses it with tls-parser and reads its
//! SNI and ECH extensions.
//!
//! Record headers are walked incrementally as bytes arrive (each byte is copied once into the
//! handshake buffer); the ClientHello itself is parsed once, when its last byte is in. The
//! declared lengths are checked against [`MAX_HEAD`] as soon as they are known, so an oversized
//! hello is refused before its bulk arrives.
//!
//! The reassembly is ours, not tls-parser's: the crate parses whole records and has no
//! reassembly of a handshake message fragmented over several of them (`parse_tls_plaintext` on
//! the first record of a split hello is an error), it answers `Incomplete` rather than an error
//! for bytes that are not TLS at all (the sniffer checks `0x16 0x03` before this module is
//! reached), and it cannot say how many more bytes are needed before anything can change
//! ([`Step::NeedMore`], which the proxy turns into `SO_RCVLOWAT`), refuse a hello declared
//! beyond 64 KiB before its bulk arrives, or keep the work linear however the client slices its
//! bytes. tls-parser reads the reassembled hello's fields; every rule of docs/DESIGN.md §3 step
//! 5 the crate does not enforce is checked on top of it, in [`parse_client_hello`].

use tls_parser::nom::multi::length_data;
use tls_parser::nom::number::complete::be_u16;
use tls_parser::{
    parse_tls_extension_sni_hostname, parse_tls_extension_unknown,
    parse_tls_handshake_client_hello, SNIType, TlsExtension, TlsExtensionType,
};

use super::{normalize_name, Detected, Malformed, Protocol, Step, MAX_HEAD};

const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

#[derive(Debug)]
pub(crate) struct TlsState {
    /// Stream bytes consumed by the record walker.
    pos: usize,
    header: [u8; RECORD_HEADER],
    /// Bytes of the current record header collected so far; `RECORD_HEADER` while in a payload.
    header_len: usize,
    /// Payload bytes of the current record still to come.
    record_left: usize,
    /// Stream offset where the current record ends.
    record_end: usize,
    /// The handshake message reassembled from record payloads.
    hs: Vec<u8>,
    /// Header plus declared body length of the handshake message, once its header is in.
    hs_total: Option<usize>,
    examined: u64,
}

impl TlsState {
    pub(crate) fn new() -> Self {
        TlsState {
            pos: 0,
            header: [0; RECORD_HEADER],
            header_len: 0,
            record_left: 0,
            record_end: 0,
            hs: Vec::new(),
            hs_total: None,
            examined: 0,
        }
    }

    pub(crate) fn examined(&self) -> u64 {
        self.examined
    }

    /// Consumes the new bytes; only the bytes that belong to the ClientHello's records are
    /// looked at (whatever follows them is the caller's to relay).
    pub(crate) fn push(&mut self, mut new: &[u8]) -> Step {
        loop {
            if self.header_len < RECORD_HEADER {
                if new.is_empty() {
                    return Step::NeedMore {
                        at_least: self.pos - self.header_len + RECORD_HEADER,
                    };
                }
                let take = (RECORD_HEADER - self.header_len).min(new.len());
                let (chunk, rest) = new.split_at(take);
                self.header[self.header_len..self.header_len + take].copy_from_slice(chunk);
                self.header_len += take;
                self.pos += take;
                self.examined += take as u64;
                new = rest;
                if self.header_len == RECORD_HEADER {
                    if let Err(step) = self.start_record() {
                        return step;
                    }
                }
                continue;
            }

            let wanted = self.hs_wanted();
            if new.is_empty() {
                return Step::NeedMore {
                    at_least: self.need_hint(wanted),
                };
            }
            let take = wanted.min(self.record_left).min(new.len());
            let (chunk, rest) = new.split_at(take);
            self.hs.extend_from_slice(chunk);
            self.pos += take;
            self.record_left -= take;
            self.examined += take as u64;
            new = rest;

            if self
                .hs
                .first()
                .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
            {
                return Step::Malformed(Malformed::NotClientHello);
            }
            if self.hs_total.is_none() && self.hs.len() == HANDSHAKE_HEADER {
                let body = usize::from(self.hs[1]) << 16
                    | usize::from(self.hs[2]) << 8
                    | usize::from(self.hs[3]);
                self.hs_total = Some(HANDSHAKE_HEADER + body);
                if let Err(step) = self.check_bounds() {
                    return step;
                }
            }
            if let Some(total) = self.hs_total {
                if self.hs.len() == total {
                    // check_bounds guarantees the record ends exactly here.
                    self.examined += total as u64;
                    return match parse_client_hello(
                        self.hs.get(HANDSHAKE_HEADER..).unwrap_or_default(),
                    ) {
                        Ok(detected) => Step::Done(detected),
                        Err(m) => Step::Malformed(m),
                    };
                }
            }
            if self.record_left == 0 {
                self.header_len = 0;
            }
        }
    }

    /// Handshake bytes still needed before the next decision: the rest of the 4-byte handshake
    /// header, or the rest of the message once its length is known.
    fn hs_wanted(&self) -> usize {
        match self.hs_total {
            None => HANDSHAKE_HEADER - self.hs.len(),
            Some(total) => total - self.hs.len(),
        }
    }

    /// The stream length at which the next decision can be taken, while inside a payload.
    fn need_hint(&self, wanted: usize) -> usize {
        if wanted <= self.record_left {
            self.pos + wanted
        } else {
            // Nothing can change before the next record's header is complete.
            self.record_end + RECORD_HEADER
        }
    }

    /// Validates a complete record header and enters its payload.
    fn start_record(&mut self) -> Result<(), Step> {
        let [content_type, major, minor, hi, lo] = self.header;
        if content_type != CONTENT_HANDSHAKE {
            return Err(Step::Malformed(Malformed::UnexpectedRecord));
        }
        if major != 3 || minor > 4 {
            return Err(Step::Malformed(Malformed::BadRecord));
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        // RFC 8446 §5.1 forbids zero-length handshake fragments and records above 2^14.
        if len == 0 || len > MAX_RECORD {
            return Err(Step::Malformed(Malformed::BadRecord));
        }
        self.record_left = len;
        self.record_end = self.pos + len;
        // The hello needs every byte of this record: either it ends inside it (then the record
        // must end with it) or it goes on past it.
        if self.record_end > MAX_HEAD {
            return Err(Step::TooLarge);
        }
        if self.hs_total.is_some() {
            self.check_bounds()?;
        }
        // Room for this record's payload, as all of it is needed: a hello in one record then
        // takes one allocation instead of growing from its 4-byte handshake header (a
        // reallocation and a copy, about a tenth of its detection cost: bench/README.md).
        // `reserve`, not `reserve_exact`: many small records still grow the buffer
        // geometrically. At most 2^14 bytes ahead, no more than the flow's own read buffer.
        self.hs.reserve(len);
        Ok(())
    }

    /// Once the declared handshake length is known: refuse bytes after the hello in its last
    /// record, and refuse at once a hello that cannot fit in `MAX_HEAD` whatever the records.
    fn check_bounds(&self) -> Result<(), Step> {
        let wanted = self.hs_wanted();
        if wanted < self.record_left {
            return Err(Step::Malformed(Malformed::TrailingData));
        }
        let beyond = wanted - self.record_left;
        let more_records = beyond.div_ceil(MAX_RECORD);
        let least_total = self
            .record_end
            .saturating_add(beyond)
            .saturating_add(more_records.saturating_mul(RECORD_HEADER));
        if least_total > MAX_HEAD {
            return Err(Step::TooLarge);
        }
        Ok(())
    }
}

/// Parses a ClientHello body (after the 4-byte handshake header), RFC 8446 §4.1.2, with
/// tls-parser, and holds it to the rules of docs/DESIGN.md §3 step 5 where the crate is lenient.
///
/// The crate's own entry points for whole records or messages are not used: `parse_tls_plaintext`
/// needs the hello in one record (see the module comment), and `parse_tls_message_handshake`
/// drops whatever follows the hello's fields inside the message, which must be refused here.
pub(crate) fn parse_client_hello(body: &[u8]) -> Result<Detected, Malformed> {
    // tls-parser takes any legacy_version; ours must be 3.x, and says so before any later
    // field is looked at.
    match body {
        [3, _, ..] => {}
        [_, _, ..] => return Err(Malformed::BadVersion),
        _ => return Err(Malformed::BadLength),
    }
    // Random, session id (at most 32 bytes), cipher suites (an even length), compression
    // methods and the extension block, each within the body: any short read is an error.
    let (rest, hello) = parse_tls_handshake_client_hello(body).map_err(|_| Malformed::BadLength)?;
    // The crate takes empty lists; a client must offer a suite and the null compression method.
    if hello.ciphers.is_empty() || hello.comp.is_empty() {
        return Err(Malformed::BadLength);
    }

    let mut detected = Detected {
        protocol: Protocol::Tls,
        name: None,
        ech: false,
    };
    let Some(extensions) = hello.ext else {
        // Pre-TLS 1.3 hellos may omit the extension block altogether. The crate also reports
        // no block when its length prefix is cut short or overruns the body: then bytes remain.
        return if rest.is_empty() {
            Ok(detected)
        } else {
            Err(Malformed::BadLength)
        };
    };
    // The crate returns what follows the extension block without judging it.
    if !rest.is_empty() {
        return Err(Malformed::TrailingData);
    }

    // The extensions are read one at a time, each as type and opaque data, rather than with
    // `parse_tls_client_hello_extensions`: that one stops at the first extension it cannot read
    // and returns `Ok` with the rest unread (a broken extension in front would hide the SNI
    // behind it), and it also parses the content of two dozen extension types no decision
    // here depends on, so a hello would be refused for the crate's opinion of, say, its ALPN
    // list. Only server_name's content is parsed, below.
    let mut ext = extensions;
    // Every extension takes at least 4 bytes: one allocation, never grown.
    let mut seen: Vec<u16> = Vec::with_capacity(ext.len() / 4);
    while !ext.is_empty() {
        let Ok((after, TlsExtension::Unknown(TlsExtensionType(kind), data))) =
            parse_tls_extension_unknown(ext)
        else {
            // The list does not parse to its declared end.
            return Err(Malformed::ExtensionsTrailing);
        };
        ext = after;
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => detected.name = server_name(data)?,
            // ECH (real or GREASE) is an extension type tls-parser does not know.
            EXT_ENCRYPTED_CLIENT_HELLO => detected.ech = true,
            _ => {}
        }
    }
    // RFC 8446 §4.2; the crate keeps duplicates.
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return Err(Malformed::DuplicateExtension);
    }
    Ok(detected)
}

/// The server_name extension (RFC 6066 §3): exactly one host_name, normalised.
/// A name of any other type (none is defined; a lenient reader taking the
/// first entry whatever its type would see it as the name) is `malformed`,
/// alone or beside a host_name: no reader may find a second name.
///
/// The list is walked here, one entry at a time with the crate's entry parser, rather than
/// with `parse_tls_extension_sni_content`: that one reads empty data as an empty list (a
/// server's acknowledgement is empty; a client's server_name never is), ignores bytes after the
/// list, and stops at an entry that overruns the list with `Ok`, dropping the rest unread; it
/// also collects the entries into a `Vec` we would only walk once.
fn server_name(data: &[u8]) -> Result<Option<String>, Malformed> {
    let Ok((after, list)) = length_data::<_, _, (), _>(be_u16)(data) else {
        return Err(Malformed::BadServerName);
    };
    if !after.is_empty() || list.is_empty() {
        return Err(Malformed::BadServerName);
    }
    let mut rest = list;
    let mut host: Option<&[u8]> = None;
    while !rest.is_empty() {
        // RFC 6066 requires every name type, known or future, to start with a 16-bit length,
        // so an entry of any type is read whole before its type is judged.
        let Ok((after, (kind, name))) = parse_tls_extension_sni_hostname(rest) else {
            return Err(Malformed::BadServerName);
        };
        rest = after;
        if kind != SNIType::HostName {
            return Err(Malformed::OtherNameType);
        }
        if host.is_some() {
            return Err(Malformed::TwoHostNames);
        }
        host = Some(name);
    }
    match host {
        None => Ok(None),
        Some(name) => normalize_name(name),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Detector;
    use super::*;

    /// An extension's type and data.
    type Extension = (u16, Vec<u8>);

    /// Builds a ClientHello handshake message (header included) with the given extensions.
    fn hello(extensions: &[Extension]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x5a; 32]);
        body.push(32);
        body.extend_from_slice(&[0x11; 32]);
        body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[0x01, 0x00]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        handshake(&body)
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(body);
        msg
    }

    /// Wraps a handshake message in records of at most `max` payload bytes.
    fn records(msg: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in msg.chunks(max) {
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn sni_entries(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    fn sni(name: &str) -> Extension {
        (EXT_SERVER_NAME, sni_entries(&[(0, name.as_bytes())]))
    }

    fn detect(bytes: &[u8]) -> Step {
        Detector::new().push(bytes)
    }

    fn tls(name: Option<&str>, ech: bool) -> Step {
        Step::Done(Detected {
            protocol: Protocol::Tls,
            name: name.map(str::to_owned),
            ech,
        })
    }

    fn malformed(m: Malformed) -> Step {
        Step::Malformed(m)
    }

    #[test]
    fn names_and_flags() {
        let ech_grease = (EXT_ENCRYPTED_CLIENT_HELLO, vec![0; 90]);
        let cases: Vec<(&str, Vec<Extension>, Step)> = vec![
            (
                "plain",
                vec![sni("api.example.com")],
                tls(Some("api.example.com"), false),
            ),
            (
                "upper case, trailing dot",
                vec![sni("API.Example.COM.")],
                tls(Some("api.example.com"), false),
            ),
            (
                "no sni",
                vec![(0x000a, vec![0, 2, 0, 0x1d])],
                tls(None, false),
            ),
            ("no extensions at all", vec![], tls(None, false)),
            ("ipv4 literal", vec![sni("192.0.2.1")], tls(None, false)),
            ("ipv6 literal", vec![sni("2001:db8::1")], tls(None, false)),
            (
                "ech grease",
                vec![sni("www.example.org"), ech_grease.clone()],
                tls(Some("www.example.org"), true),
            ),
            (
                "ech before sni",
                vec![ech_grease, sni("a.example")],
                tls(Some("a.example"), true),
            ),
            (
                "other name type before host_name",
                vec![(
                    EXT_SERVER_NAME,
                    sni_entries(&[(7, b"evil.example"), (0, b"x.example")]),
                )],
                malformed(Malformed::OtherNameType),
            ),
            (
                "other name type after host_name",
                vec![(
                    EXT_SERVER_NAME,
                    sni_entries(&[(0, b"x.example"), (1, b"evil.example")]),
                )],
                malformed(Malformed::OtherNameType),
            ),
            (
                "other name type alone",
                vec![(EXT_SERVER_NAME, sni_entries(&[(7, b"evil.example")]))],
                malformed(Malformed::OtherNameType),
            ),
            (
                "other name type, empty, beside host_name",
                vec![(
                    EXT_SERVER_NAME,
                    sni_entries(&[(0, b"x.example"), (255, b"")]),
                )],
                malformed(Malformed::OtherNameType),
            ),
            (
                "two host_names",
                vec![(
                    EXT_SERVER_NAME,
                    sni_entries(&[(0, b"a.example"), (0, b"b.example")]),
                )],
                malformed(Malformed::TwoHostNames),
            ),
            (
                "two sni extensions",
                vec![sni("a.example"), sni("b.example")],
                malformed(Malformed::DuplicateExtension),
            ),
            (
                "empty server_name list",
                vec![(EXT_SERVER_NAME, vec![0, 0])],
                malformed(Malformed::BadServerName),
            ),
            (
                "empty sni data",
                vec![(EXT_SERVER_NAME, vec![])],
                malformed(Malformed::BadServerName),
            ),
            (
                "sni list longer than data",
                vec![(EXT_SERVER_NAME, vec![0, 9, 0, 0, 1, b'a'])],
                malformed(Malformed::BadServerName),
            ),
            (
                "sni list shorter than data",
                vec![(EXT_SERVER_NAME, vec![0, 4, 0, 0, 1, b'a', 0])],
                malformed(Malformed::BadServerName),
            ),
            (
                "host_name overruns list",
                vec![(EXT_SERVER_NAME, vec![0, 4, 0, 0, 9, b'a'])],
                malformed(Malformed::BadServerName),
            ),
            (
                "invalid name",
                vec![sni("exa mple.com")],
                malformed(Malformed::InvalidName),
            ),
            (
                "empty host_name",
                vec![sni("")],
                malformed(Malformed::InvalidName),
            ),
        ];
        for (what, ext, want) in cases {
            let bytes = records(&hello(&ext), MAX_RECORD);
            assert_eq!(detect(&bytes), want, "{what}");
        }
    }

    #[test]
    fn bad_lengths() {
        let good = hello(&[sni("api.example.com")]);
        // Offsets inside the handshake message (after its 4-byte header).
        let session_len = 4 + 2 + 32;
        let suites_len = session_len + 1 + 32;
        let compression_len = suites_len + 2 + 4;
        let ext_len = compression_len + 1 + 1;
        let first_ext_len = ext_len + 2 + 2;

        let patched = |at: usize, bytes: &[u8]| {
            let mut m = good.clone();
            m[at..at + bytes.len()].copy_from_slice(bytes);
            records(&m, MAX_RECORD)
        };
        let cases: Vec<(&str, Vec<u8>, Malformed)> = vec![
            (
                "session id over 32",
                patched(session_len, &[33]),
                Malformed::BadLength,
            ),
            (
                "odd cipher suites",
                patched(suites_len, &[0, 3]),
                Malformed::BadLength,
            ),
            (
                "no cipher suites",
                patched(suites_len, &[0, 0]),
                Malformed::BadLength,
            ),
            (
                "cipher suites overrun",
                patched(suites_len, &[0xff, 0xfe]),
                Malformed::BadLength,
            ),
            (
                "no compression",
                patched(compression_len, &[0]),
                Malformed::BadLength,
            ),
            (
                "extensions overrun",
                patched(ext_len, &[0x10, 0x00]),
                Malformed::BadLength,
            ),
            (
                "extension block shorter than rest",
                {
                    let mut m = good.clone();
                    let n = u16::from_be_bytes([m[ext_len], m[ext_len + 1]]) - 1;
                    m[ext_len..ext_len + 2].copy_from_slice(&n.to_be_bytes());
                    records(&m, MAX_RECORD)
                },
                Malformed::TrailingData,
            ),
            (
                "extension data overruns list",
                patched(first_ext_len, &[0x10, 0x00]),
                Malformed::ExtensionsTrailing,
            ),
            (
                "legacy_version not 3.x",
                patched(4, &[0x7f, 0x1c]),
                Malformed::BadVersion,
            ),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(detect(&bytes), malformed(want), "{what}");
        }
    }

    #[test]
    fn trailing_bytes_in_extension_list() {
        // Three stray bytes inside the extension block: not a whole extension.
        let mut msg = hello(&[sni("api.example.com")]);
        msg.extend_from_slice(&[0, 0, 0]);
        let ext_len = 4 + 2 + 32 + 1 + 32 + 2 + 4 + 1 + 1;
        let n = u16::from_be_bytes([msg[ext_len], msg[ext_len + 1]]) + 3;
        msg[ext_len..ext_len + 2].copy_from_slice(&n.to_be_bytes());
        let body = (msg.len() - 4) as u32;
        msg[1..4].copy_from_slice(&body.to_be_bytes()[1..]);
        assert_eq!(
            detect(&records(&msg, MAX_RECORD)),
            malformed(Malformed::ExtensionsTrailing)
        );
    }

    #[test]
    fn record_and_handshake_framing() {
        let msg = hello(&[sni("api.example.com")]);
        let one = records(&msg, MAX_RECORD);

        // A non-hello handshake message (e.g. a ServerHello, type 2), decided at its first byte.
        let mut server_hello = one.clone();
        server_hello[5] = 2;
        assert_eq!(
            detect(&server_hello[..6]),
            malformed(Malformed::NotClientHello)
        );

        // Bytes after the hello inside the same record.
        let mut trailing = msg.clone();
        trailing.push(0);
        let rec = records(&trailing, MAX_RECORD);
        assert_eq!(detect(&rec[..5 + 4]), malformed(Malformed::TrailingData));

        // Another record type (change_cipher_spec) in the middle of the hello.
        let mut split = records(&msg, 40);
        split[45] = 20;
        assert_eq!(detect(&split), malformed(Malformed::UnexpectedRecord));

        // Record version not 3.x in a later record; zero-length and oversized records.
        let mut bad_version = records(&msg, 40);
        bad_version[46] = 2;
        assert_eq!(detect(&bad_version), malformed(Malformed::BadRecord));
        let mut zero = records(&msg, 40);
        zero[48..50].copy_from_slice(&[0, 0]);
        assert_eq!(detect(&zero), malformed(Malformed::BadRecord));
        assert_eq!(
            detect(&[0x16, 3, 1, 0x40, 0x01]),
            malformed(Malformed::BadRecord)
        );

        // Whatever follows the hello's records (e.g. change_cipher_spec, early data) is not ours.
        let mut followed = one.clone();
        followed.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(detect(&followed), tls(Some("api.example.com"), false));
    }

    #[test]
    fn need_more_names_the_next_useful_length() {
        let msg = hello(&[sni("api.example.com")]);
        let two = records(&msg, 50);
        let mut d = Detector::new();
        assert_eq!(d.push(&two[..3]), Step::NeedMore { at_least: 5 });
        // Header in: the handshake header decides the size limit.
        assert_eq!(d.push(&two[3..5]), Step::NeedMore { at_least: 9 });
        // Handshake length known, more than this record holds: wait for the next header.
        assert_eq!(d.push(&two[5..9]), Step::NeedMore { at_least: 60 });
        assert_eq!(d.push(&two[9..58]), Step::NeedMore { at_least: 60 });
        // The 105-byte message spans records of 50, 50 and 5 bytes: the second one is not the last.
        assert_eq!(msg.len(), 105);
        assert_eq!(d.push(&two[58..60]), Step::NeedMore { at_least: 115 });
        assert_eq!(d.push(&two[60..115]), Step::NeedMore { at_least: 120 });
        assert_eq!(d.push(&two[115..]), tls(Some("api.example.com"), false));
    }

    fn padded_hello(total_records_bytes: usize) -> Vec<u8> {
        // Size the padding extension so that the records come to about the wanted length.
        let base = hello(&[sni("big.example.com")]).len();
        let records_overhead = RECORD_HEADER * total_records_bytes.div_ceil(MAX_RECORD);
        let pad = total_records_bytes - base - records_overhead - 4;
        let msg = hello(&[sni("big.example.com"), (0x0015, vec![0; pad])]);
        records(&msg, MAX_RECORD)
    }

    #[test]
    fn over_64k_is_too_large_as_soon_as_declared() {
        let big = padded_hello(MAX_HEAD + 100);
        assert!(big.len() > MAX_HEAD);
        let mut d = Detector::new();
        // Record header plus the handshake header are enough to know.
        assert_eq!(d.push(&big[..8]), Step::NeedMore { at_least: 9 });
        assert_eq!(d.push(&big[8..9]), Step::TooLarge);

        // Just under the limit is fine.
        let fits = padded_hello(MAX_HEAD - 10);
        assert!(fits.len() <= MAX_HEAD);
        assert_eq!(detect(&fits), tls(Some("big.example.com"), false));
    }

    #[test]
    fn a_declared_length_beyond_the_records_is_too_large() {
        // Handshake header claims 16 MiB: too large, whatever arrives.
        let mut bytes = vec![0x16, 3, 1, 0x00, 0x10, 1, 0xff, 0xff, 0xff];
        bytes.extend_from_slice(&[0; 12]);
        assert_eq!(detect(&bytes), Step::TooLarge);
    }

    #[test]
    fn sixty_kib_dripped_examines_at_most_twice() {
        let big = padded_hello(60 * 1024);
        let mut d = Detector::new();
        let mut last = None;
        for (i, b) in big.iter().enumerate() {
            let step = d.push(std::slice::from_ref(b));
            if i + 1 < big.len() {
                match step {
                    Step::NeedMore { at_least } => {
                        assert!(at_least > i + 1 && at_least <= big.len())
                    }
                    other => panic!("at {i}: {other:?}"),
                }
            }
            last = Some(step);
        }
        assert_eq!(last, Some(tls(Some("big.example.com"), false)));
        assert!(
            d.examined() <= 2 * big.len() as u64,
            "{} > 2 x {}",
            d.examined(),
            big.len()
        );
        assert!(d.examined() >= big.len() as u64);
    }

    /// The leniencies of tls-parser 0.12 that the code above checks on top of the crate (its
    /// comments say why). Should an upgrade change one, this fails, and the check and its
    /// comment can be revisited.
    #[test]
    fn tls_parser_leniencies_checked_on_top() {
        use tls_parser::{
            parse_tls_client_hello_extensions, parse_tls_extension_sni_content,
            parse_tls_plaintext, Err,
        };
        // A hello split over two records: the first record alone is an error, not Incomplete.
        let split = records(&hello(&[sni("api.example.com")]), 50);
        assert!(matches!(parse_tls_plaintext(&split), Err(Err::Error(_))));
        // Bytes that are not TLS at all: Incomplete, not an error.
        assert!(matches!(
            parse_tls_plaintext(b"GET / HTTP/1.1\r\n"),
            Err(Err::Incomplete(_))
        ));

        // An ALPN extension whose content the crate cannot read, in front of server_name: `Ok`,
        // nothing parsed, the SNI left unread. Ours reads the SNI and leaves ALPN alone.
        let alpn = (0x0010, vec![0xff]);
        let mut block = Vec::new();
        for (kind, data) in [alpn.clone(), sni("api.example.com")] {
            block.extend_from_slice(&kind.to_be_bytes());
            block.extend_from_slice(&(data.len() as u16).to_be_bytes());
            block.extend_from_slice(&data);
        }
        let (rest, parsed) = parse_tls_client_hello_extensions(&block).expect("Ok");
        assert!(parsed.is_empty());
        assert_eq!(rest, &block[..]);
        assert_eq!(
            detect(&records(
                &hello(&[alpn, sni("api.example.com")]),
                MAX_RECORD
            )),
            tls(Some("api.example.com"), false)
        );

        // server_name content: empty data is an empty list, bytes after the list are left over
        // unjudged, an entry overrunning the list ends it with `Ok`.
        assert_eq!(
            parse_tls_extension_sni_content(&[]),
            Ok((&[][..], TlsExtension::SNI(Vec::new())))
        );
        assert_eq!(
            parse_tls_extension_sni_content(&[0, 4, 0, 0, 1, b'a', 0]),
            Ok((
                &[0][..],
                TlsExtension::SNI(vec![(SNIType::HostName, &b"a"[..])])
            ))
        );
        assert_eq!(
            parse_tls_extension_sni_content(&[0, 4, 0, 0, 9, b'a']),
            Ok((&[][..], TlsExtension::SNI(Vec::new())))
        );

        // The hello: any legacy_version, no cipher suite or compression method, and bytes
        // after the extension block are all `Ok`.
        let mut body = vec![0x7f, 0x1c];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0xee]);
        let (rest, ch) = parse_tls_handshake_client_hello(&body).expect("Ok");
        assert!(ch.ciphers.is_empty() && ch.comp.is_empty());
        assert_eq!(ch.ext, Some(&[][..]));
        assert_eq!(rest, &[0xee]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: mutate a valid hello byte by byte and slice it randomly.
        let base = records(
            &hello(&[
                sni("api.example.com"),
                (EXT_ENCRYPTED_CLIENT_HELLO, vec![1; 8]),
            ]),
            37,
        );
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            let mut bytes = base.clone();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            let mut d = Detector::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = 1 + (next() as usize) % 16;
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                if d.push(chunk).is_final() {
                    break;
                }
            }
            assert!(d.examined() <= 2 * bytes.len() as u64 + 3);
        }
    }
}
