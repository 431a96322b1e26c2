//! Golden files: `portcullis init --dry-run -c tests/fixtures/examples/X.toml`
//! prints `iptables/X.rules` byte for byte (docs/DESIGN.md §5).
//!
//! The resolvers come from tests/fixtures/examples/resolv.conf through
//! PORTCULLIS_RESOLV_CONF, the owner of its local stub (127.0.0.53) from the
//! socket tables in tests/fixtures/examples/proc-net (PORTCULLIS_PROC_NET),
//! so the output does not depend on the machine.
//! Regenerate after an intended change with
//! `UPDATE_GOLDENS=1 cargo test --test init_golden`, then review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> Vec<PathBuf> {
    let dir = root().join("tests/fixtures/examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

fn dry_run(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(root())
        .args(["init", "--dry-run", "-c"])
        .arg(config.strip_prefix(root()).unwrap_or(config))
        .env(
            "PORTCULLIS_RESOLV_CONF",
            "tests/fixtures/examples/resolv.conf",
        )
        // the socket tables that show who serves the local stub 127.0.0.53
        .env("PORTCULLIS_PROC_NET", "tests/fixtures/examples/proc-net")
        .output()
        .expect("run portcullis");
    assert!(
        out.status.success(),
        "init --dry-run -c {} failed: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn dry_run_reproduces_goldens() {
    let examples = examples();
    // Never filter fixtures silently: the six example kinds must all be here.
    assert!(examples.len() >= 6, "examples: {examples:?}");
    let update = std::env::var_os("UPDATE_GOLDENS").is_some();
    let mut failures = Vec::new();
    for cfg in &examples {
        let stem = cfg.file_stem().and_then(|s| s.to_str()).expect("file name");
        let golden = root().join("iptables").join(format!("{stem}.rules"));
        let got = dry_run(cfg);
        if update {
            std::fs::write(&golden, &got).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!(
                "{}: differs from {} (first differing line: {:?} vs {:?}); rerun with UPDATE_GOLDENS=1 if intended",
                cfg.display(),
                golden.display(),
                want.lines().zip(got.lines()).find(|(a, b)| a != b).map(|(a, _)| a),
                want.lines().zip(got.lines()).find(|(a, b)| a != b).map(|(_, b)| b),
            )),
            Err(e) => failures.push(format!(
                "{}: {e} (create it with UPDATE_GOLDENS=1)",
                golden.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_golden_has_its_example() {
    let goldens: Vec<PathBuf> = std::fs::read_dir(root().join("iptables"))
        .expect("iptables/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rules"))
        .collect();
    assert!(!goldens.is_empty());
    for g in goldens {
        let stem = g.file_stem().and_then(|s| s.to_str()).expect("name");
        let cfg = root().join(format!("tests/fixtures/examples/{stem}.toml"));
        assert!(cfg.exists(), "{} has no {}", g.display(), cfg.display());
    }
}

/// The goldens' shape, by meaning, so that a regenerated golden that lost a
/// rule kind does not pass review unnoticed.
#[test]
fn goldens_say_what_the_examples_mean() {
    let text = |name: &str| dry_run(&root().join(format!("tests/fixtures/examples/{name}.toml")));
    let split = |t: &str| -> (String, String) {
        let (v4, v6) = t.split_once("# ip6tables-restore\n").expect("two families");
        (v4.to_string(), v6.to_string())
    };

    let (v4, v6) = split(&text("pod"));
    assert!(v4.contains("# iptables-restore\n*nat\n"));
    for fam in [&v4, &v6] {
        assert!(fam.contains("-m owner --uid-owner 1337 --gid-owner 1337 "));
        assert!(fam.contains("-j REDIRECT --to-ports 15001"));
        assert!(fam.contains("-I OUTPUT 1 -p tcp "));
        assert!(fam.contains("*filter\n"));
        assert!(!fam.contains("PREROUTING"));
    }
    assert!(v4.contains("-d 192.0.2.53/32 -p tcp -m tcp --dport 53 "));
    assert!(v6.contains("-d 2001:db8::53/128 -p tcp -m tcp --dport 53 "));
    let rules_only = |t: &str| -> String {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        !rules_only(&v4).contains("127.0.0.53"),
        "loopback resolvers need no rule"
    );
    // what init chose on the host, as comments
    assert!(v4.starts_with(
        "# resolvers (nameservers in tests/fixtures/examples/resolv.conf): 192.0.2.53, 2001:db8::53; allow_udp rules without cidrs reach these only\n"
    ));
    assert!(v4.contains("# local resolver 127.0.0.53: UDP and TCP 53 pass for uid 991, "));
    assert!(v4.contains("# dhcp_client_uids: none "));
    // UDP 53 to the resolvers only; the stub's uid to anywhere, from OUTPUT only
    assert!(v4.contains("-A PORTCULLIS_EGRESS -d 192.0.2.53/32 -p udp -m udp --dport 53 "));
    assert!(v6.contains("-A PORTCULLIS_EGRESS -d 2001:db8::53/128 -p udp -m udp --dport 53 "));
    for fam in [&v4, &v6] {
        assert!(!fam.contains("-A PORTCULLIS_EGRESS -p udp -m udp --dport 53 "));
        assert!(
            fam.contains("-A PORTCULLIS_OUTPUT -p tcp -m owner --uid-owner 991 -m tcp --dport 53 ")
        );
        assert!(
            fam.contains("-A PORTCULLIS_OUTPUT -p udp -m owner --uid-owner 991 -m udp --dport 53 ")
        );
        assert!(
            !fam.contains("--dport 67") && !fam.contains("--dport 547"),
            "pods run no DHCP client"
        );
    }
    assert!(v4.contains("-d 10.96.0.0/12 ") && !v4.contains("fd00:"));
    assert!(v6.contains("-d fd00:10:96::/112 ") && !v6.contains("10.96."));
    assert!(v4.contains("--reject-with icmp-port-unreachable"));
    assert!(v6.contains("--reject-with icmp6-port-unreachable"));
    assert!(v6.contains("--icmpv6-type 143 "));

    let (v4, v6) = split(&text("gateway"));
    for fam in [&v4, &v6] {
        assert!(fam.contains("-m addrtype --dst-type LOCAL "));
        assert!(fam.contains("-A PORTCULLIS_PREROUTING -i lan0 "));
        assert!(fam.contains("-A PORTCULLIS_FORWARD -i wlan0 "));
        assert!(fam.contains("-I PREROUTING 1 -p tcp "));
        assert!(fam.contains("-I FORWARD 1 "));
        assert!(fam.contains("-m multiport --dports 22,25,587 "));
    }

    let (v4, v6) = split(&text("mark"));
    assert!(v4.contains("-m mark --mark 0x539 ") && v6.contains("-m mark --mark 0x539 "));
    assert!(v4.contains("--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 "));
    assert!(v4.contains("--dports 16,17 "));
    assert!(v4.contains("--to-ports 15006"));

    let (v4, v6) = split(&text("ipv4-only"));
    assert!(v4.contains("*nat\n") && v4.contains("*filter\n"));
    assert!(!v6.contains("*nat\n"), "ipv6 = false: nothing to redirect");
    assert!(v6.contains("-j DROP\n") && v6.contains("-A PORTCULLIS_OUTPUT -o lo "));

    for name in ["allow-any", "audit"] {
        let (v4, v6) = split(&text(name));
        assert!(v4.contains("*nat\n") && v6.contains("*nat\n"), "{name}");
        assert!(!v4.contains("*filter") && !v6.contains("*filter"), "{name}");
    }

    let (v4, v6) = split(&text("host"));
    assert!(v4.contains(
        "-A PORTCULLIS_OUTPUT -p udp -m owner --uid-owner 0 -m udp --sport 68 --dport 67 "
    ));
    assert!(v6.contains(
        "-A PORTCULLIS_OUTPUT -p udp -m owner --uid-owner 0 -m udp --sport 546 --dport 547 "
    ));
    assert!(!v4.contains("--dport 68 ") && !v6.contains("--dport 546 "));
    assert!(v4.contains("-d 192.0.2.123/32 -p udp -m udp --dport 123 "));
    assert!(v6.contains("-d 2001:db8::123/128 -p udp -m udp --dport 123 "));
    assert!(v4.contains("-p tcp -m tcp --dport 22 "));
}

#[test]
fn dry_run_needs_no_privileges_and_a_bad_config_is_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(root())
        .args([
            "init",
            "--dry-run",
            "-c",
            "tests/fixtures/invalid/bad_cidr.toml",
        ])
        .output()
        .expect("run portcullis");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad_cidr.toml"), "{err}");
}

/// `check` tells the operator that `init` decides the resolvers on the target
/// host, and warns about UDP to any address and, in host mode, missing NTP.
#[test]
fn check_says_init_decides_the_resolvers() {
    let check = |rel: &str| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .current_dir(root())
            .args(["check", "-c", rel])
            .output()
            .expect("run portcullis");
        assert!(
            out.status.success(),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let pod = check("tests/fixtures/examples/pod.toml");
    assert!(
        pod.contains("note: [redirect] allow_udp without cidrs (ports 53) reaches only the host's resolvers, which `portcullis init` reads from /etc/resolv.conf on the target host"),
        "{pod}"
    );
    assert!(!pod.contains("NTP"), "a pod is not in host mode: {pod}");
    let host = check("deploy/systemd/config.toml");
    assert!(!host.contains("warning:"), "{host}");
    let tmp = std::env::temp_dir().join(format!("portcullis-golden-{}.toml", std::process::id()));
    std::fs::write(
        &tmp,
        "[redirect]\ndhcp_client_uids = [0]\nallow_udp = [{ ports = [53], cidrs = [\"0.0.0.0/0\", \"::/0\"] }]\n",
    )
    .expect("temp config");
    let out = check(tmp.to_str().expect("utf-8"));
    let _ = std::fs::remove_file(&tmp);
    assert!(
        out.contains("warning: [redirect] allow_udp ports 53 to 0.0.0.0/0, ::/0: "),
        "{out}"
    );
    assert!(
        out.contains("warning: [redirect] allow_udp does not let UDP 123 (NTP) out"),
        "{out}"
    );
}
