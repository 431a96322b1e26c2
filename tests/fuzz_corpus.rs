//! The fuzz corpus replayed as an ordinary test (fast; no fuzzing happens here). Every file the
//! fuzzers kept under fuzz/corpus/<target>/ (the seeds from fuzz/make_seeds.py, and whatever
//! cargo fuzz found interesting, crashes included once fixed) goes through the same invariants
//! the fuzz targets check (fuzz/checks.rs). Crashes found while fuzzing also have a named test
//! below, with the input inline.

#[path = "../fuzz/checks.rs"]
#[allow(dead_code)]
mod checks;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on every corpus file of `target`, naming the file that fails.
fn replay(target: &str, min_seeds: usize, check: fn(&[u8])) {
    let files = corpus(target);
    let seeds = files
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .count();
    assert!(
        seeds >= min_seeds,
        "{target}: {seeds} seeds, expected at least {min_seeds} (run fuzz/make_seeds.py)"
    );
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if let Err(p) = std::panic::catch_unwind(|| check(&data)) {
            eprintln!("{target}: {} failed", f.display());
            std::panic::resume_unwind(p);
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn detect_tls_corpus() {
    replay("detect_tls", 20, checks::detector);
}

#[test]
fn client_hello_corpus() {
    replay("client_hello", 20, checks::client_hello);
}

#[test]
fn detect_http_corpus() {
    replay("detect_http", 10, checks::detector);
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", 40, checks::config);
}

/// Found by review while writing the WHATWG reading of the target into checks.rs (which now
/// catches it): absolute-form targets that a WHATWG URL parser reads as naming another host
/// than the one compared with Host were accepted (src/detect/http.rs `target_authority`).
#[test]
fn absolute_form_targets_read_differently_by_url_parsers_are_malformed() {
    use portcullis::detect::{Detector, Step};
    for head in [
        &b"GET http://evil.example.net\\@api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n"[..],
        b"GET http:evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"GET https:/evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"GET http:\\\\evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"GET evil.example.net:80 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    ] {
        checks::detector(head);
        assert!(
            matches!(Detector::new().push(head), Step::Malformed(_)),
            "{}",
            String::from_utf8_lossy(head)
        );
    }
}
