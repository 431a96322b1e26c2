//! Golden captures for the detect stage: real ClientHellos and request heads, recorded on
//! loopback from openssl s_client, curl and Debian's headless chromium (tests/data/hellos/),
//! fed in every slicing we can think of. Every slicing must give the same answer.

use std::path::PathBuf;

use portcullis::detect::{Detected, Detector, Protocol, Step, MAX_HEAD};

struct Golden {
    file: &'static str,
    protocol: Protocol,
    name: &'static str,
    ech: bool,
}

const GOLDENS: &[Golden] = &[
    // `openssl s_client -connect 127.0.0.1:PORT -servername api.example.com` (OpenSSL 3.0).
    Golden {
        file: "openssl-s_client.bin",
        protocol: Protocol::Tls,
        name: "api.example.com",
        ech: false,
    },
    // `curl https://files.example.com:PORT/ --resolve files.example.com:PORT:127.0.0.1`.
    Golden {
        file: "curl.bin",
        protocol: Protocol::Tls,
        name: "files.example.com",
        ech: false,
    },
    // Chromium 156 headless, https://www.example.org/ mapped to loopback: X25519MLKEM768 key
    // share (~1.9 KB) and a GREASE encrypted_client_hello extension.
    Golden {
        file: "chromium-mlkem.bin",
        protocol: Protocol::Tls,
        name: "www.example.org",
        ech: true,
    },
    // `curl http://files.example.com:PORT/path?q=1`: Host carries the port.
    Golden {
        file: "curl-http.bin",
        protocol: Protocol::Http,
        name: "files.example.com",
        ech: false,
    },
    // The same chromium's network-time request (plain HTTP to clients2.google.com).
    Golden {
        file: "chromium-http.bin",
        protocol: Protocol::Http,
        name: "clients2.google.com",
        ech: false,
    },
];

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hellos")
}

