//! Every validation error of docs/DESIGN.md §2 has an invalid fixture; each must be
//! refused with a message naming the file, the line and the key.

use std::path::Path;

use portcullis::config::{Config, ConfigError};

fn header<'a>(src: &'a str, field: &str) -> Option<&'a str> {
    src.lines()
        .filter_map(|l| l.strip_prefix("# "))
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(": ")))
}

#[test]
fn invalid_fixtures_are_refused_naming_the_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "fixtures went missing: {}", files.len());
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        let key = header(&src, "key").expect("fixture names its key");
        let says = header(&src, "says").expect("fixture names its message");
        let err = match Config::parse(&f, &src) {
            Ok(_) => panic!("{} was accepted", f.display()),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert_eq!(msg.lines().count(), 1, "one line: {msg}");
        assert!(
            !msg.contains("Raw") && !msg.contains("i64") && !msg.contains("TOML parse error"),
            "internal names leak: {msg}"
        );
        assert!(msg.starts_with(&f.display().to_string()), "{msg}");
        assert!(
            msg.contains(says),
            "{}: {msg:?} lacks {says:?}",
            f.display()
        );
        if key != "-" {
            assert_eq!(err.key(), Some(key), "{}: {msg}", f.display());
            assert!(msg.contains(&format!("key `{key}`")), "{msg}");
            let rest = &msg[f.display().to_string().len() + 1..];
            let line: usize = rest
                .split(':')
                .next()
                .unwrap()
                .parse()
                .expect("a line number");
            assert!(line >= 1 && line <= src.lines().count(), "{msg}");
            if let Some(want) = header(&src, "line") {
                assert_eq!(line.to_string(), want, "{}: {msg}", f.display());
            }
        } else {
            assert!(matches!(err, ConfigError::Syntax { .. }), "{msg}");
            // syntax errors carry the line first and the column after.
            assert!(msg.contains("(column "), "{msg}");
        }
    }
}

#[test]
fn valid_fixtures_and_the_example_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("config.toml")];
    for e in std::fs::read_dir(root.join("tests/fixtures/valid")).unwrap() {
        files.push(e.unwrap().path());
    }
    assert!(files.len() >= 2);
    for f in files {
        if let Err(e) = Config::load(&f) {
            panic!("{e}");
        }
    }
}
