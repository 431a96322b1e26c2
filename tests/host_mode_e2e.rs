//! `portcullis run --redirect` (docs/DESIGN.md §1), the try-out host mode, inside a
//! namespace the test made: root installs the rules, the proxy runs as
//! proxy_uid in a child, signals are forwarded, the rules go when it exits.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn run_redirect_installs_serves_and_removes_rules() {
    let world = World::start();
    let cfg = world.write_file(
        "config.toml",
        r#"
[proxy]
listen = ["127.0.0.1:15001", "[::1]:15001"]
health = "127.0.0.1:15021"
admin = "127.0.0.1:15000"
drain_min = "0s"
drain_timeout = "1s"

[redirect]
proxy_uid = 1337
proxy_gid = 1337

[[service_entry]]
hosts = ["api.example.com"]
ports = [{ number = 443, protocol = "TLS" }]
"#,
    );
    let before = world.iptables_save(&world.pod);
    assert!(!before.contains("PORTCULLIS"), "{before}");
    let mut host = world.spawn_pod(Cmd::new(portcullis_bin()).label("run --redirect").args([
        "run",
        "-c",
        cfg.to_str().unwrap(),
        "--redirect",
    ]));
    world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
    let rules = world.iptables_save(&world.pod);
    assert!(rules.contains("PORTCULLIS_OUTPUT"), "{rules}");

    // the proxy runs as proxy_uid, not root
    let out = world.run_pod(Cmd::new("sh").args([
        "-c",
        "ps -o uid=,args= -u 1337 | grep 'portcullis run' | grep -v grep",
    ]));
    assert!(out.stdout.contains("portcullis"), "{out:?}");

    // an application (uid 1000) is redirected: allowed and denied
    let ok = world.curl_as(APP_UID, APP_UID, &["-4", "https://api.example.com/"]);
    assert!(ok.ok().contains("tls ok sni=api.example.com"), "{ok:?}");
    let denied = world.curl_as(APP_UID, APP_UID, &["-4", "https://other.example.net/"]);
    assert!(!denied.success(), "{denied:?}");
    // The line is written when the proxy's side of the flow ends, which may
    // be just after curl has given up.
    assert!(
        host.wait_output("\"decision\":\"deny\"", Duration::from_secs(5)),
        "{}",
        host.logs(3000)
    );

    // SIGTERM is forwarded; the child drains and exits; the rules go
    assert!(host.signal(libc::SIGTERM));
    let st = host
        .wait_timeout(Duration::from_secs(15))
        .expect("host mode exits after SIGTERM");
    assert!(st.success(), "{st:?}\n{}", host.logs(3000));
    let after = world.iptables_save(&world.pod);
    assert!(!after.contains("PORTCULLIS"), "rules left behind:\n{after}");
    assert!(
        host.stderr().contains("redirect rules removed"),
        "{}",
        host.logs(3000)
    );
}

#[test]
fn run_redirect_needs_root() {
    let world = World::start();
    let cfg = world.write_file("config.toml", "");
    let out = world.run_pod(
        Cmd::new(portcullis_bin())
            .args(["run", "-c", cfg.to_str().unwrap(), "--redirect"])
            .user(APP_UID, APP_UID)
            .timeout(Duration::from_secs(10)),
    );
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("must run as root"), "{out:?}");
}