fn load(g: &Golden) -> Vec<u8> {
    let path = data_dir().join(g.file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expected(g: &Golden) -> Step {
    Step::Done(Detected {
        protocol: g.protocol,
        name: Some(g.name.to_owned()),
        ech: g.ech,
    })
}

/// Pushes `chunks` in turn; every answer but the last must be NeedMore with a hint that moves
/// forward and never asks for more than the whole input.
fn feed<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, total: usize) -> (Step, Detector) {
    let mut d = Detector::new();
    let mut pushed = 0;
    let mut last = Step::NeedMore { at_least: 1 };
    for chunk in chunks {
        if last.is_final() {
            break;
        }
        pushed += chunk.len();
        last = d.push(chunk);
        if let Step::NeedMore { at_least } = last {
            assert!(
                at_least > pushed,
                "hint {at_least} not beyond the {pushed} bytes pushed"
            );
            assert!(
                at_least <= total,
                "hint {at_least} beyond the {total}-byte input"
            );
        }
    }
    (last, d)
}

/// The handshake bytes carried by a capture's TLS records, and the first record's version.
fn handshake_payload(bytes: &[u8]) -> (Vec<u8>, [u8; 2]) {
    let mut payload = Vec::new();
    let mut rest = bytes;
    let version = [bytes[1], bytes[2]];
    while rest.len() >= 5 {
        assert_eq!(rest[0], 22, "capture holds a non-handshake record");
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        payload.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    assert!(rest.is_empty(), "capture ends inside a record header");
    (payload, version)
}

/// Rewrites a TLS capture so that its handshake message spans `n` records of similar size.
fn split_records(bytes: &[u8], n: usize) -> Vec<u8> {
    let (payload, version) = handshake_payload(bytes);
    let size = payload.len().div_ceil(n);
    let mut out = Vec::new();
    for chunk in payload.chunks(size) {
        out.extend_from_slice(&[22, version[0], version[1]]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    assert_eq!(payload.chunks(size).count(), n);
    out
}

/// Every variant of a golden input that must give the same answer.
fn variants(g: &Golden) -> Vec<(String, Vec<u8>)> {
    let bytes = load(g);
    let mut out = vec![(g.file.to_owned(), bytes.clone())];
    if g.protocol == Protocol::Tls {
        for n in [2, 3] {
            out.push((
                format!("{} in {n} records", g.file),
                split_records(&bytes, n),
            ));
        }
        // Records as small as they can be: a record per handshake byte would exceed 64 KiB
        // of headers for big hellos, so use 64-byte fragments.
        let (payload, _) = handshake_payload(&bytes);
        out.push((
            format!("{} in 64-byte records", g.file),
            split_records(&bytes, payload.len().div_ceil(64)),
        ));
    }
    out
}

#[test]
fn fixtures_are_all_there() {
    let mut on_disk: Vec<String> = std::fs::read_dir(data_dir())
        .expect("tests/data/hellos")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|f| f.ends_with(".bin"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = GOLDENS.iter().map(|g| g.file.to_owned()).collect();
    listed.sort();
    assert!(!listed.is_empty());
    assert_eq!(
        on_disk, listed,
        "every capture has an expectation and vice versa"
    );
}

#[test]
fn the_browser_hello_is_post_quantum_sized() {
    let g = GOLDENS
        .iter()
        .find(|g| g.file == "chromium-mlkem.bin")
        .expect("listed");
    let bytes = load(g);
    assert!(bytes.len() > 1700, "{} bytes", bytes.len());
    // X25519MLKEM768 is named group 0x11ec.
    assert!(bytes.windows(2).any(|w| w == [0x11, 0xec]));
}

#[test]
fn whole_input_gives_the_expected_answer() {
    for g in GOLDENS {
        for (what, bytes) in variants(g) {
            assert_eq!(Detector::new().push(&bytes), expected(g), "{what}");
        }
    }
}

#[test]
fn every_strict_prefix_needs_more() {
    for g in GOLDENS {
        for (what, bytes) in variants(g) {
            for len in 0..bytes.len() {
                let (step, _) = feed([&bytes[..len]], bytes.len());
                assert!(
                    matches!(step, Step::NeedMore { .. }),
                    "{what} at {len}: {step:?}"
                );
            }
        }
    }
}

#[test]
fn one_byte_per_push() {
    for g in GOLDENS {
        for (what, bytes) in variants(g) {
            let (step, d) = feed(bytes.chunks(1), bytes.len());
            assert_eq!(step, expected(g), "{what}");
            assert!(
                d.examined() <= 2 * bytes.len() as u64,
                "{what}: examined {} of {} bytes",
                d.examined(),
                bytes.len()
            );
        }
    }
}

#[test]
fn two_pushes_split_anywhere() {
    for g in GOLDENS {
        for (what, bytes) in variants(g) {
            for at in 0..=bytes.len() {
                let (a, b) = bytes.split_at(at);
                let (step, _) = feed([a, b], bytes.len());
                assert_eq!(step, expected(g), "{what} split at {at}");
            }
        }
    }
}

#[test]
fn following_bytes_do_not_change_the_answer() {
    // A client may send more right behind its hello (TLS 1.3 change_cipher_spec or early data,
    // a pipelined request); the answer depends on the hello alone.
    for g in GOLDENS {
        let mut bytes = load(g);
        bytes.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n");
        assert_eq!(Detector::new().push(&bytes), expected(g), "{}", g.file);
    }
}

#[test]
fn an_inflated_handshake_length_is_refused_early() {
    // The chromium hello with its handshake length raised far beyond MAX_HEAD: refused as soon
    // as the handshake header is in, long before 64 KiB have arrived.
    let g = GOLDENS
        .iter()
        .find(|g| g.file == "chromium-mlkem.bin")
        .expect("listed");
    let mut bytes = load(g);
    let declared = u32::try_from(MAX_HEAD).expect("fits").to_be_bytes();
    bytes[6..9].copy_from_slice(&declared[1..]);
    let mut d = Detector::new();
    assert!(matches!(
        d.push(&bytes[..8]),
        Step::NeedMore { at_least: 9 }
    ));
    assert_eq!(d.push(&bytes[8..9]), Step::TooLarge);
}

/// Rebuilds a ClientHello message (type, length, body) with its server_name extension data
/// replaced by `sni`; every other byte stays as captured.
fn with_server_name(msg: &[u8], sni: &[u8]) -> Vec<u8> {
    let body = &msg[4..];
    let mut at = 2 + 32;
    at += 1 + usize::from(body[at]);
    at += 2 + usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
    at += 1 + usize::from(body[at]);
    let ext_len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
    let mut ext = &body[at + 2..at + 2 + ext_len];
    let mut out_ext = Vec::new();
    let mut replaced = false;
    while !ext.is_empty() {
        let kind = u16::from_be_bytes([ext[0], ext[1]]);
        let len = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
        let data = if kind == 0 {
            replaced = true;
            sni
        } else {
            &ext[4..4 + len]
        };
        out_ext.extend_from_slice(&kind.to_be_bytes());
        out_ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out_ext.extend_from_slice(data);
        ext = &ext[4 + len..];
    }
    assert!(replaced, "the capture has a server_name extension");
    let mut new_body = body[..at].to_vec();
    new_body.extend_from_slice(&(out_ext.len() as u16).to_be_bytes());
    new_body.extend_from_slice(&out_ext);
    let mut out = vec![1];
    out.extend_from_slice(&(new_body.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&new_body);
    out
}

#[test]
fn a_name_of_another_type_beside_host_name_is_malformed_in_every_capture_and_slicing() {
    use portcullis::detect::Malformed;
    // (name_type, name) lists: another type before or after the host_name, or alone.
    let lists: &[&[(u8, &[u8])]] = &[
        &[(7, b"evil.example.net"), (0, b"api.example.com")],
        &[(0, b"api.example.com"), (1, b"evil.example.net")],
        &[(0, b"api.example.com"), (255, b"")],
        &[(7, b"api.example.com")],
    ];
    for g in GOLDENS.iter().filter(|g| g.protocol == Protocol::Tls) {
        let raw = load(g);
        let (msg, version) = handshake_payload(&raw);
        for entries in lists {
            let mut list = Vec::new();
            for (kind, name) in *entries {
                list.push(*kind);
                list.extend_from_slice(&(name.len() as u16).to_be_bytes());
                list.extend_from_slice(name);
            }
            let mut sni = (list.len() as u16).to_be_bytes().to_vec();
            sni.extend_from_slice(&list);
            let m = with_server_name(&msg, &sni);
            let mut bytes = vec![22, version[0], version[1]];
            bytes.extend_from_slice(&(m.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&m);
            let want = Step::Malformed(Malformed::OtherNameType);
            for (what, b) in [
                ("whole", bytes.clone()),
                ("in 3 records", split_records(&bytes, 3)),
            ] {
                assert_eq!(
                    Detector::new().push(&b),
                    want,
                    "{} {what} {entries:?}",
                    g.file
                );
                let (step, _) = feed(b.chunks(1), b.len());
                assert_eq!(step, want, "{} {what} byte by byte", g.file);
            }
        }
    }
}

/// SECURITY.md, "Only the first ClientHello is inspected": a second ClientHello behind the
/// first (as after a TLS 1.3 HelloRetryRequest) naming another host changes nothing; the
/// detector has answered with the first hello's name and the rest is relayed unread.
#[test]
fn a_second_client_hello_is_not_read() {
    let first = GOLDENS
        .iter()
        .find(|g| g.file == "openssl-s_client.bin")
        .expect("listed");
    let second = GOLDENS
        .iter()
        .find(|g| g.file == "chromium-mlkem.bin")
        .expect("listed");
    let mut bytes = load(first);
    bytes.extend_from_slice(&load(second));
    assert_eq!(Detector::new().push(&bytes), expected(first));
    let (step, _) = feed(bytes.chunks(7), bytes.len());
    assert_eq!(step, expected(first));
}
