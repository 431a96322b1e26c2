//! The commands run as a process: output, exit codes, file and line.

use std::path::Path;
use std::process::Command;

fn portcullis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_valid_example() {
    let (code, out, err) = portcullis(&["check", "-c", "config.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config.toml: valid"), "{out}");
    assert!(
        out.contains(&format!(
            "payments-api (line {})",
            entry_line("payments-api")
        )),
        "{out}"
    );
    assert!(out.contains("service entries: 5"), "{out}");
}

#[test]
fn check_prints_entry_names_as_written() {
    let (code, out, err) = portcullis(&["check", "-c", "tests/fixtures/valid/entry_names.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  NoneSuch-Dns (line 3): "), "{out}");
    assert!(out.contains("resolution DNS"), "{out}");
    assert!(out.contains("  Static-None (line 9): "), "{out}");
    assert!(out.contains("resolution NONE"), "{out}");
}

#[test]
fn check_warns_on_trusting_the_client() {
    let (code, out, _) = portcullis(&["check", "-c", "tests/fixtures/valid/trust_client.toml"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warning:") && out.contains("trusts the client's choice of IP"),
        "{out}"
    );
    assert!(out.contains("trust_client.toml:4:"), "{out}");
}

#[test]
fn check_invalid_names_file_line_and_key() {
    let (code, out, err) =
        portcullis(&["check", "-c", "tests/fixtures/invalid/duplicate_port.toml"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "one sentence: {err}");
    assert!(
        err.starts_with("tests/fixtures/invalid/duplicate_port.toml:6: service_entry \"api.example.com\": key `ports`"),
        "{err}"
    );
    let (code, _, err) = portcullis(&["check", "-c", "/nonexistent/portcullis.toml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/portcullis.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(portcullis(&["explain", "-c", "config.toml"]).0, 2);
    assert_eq!(
        portcullis(&["explain", "-c", "config.toml", "--dst", "nope"]).0,
        2
    );
    assert_eq!(portcullis(&["frobnicate"]).0, 2);
}

/// Every command's failure is one line on stderr, prefixed where the command
/// names itself, with exit 1 (2 for usage errors).
#[test]
fn every_command_reports_one_line_and_its_exit_code() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let status_url = format!("http://{closed}");
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["wait", "--url", "https://x/", "--timeout", "1s"],
            1,
            "portcullis wait: https://x/: only http:// URLs are supported",
        ),
        (
            &["wait", "--timeout", "soon"],
            2,
            "error: invalid value 'soon' for '--timeout <TIMEOUT>': `soon` is not a duration",
        ),
        (
            &["init", "--dry-run", "-c", "/nonexistent/p.toml"],
            1,
            "portcullis init: /nonexistent/p.toml: cannot read: ",
        ),
        (
            &["run", "-c", "/nonexistent/p.toml"],
            1,
            "/nonexistent/p.toml: cannot read: ",
        ),
        (
            &["check", "-c", "/nonexistent/p.toml"],
            1,
            "/nonexistent/p.toml: cannot read: ",
        ),
        (
            &["explain", "-c", "config.toml", "--connect", "nope"],
            2,
            "--connect \"nope\": expected HOST:PORT",
        ),
        (
            &["import", "/nonexistent/se.yaml"],
            1,
            "portcullis import: /nonexistent/se.yaml: cannot read: ",
        ),
        (
            &["status", "--url", &status_url],
            1,
            &format!("portcullis status: {status_url}/api/summary: "),
        ),
    ];
    for (args, want_code, want) in cases {
        let (code, out, err) = portcullis(args);
        assert_eq!(code, *want_code, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.starts_with(want), "{args:?}: {err}");
        if *want_code == 1 {
            assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        }
    }
}

/// `portcullis explain -c config.toml --dst DST` with `more` appended.
fn explain(dst: &str, more: &[&str]) -> (i32, String) {
    let mut args = vec!["explain", "-c", "config.toml", "--dst", dst];
    args.extend_from_slice(more);
    let (code, out, _) = portcullis(&args);
    (code, out)
}

#[test]
fn explain_decisions() {
    let (code, out) = explain("192.0.2.10:443", &["--sni", "API.Example.com."]);
    assert_eq!(code, 0);
    assert!(out.contains("decision: allow"), "{out}");
    assert!(
        out.contains(&format!(
            "entry: payments-api (config.toml:{})",
            entry_line("payments-api")
        )),
        "{out}"
    );
    assert!(out.contains("would resolve api.example.com"), "{out}");

    let (_, out) = explain("192.0.2.10:443", &["--sni", "files.example.com"]);
    assert!(
        out.contains("decision: deny") && out.contains("reason: not_in_registry"),
        "{out}"
    );
    assert!(out.contains("candidates on port 443"), "{out}");

    let (_, out) = explain("198.51.100.7:5432", &[]);
    assert!(
        out.contains("decision: allow")
            && out.contains(&format!(
                "orders-db (config.toml:{})",
                entry_line("orders-db")
            )),
        "{out}"
    );

    // (dst, extra arguments, every piece the output must contain)
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "192.0.2.10:80",
            &["--host", "a.files.example.com"],
            &["decision: allow", "file-store"],
        ),
        (
            "192.0.2.10:443",
            &["--sni", "192.0.2.10"],
            &["IP literal", "reason: not_in_registry"],
        ),
        (
            "192.0.2.10:443",
            &["--sni", "bad_name!"],
            &["reason: malformed"],
        ),
        (
            "192.0.2.25:587",
            &[],
            &["mail-relay", "explain never resolves"],
        ),
        (
            "192.0.2.10:443",
            &["--sni", "legacy.example.org"],
            &["203.0.113.5:8443 (STATIC"],
        ),
    ];
    for (dst, more, wants) in cases {
        let (_, out) = explain(dst, more);
        for want in *wants {
            assert!(out.contains(want), "{dst} {more:?}: {out}");
        }
    }
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config.toml")
        .exists());
}

/// The line of the `[[service_entry]]` header of the example entry `name` in
/// config.toml, so comments added to the example do not break these tests.
fn entry_line(name: &str) -> usize {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    let lines: Vec<&str> = src.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("name") && l.contains(&format!("\"{name}\"")))
        .unwrap_or_else(|| panic!("config.toml has no entry {name}"));
    lines[..at]
        .iter()
        .rposition(|l| l.trim() == "[[service_entry]]")
        .expect("a [[service_entry]] header before the name")
        + 1
}
