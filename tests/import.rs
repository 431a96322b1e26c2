//! `portcullis import` and `include`, run as processes: every fixture shape
//! against its golden output, `check` accepting every output, exit codes with
//! `file:line`, `--namespace` (exportTo), the mode from mesh config, and
//! included TOML and Istio YAML at start (`check`, `explain`, errors).
//!
//! Regenerate the goldens after an intended change with
//! `UPDATE_GOLDEN=1 cargo test --test import`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const FIXTURES: &str = "tests/fixtures/istio";

fn portcullis_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn portcullis(args: &[&str]) -> (i32, String, String) {
    portcullis_in(Path::new(env!("CARGO_MANIFEST_DIR")), args, None)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("portcullis-import-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `check -c` on `text`: the summary, or a panic with the error.
fn check_accepts(name: &str, text: &str) -> String {
    let d = tmpdir(&format!("check-{name}"));
    let p = d.join("config.toml");
    std::fs::write(&p, text).unwrap();
    let (code, out, err) = portcullis(&["check", "-c", p.to_str().unwrap()]);
    assert_eq!(code, 0, "check refused the import of {name}: {err}\n{text}");
    let _ = std::fs::remove_dir_all(&d);
    out
}

/// Every import of the fixtures: (golden name, arguments after `import`).
const CASES: &[(&str, &[&str])] = &[
    ("egress-docs", &["egress-docs.yaml"]),
    ("list", &["list.yaml"]),
    ("list-ns-team-a", &["--namespace", "team-a", "list.yaml"]),
    ("list-ns-team-b", &["--namespace", "team-b", "list.yaml"]),
    ("databases", &["databases.yaml"]),
    ("extras", &["extras.yaml"]),
    ("unsafe-with-egress", &["unsafe.yaml", "egress-docs.yaml"]),
    ("mesh-allow-any", &["mesh-allow-any.yaml"]),
    (
        "operator-allow-any",
        &["istio-operator.yaml", "egress-docs.yaml"],
    ),
    (
        "mesh-disagree",
        &["mesh-allow-any.yaml", "sidecar-registry-only.yaml"],
    ),
];

#[test]
fn every_fixture_matches_its_golden_and_check_accepts_it() {
    assert!(!CASES.is_empty());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for (name, args) in CASES {
        let mut a = vec!["import".to_string()];
        for x in *args {
            if x.ends_with(".yaml") {
                a.push(format!("{FIXTURES}/{x}"));
            } else {
                a.push(x.to_string());
            }
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, out, err) = portcullis(&a);
        assert_eq!(code, 0, "{name}: {err}");
        let golden = root
            .join(FIXTURES)
            .join("golden")
            .join(format!("{name}.toml"));
        if update {
            std::fs::write(&golden, &out).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden)
                .unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
            if want != out {
                failures.push(format!("--- {name}: golden differs\n{out}"));
            }
        }
        // check accepts it, with exactly the uncommented tables
        let summary = check_accepts(name, &out);
        let tables = out.lines().filter(|l| *l == "[[service_entry]]").count();
        assert!(tables > 0, "{name}");
        assert!(
            summary.contains(&format!("service entries: {tables}\n")),
            "{name}: {summary}"
        );
        // never a catch-all address the source did not list
        for l in out.lines().filter(|l| l.contains("addresses = ")) {
            assert!(
                !l.contains("0.0.0.0/0") && !l.contains("::/0"),
                "{name}: {l}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mapping_follows_istio_where_portcullis_has_it() {
    let (_, out, _) = portcullis(&["import", &format!("{FIXTURES}/databases.yaml")]);
    // MONGO becomes TCP, its addresses and STATIC endpoints kept, the
    // endpoint's `ports` map applied to the one that has it
    assert!(out.contains("name = \"data/external-mongo\"\nhosts = [\"mymongodb.somedomain\"]\nports = [{ number = 27018, name = \"mongodb\", protocol = \"TCP\" }]\nresolution = \"STATIC\"\naddresses = [\"192.0.2.10/32\"]\nendpoints = [{ address = \"198.51.100.2\", port = 27017 }, { address = \"198.51.100.3\" }]\nlocation = \"MESH_INTERNAL\""), "{out}");
    // STATIC endpoints on other ports per service port: one table per port
    assert!(out.contains("name = \"data/billing-static:443\""), "{out}");
    assert!(
        out.contains("endpoints = [{ address = \"198.51.100.30\", port = 8080 }]"),
        "{out}"
    );
    // NONE with addresses stays NONE
    assert!(out.contains("name = \"data/mysql-range\"\nhosts = [\"mysql.example.com\"]\nports = [{ number = 3306, name = \"tcp-mysql\", protocol = \"TCP\" }]\nresolution = \"NONE\"\naddresses = [\"203.0.113.0/28\"]"), "{out}");

    // what the proxy would do with it, by `explain` on the written config
    let d = tmpdir("explain-db");
    let cfg = d.join("config.toml");
    std::fs::write(&cfg, &out).unwrap();
    let c = cfg.to_str().unwrap();
    let (code, e, err) = portcullis(&["explain", "-c", c, "--dst", "192.0.2.10:27018"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        e.contains("decision: allow") && e.contains("entry: data/external-mongo ("),
        "{e}"
    );
    assert!(e.contains("198.51.100.2:27017, 198.51.100.3:27018"), "{e}");
    let (_, e, _) = portcullis(&["explain", "-c", c, "--dst", "192.0.2.99:27018"]);
    assert!(e.contains("decision: deny"), "{e}");
    let (_, e, _) = portcullis(&[
        "explain",
        "-c",
        c,
        "--dst",
        "198.51.100.30:443",
        "--sni",
        "billing.example.com",
    ]);
    assert!(e.contains("upstream: 198.51.100.30:8443"), "{e}");

    // resolution NONE (Istio's default) on TLS without addresses: the proxy
    // resolves the presented name instead of trusting the dialled IP
    let (_, out, _) = portcullis(&["import", &format!("{FIXTURES}/list.yaml")]);
    assert!(
        out.contains("# note: Istio's resolution NONE (its default)"),
        "{out}"
    );
    std::fs::write(&cfg, &out).unwrap();
    let (_, e, _) = portcullis(&[
        "explain",
        "-c",
        c,
        "--dst",
        "198.51.100.99:443",
        "--sni",
        "en.wikipedia.org",
    ]);
    assert!(
        e.contains("entry: team-a/wikipedia") && e.contains("would resolve en.wikipedia.org"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn refused_entries_are_commented_out_with_reason_and_draft() {
    let (code, out, err) = portcullis(&[
        "import",
        &format!("{FIXTURES}/unsafe.yaml"),
        &format!("{FIXTURES}/egress-docs.yaml"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("# NOT IMPORTED: opaque TCP port 27017 with no addresses"),
        "{out}"
    );
    assert!(
        out.contains(
            "# [[service_entry]]\n# name = \"data/mongo-any\"\n# hosts = [\"mongo.example.com\"]"
        ),
        "{out}"
    );
    assert!(
        out.contains("# NOT IMPORTED: host `*` matches every name"),
        "{out}"
    );
    assert!(
        err.contains(
            "tests/fixtures/istio/unsafe.yaml:2: ServiceEntry data/mongo-any not imported"
        ),
        "{err}"
    );
    assert!(
        err.contains("skipped: DestinationRule default/api-external"),
        "{err}"
    );
}

#[test]
fn exit_1_with_file_and_line() {
    // not YAML: the file and the line of the fault
    let (code, out, err) = portcullis(&["import", &format!("{FIXTURES}/bad.yaml")]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("tests/fixtures/istio/bad.yaml:7: not YAML"),
        "{err}"
    );
    // nothing converted: only refused entries, or no ServiceEntry at all
    for f in ["unsafe.yaml", "not-istio.yaml"] {
        let (code, out, err) = portcullis(&["import", &format!("{FIXTURES}/{f}")]);
        assert_eq!(code, 1, "{f}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains(&format!("{f}:1: no ServiceEntry converted")),
            "{err}"
        );
    }
    let (code, _, err) = portcullis(&["import", "/nonexistent/se.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/se.yaml: cannot read"), "{err}");
    // usage
    assert_eq!(portcullis(&["import"]).0, 2);
}

#[test]
fn the_same_object_twice_keeps_the_last() {
    let f = format!("{FIXTURES}/egress-docs.yaml");
    let (code, out, err) = portcullis(&["import", &f, &f]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("# NOT IMPORTED: ServiceEntry default/api-external appears again at tests/fixtures/istio/egress-docs.yaml:18, which is kept"), "{out}");
    assert_eq!(
        out.matches("\nname = \"default/api-external\"").count(),
        1,
        "{out}"
    );
    check_accepts("twice", &out);
}

#[test]
fn stdin_is_read_for_dash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join(FIXTURES).join("egress-docs.yaml")).unwrap();
    let (code, out, err) = portcullis_in(root, &["import", "-"], Some(&yaml));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("#   -\n"), "{out}");
    assert!(
        out.contains("# ServiceEntry default/api-external (-:18, networking.istio.io/v1beta1)"),
        "{out}"
    );
    check_accepts("stdin", &out);
    let (code, _, err) = portcullis_in(root, &["import", "-"], Some("a: [b\n"));
    assert_eq!(code, 1);
    assert!(
        err.contains("-:2: not YAML") || err.contains("-:1: not YAML"),
        "{err}"
    );
}

#[test]
fn namespace_applies_export_to() {
    let (_, a, err) = portcullis(&[
        "import",
        "--namespace",
        "team-a",
        &format!("{FIXTURES}/list.yaml"),
    ]);
    assert!(a.contains("name = \"team-a/team-a-only\""), "{a}");
    assert!(!a.contains("name = \"team-a/for-team-b\""), "{a}");
    assert!(err.contains("ServiceEntry team-a/for-team-b is not visible in namespace team-a (exportTo: [team-b])"), "{err}");
    let (_, b, _) = portcullis(&[
        "import",
        "--namespace",
        "team-b",
        &format!("{FIXTURES}/list.yaml"),
    ]);
    assert!(b.contains("name = \"team-a/for-team-b\""), "{b}");
    assert!(!b.contains("name = \"team-a/team-a-only\""), "{b}");
    // exportTo absent: every namespace
    assert!(a.contains("team-a/wikipedia") && b.contains("team-a/wikipedia"));
}

#[test]
fn mode_from_mesh_config_and_registry_only_wins() {
    let (_, out, _) = portcullis(&["import", &format!("{FIXTURES}/mesh-allow-any.yaml")]);
    assert!(
        out.contains("\noutbound_traffic_policy = \"ALLOW_ANY\"\n"),
        "{out}"
    );
    let (_, out, _) = portcullis(&[
        "import",
        &format!("{FIXTURES}/mesh-allow-any.yaml"),
        &format!("{FIXTURES}/sidecar-registry-only.yaml"),
    ]);
    assert!(
        out.contains("\noutbound_traffic_policy = \"REGISTRY_ONLY\"\n"),
        "{out}"
    );
    assert!(
        out.contains("# The sources disagree: REGISTRY_ONLY wins."),
        "{out}"
    );
    // the Sidecar with a workloadSelector is not a namespace-wide mode
    assert!(!out.contains("from Sidecar one-app"), "{out}");
    let (_, out, _) = portcullis(&["import", &format!("{FIXTURES}/egress-docs.yaml")]);
    assert!(
        out.contains("\noutbound_traffic_policy = \"REGISTRY_ONLY\"\n"),
        "{out}"
    );
    // an IstioOperator's spec.meshConfig
    let (_, out, _) = portcullis(&[
        "import",
        &format!("{FIXTURES}/istio-operator.yaml"),
        &format!("{FIXTURES}/egress-docs.yaml"),
    ]);
    assert!(out.contains("# outboundTrafficPolicy ALLOW_ANY from IstioOperator spec.meshConfig control-plane (tests/fixtures/istio/istio-operator.yaml:1)\noutbound_traffic_policy = \"ALLOW_ANY\""), "{out}");
}

// ------------------------------------------------------------ include

/// A config directory: config.toml including a TOML fragment and a
/// ConfigMap-style volume of Istio YAML (`istio/x.yaml -> ..data/x.yaml`,
/// `..data -> ..2026_...`).
fn include_dir(name: &str, yaml: &[(&str, &str)]) -> PathBuf {
    let d = tmpdir(name);
    std::fs::create_dir_all(d.join("entries")).unwrap();
    std::fs::write(
        d.join("entries/api.toml"),
        "# an included fragment\n\n[[service_entry]]\nname = \"api\"\nhosts = [\"api.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n",
    )
    .unwrap();
    let ts = d.join("istio/..2026_12_02_06_00_00.000000001");
    std::fs::create_dir_all(&ts).unwrap();
    for (f, text) in yaml {
        std::fs::write(ts.join(f), text).unwrap();
        std::os::unix::fs::symlink(format!("..data/{f}"), d.join("istio").join(f)).unwrap();
    }
    std::os::unix::fs::symlink("..2026_12_02_06_00_00.000000001", d.join("istio/..data")).unwrap();
    std::fs::write(
        d.join("config.toml"),
        "include = [\"entries/*.toml\", \"istio/*.yaml\", \"more/*.yaml\"]\n\n[proxy]\nlisten = [\"127.0.0.1:15001\"]\n\n[[service_entry]]\nname = \"own\"\nhosts = [\"own.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n",
    )
    .unwrap();
    d
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(FIXTURES)
            .join(name),
    )
    .unwrap()
}

#[test]
fn include_at_start_check_and_explain_name_the_source() {
    let d = include_dir("start", &[("databases.yaml", &fixture("databases.yaml"))]);
    let cfg = d.join("config.toml");
    let c = cfg.to_str().unwrap();
    let (code, out, err) = portcullis(&["check", "-c", c]);
    assert_eq!(code, 0, "{err}");
    // own + fragment + 6 tables of databases.yaml, read once (not again
    // through ..data/ or the timestamped directory)
    assert!(out.contains("service entries: 8\n"), "{out}");
    let inc = d.join("entries/api.toml");
    assert!(
        out.contains(&format!(
            "  api ({}:3): api.example.com on 443/TLS",
            inc.display()
        )),
        "{out}"
    );
    let yaml = d.join("istio/databases.yaml");
    assert!(
        out.contains(&format!("  data/pinned-tls ({}:42):", yaml.display())),
        "{out}"
    );
    assert!(out.contains("  own (line 6):"), "{out}");
    assert!(
        out.contains("include `more/*.yaml` matches no file"),
        "{out}"
    );
    assert!(!out.contains("..data"), "{out}");

    let (_, e, _) = portcullis(&[
        "explain",
        "-c",
        c,
        "--dst",
        "198.51.100.20:443",
        "--sni",
        "secure.example.com",
    ]);
    assert!(
        e.contains(&format!("entry: data/pinned-tls ({}:42)", yaml.display())),
        "{e}"
    );
    let (_, e, _) = portcullis(&[
        "explain",
        "-c",
        c,
        "--dst",
        "192.0.2.10:443",
        "--sni",
        "api.example.com",
    ]);
    assert!(
        e.contains(&format!("entry: api ({}:3)", inc.display())),
        "{e}"
    );
    // the explicit proxy's explain too
    let (code, e, err) = portcullis(&["explain", "-c", c, "--connect", "api.example.com:443"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        e.contains(&format!("entry: api ({}:3)", inc.display())),
        "{e}"
    );

    // a pattern matching the config file itself, and two patterns matching
    // one file: each file is read once
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "include = [",
        "include = [\"*.toml\", \"entries/api.*\", ",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = portcullis(&["check", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("service entries: 8\n"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn include_errors_name_the_included_file_and_line() {
    // an entry import would comment out fails the load
    let d = include_dir("refused", &[("unsafe.yaml", &fixture("unsafe.yaml"))]);
    let (code, _, err) = portcullis(&["check", "-c", d.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "{}:2: ServiceEntry data/mongo-any cannot be included: opaque TCP port 27017",
            d.join("istio/unsafe.yaml").display()
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);

    // not YAML
    let d = include_dir("bad", &[("bad.yaml", &fixture("bad.yaml"))]);
    let (code, _, err) = portcullis(&["check", "-c", d.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "{}:7: not YAML",
            d.join("istio/bad.yaml").display()
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);

    // a fragment holding more than entries
    let d = include_dir("fragment", &[]);
    std::fs::write(d.join("entries/x.toml"), "[proxy]\nlisten = []\n").unwrap();
    let (code, _, err) = portcullis(&["check", "-c", d.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{}:1:", d.join("entries/x.toml").display())),
        "{err}"
    );
    assert!(err.contains("holds only [[service_entry]] tables"), "{err}");
    // an invalid entry in a fragment: its own file and line
    std::fs::write(d.join("entries/x.toml"), "\n[[service_entry]]\nhosts = [\"x.example.com\"]\nports = [{ number = 443, protocol = \"GRPC\" }]\n").unwrap();
    let (code, _, err) = portcullis(&["check", "-c", d.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "{}:4: service_entry \"x.example.com\": key `ports`",
            d.join("entries/x.toml").display()
        )),
        "{err}"
    );
    // a name used twice across files
    std::fs::write(d.join("entries/x.toml"), "[[service_entry]]\nname = \"own\"\nhosts = [\"x.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n").unwrap();
    let (code, _, err) = portcullis(&["check", "-c", d.join("config.toml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("the name is already used at"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
