//! `portcullis init` for real, in network namespaces (docs/DESIGN.md §5, §6).
//!
//! Every iptables command here runs as `ip netns exec NS ...` inside a
//! namespace this test created (`common::Netns`, named `pc<pid>x<n>n`); the machine's own
//! rules are never read or touched. Namespaces, temp files and processes are
//! removed by Drop guards, also when a test panics. Processes are killed by
//! pid. Addresses are documentation ranges only.
//!
//! World of the traffic tests ([`pod_and_inet`]):
//! ```text
//!  pod  eth0 192.0.2.2/24 2001:db8::2/64  -- init's rules, a stand-in proxy on :15001
//!   |
//!  inet eth0 192.0.2.1/24 2001:db8::1/64  -- upstream TCP :8080, TCP :53, UDP echo :53 :443
//!       (and .9 / ::9)
//! ```
//! The stand-in proxy and the upstreams are `tests/upstreams.py --listen`
//! (`Netns::serve`): each TCP listener answers with its label and the original
//! destination (SO_ORIGINAL_DST), so a client (`tests/client.py`, run as the
//! uid a case names by `Netns::client`) sees who answered and for whom.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Netns, Output, Who};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

const APP: Who = Some((1000, 1000));
const PROXY: Who = Some((1337, 1337));

/// What this file does in a namespace beyond the harness's [`Netns`]:
/// `portcullis init` and reading the rules it left.
trait InitNs {
    /// `portcullis init ARGS` inside the namespace, resolvers from `resolv`.
    fn init(&self, resolv: &Path, args: &[&str]) -> Output;
    /// [`InitNs::init`], which must succeed; its stdout.
    fn init_ok(&self, resolv: &Path, args: &[&str]) -> String;
    /// Writes `resolv` (resolv.conf) and `config`, runs `init --dry-run`,
    /// then applies them with `init`; what the dry run printed.
    fn apply(&self, resolv: &str, config: &str) -> String;
    /// `iptables-save` (or ip6tables-save), nft backend.
    fn save(&self, v6: bool) -> String;
    /// `iptables -C` / `ip6tables -C`: whether the rule exists, by meaning.
    fn has_rule(&self, v6: bool, table: &str, chain: &str, spec: &str) -> bool;
}

impl InitNs for Netns {
    fn init(&self, resolv: &Path, args: &[&str]) -> Output {
        self.cmd(BIN)
            .arg("init")
            .args(args)
            .env("PORTCULLIS_RESOLV_CONF", resolv)
            .timeout(Duration::from_secs(30))
            .run()
    }

    #[track_caller]
    fn init_ok(&self, resolv: &Path, args: &[&str]) -> String {
        self.init(resolv, args).ok().to_string()
    }

    #[track_caller]
    fn apply(&self, resolv: &str, config: &str) -> String {
        let resolv = self.write_file("resolv.conf", resolv);
        let cfg = self.write_file("config.toml", config);
        let cfg = cfg.to_str().expect("utf-8 path");
        let dry = self.init_ok(&resolv, &["--dry-run", "-c", cfg]);
        self.init_ok(&resolv, &["-c", cfg]);
        dry
    }

    fn save(&self, v6: bool) -> String {
        self.ok(&[if v6 {
            "ip6tables-nft-save"
        } else {
            "iptables-nft-save"
        }])
    }

    fn has_rule(&self, v6: bool, table: &str, chain: &str, spec: &str) -> bool {
        let tool = if v6 { "ip6tables-nft" } else { "iptables-nft" };
        let words = portcullis::init::apply::split_words(spec);
        let mut args = vec![tool, "-w", "-t", table, "-C", chain];
        args.extend(words.iter().map(String::as_str));
        self.run(&args).success()
    }
}

/// The pod/inet world of the traffic tests: pod 192.0.2.2 / 2001:db8::2,
/// inet 192.0.2.1 and .9 / 2001:db8::1 and ::9, default routes via inet.
fn pod_and_inet() -> (Netns, Netns) {
    let pod = Netns::new();
    let inet = Netns::new();
    pod.link(
        "eth0",
        &["192.0.2.2/24", "2001:db8::2/64"],
        &inet,
        "eth0",
        &[
            "192.0.2.1/24",
            "192.0.2.9/24",
            "2001:db8::1/64",
            "2001:db8::9/64",
        ],
    );
    pod.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    pod.ip(&["-6", "route", "add", "default", "via", "2001:db8::1"]);
    (pod, inet)
}

/// The upstream listeners of the traffic tests (in inet): TCP 8080 labelled
/// `upstream`, UDP echo on 53 and 443, IPv4 and IPv6.
const UPSTREAMS: [&str; 6] = [
    "tcp/192.0.2.1/8080/upstream",
    "tcp/2001:db8::1/8080/upstream",
    "udp/192.0.2.1/53",
    "udp/2001:db8::1/53",
    "udp/192.0.2.1/443",
    "udp/2001:db8::1/443",
];

/// An application's TCP to the upstream, IPv4 and IPv6, once `init` redirects
/// it: the stand-in proxy answers, naming the original destination.
const REDIRECTED: [(Who, &[&str], &str); 2] = [
    (
        APP,
        &["tcp", "192.0.2.1", "8080"],
        "proxy ORIGDST 192.0.2.1:8080",
    ),
    (
        APP,
        &["tcp", "2001:db8::1", "8080"],
        "proxy ORIGDST [2001:db8::1]:8080",
    ),
];

/// A client's line says the listener labelled `label` answered it.
fn answered_by(reply: &str, label: &str) -> bool {
    reply == label || reply.starts_with(&format!("{label} "))
}

/// A UDP client's ping came back.
fn answered(reply: &str) -> bool {
    reply.starts_with("ping")
}

/// A UDP client was refused (ICMP port unreachable).
fn refused(reply: &str) -> bool {
    reply.starts_with("ERR ConnectionRefusedError")
}

/// Each `(who, client args, label)`: the listener labelled `label` answers
/// that client (a label with ` ORIGDST ...` also names the destination the
/// answer reported).
#[track_caller]
fn assert_answers(ns: &Netns, cases: &[(Who, &[&str], &str)]) {
    for (who, args, label) in cases {
        let got = ns.client(*who, args);
        assert!(
            answered_by(&got, label),
            "{who:?} {args:?}: wanted {label}, got {got:?}"
        );
    }
}

/// `init` failed with exit 1 and one sentence on stderr holding every one of `needles`.
#[track_caller]
fn assert_one_sentence(out: &Output, needles: &[&str]) {
    assert_eq!(out.status, Some(1), "{out:?}");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{out:?}");
    assert!(!err.contains("panicked"), "{out:?}");
    for n in needles {
        assert!(err.contains(n), "wanted {n:?}: {out:?}");
    }
}

/// iptables-save output by meaning: no comments lines, no counters, and no
/// table that holds nothing (built-in chains only, no rules).
fn normalized(save: &str) -> String {
    let mut out = String::new();
    let mut table: Vec<String> = Vec::new();
    for line in save.lines() {
        if line.starts_with('#') {
            continue;
        }
        let line = match line.split_once(" [") {
            Some((head, _)) if line.starts_with(':') => head.to_string(),
            _ => line.to_string(),
        };
        if line.starts_with('*') {
            table.clear();
        }
        table.push(line.clone());
        if line == "COMMIT" {
            let meaningful = table
                .iter()
                .any(|l| l.starts_with("-A ") || (l.starts_with(':') && !l.ends_with(" ACCEPT")));
            if meaningful {
                out.push_str(&table.join("\n"));
                out.push('\n');
            }
            table.clear();
        }
    }
    out
}

// ---------------------------------------------------------------- configs

const FULL_CONFIG: &str = r#"
[proxy]
listen = ["0.0.0.0:15001", "[::]:15001"]
[redirect]
proxy_port = 15001
proxy_uid = 1337
proxy_gid = 1337
mark = 0x539
exclude_cidrs = ["198.51.100.0/24", "2001:db8:100::/48"]
exclude_ports = [22, 25]
capture_interfaces = ["lan0"]
allow_udp = [{ ports = [53] }, { ports = [123], cidrs = ["192.0.2.123"] }]
"#;

const POD_CONFIG: &str = r#"
[proxy]
listen = ["127.0.0.1:15001", "[::1]:15001"]
[redirect]
proxy_port = 15001
proxy_uid = 1337
proxy_gid = 1337
mark = 0x539
"#;

// ---------------------------------------------------------------- tests

/// Applied for real: key rules exist by meaning, a re-run changes nothing, a
/// config change removes what is no longer wanted, `--cleanup` restores the
/// namespace as it was (the operator's own rules untouched throughout).
#[test]
fn apply_rerun_and_cleanup() {
    let ns = Netns::new();
    let resolv = ns.write_file(
        "resolv.conf",
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\n",
    );
    let cfg = ns.write_file("full.toml", FULL_CONFIG);
    let cfg_s = cfg.to_str().expect("utf-8 path");

    // the operator's own rules, which portcullis must leave alone
    for (tool, table, dst, target) in [
        ("iptables-nft", "filter", "203.0.113.9/32", "ACCEPT"),
        ("iptables-nft", "nat", "203.0.113.10/32", "RETURN"),
        ("ip6tables-nft", "filter", "2001:db8::9/128", "ACCEPT"),
    ] {
        ns.ok(&[
            tool, "-w", "-t", table, "-A", "OUTPUT", "-d", dst, "-j", target,
        ]);
    }
    let before = (normalized(&ns.save(false)), normalized(&ns.save(true)));

    let out = ns.init_ok(&resolv, &["-c", cfg_s]);
    assert!(out.contains("iptables-nft"), "{out}");

    // Every rendered rule is there (proves the restore input was taken whole).
    let config = portcullis::config::Config::load(&cfg).expect("config");
    let resolvers = vec![
        "192.0.2.53".parse().unwrap(),
        "2001:db8::53".parse().unwrap(),
    ];
    let rules = portcullis::init::render(&config, &resolvers);
    for rs in rules.families() {
        let v6 = rs.family == portcullis::init::Family::V6;
        for t in &rs.tables {
            for r in &t.rules {
                assert!(
                    ns.has_rule(v6, t.name, r.chain, &r.spec),
                    "missing {} {} {}",
                    t.name,
                    r.chain,
                    r.spec
                );
            }
            for j in &t.jumps {
                assert!(
                    ns.has_rule(v6, t.name, j.from, &j.spec),
                    "missing jump {}",
                    j.spec
                );
            }
        }
    }
    // Key rules, written out by hand: (IPv6?, table, chain, match, comment, target).
    let mut key: Vec<(bool, &str, &str, String, String, String)> = Vec::new();
    for v6 in [false, true] {
        let (resolver, resolver_net, lo, excluded, any, unreachable) = if v6 {
            (
                "2001:db8::53",
                "2001:db8::53/128",
                "::1/128",
                "2001:db8:100::/48",
                "::/0",
                "icmp6-port-unreachable",
            )
        } else {
            (
                "192.0.2.53",
                "192.0.2.53/32",
                "127.0.0.0/8",
                "198.51.100.0/24",
                "0.0.0.0/0",
                "icmp-port-unreachable",
            )
        };
        let rule = |table, chain, m: &str, why: &str, target: &str| {
            (v6, table, chain, m.into(), why.into(), target.into())
        };
        let nat = |chain, m: &str, why: &str, target: &str| rule("nat", chain, m, why, target);
        let filter =
            |chain, m: &str, why: &str, target: &str| rule("filter", chain, m, why, target);
        key.extend([
            nat(
                "PORTCULLIS_OUTPUT",
                "-m owner --uid-owner 1337 --gid-owner 1337",
                "traffic of the proxy (uid 1337 gid 1337)",
                "RETURN",
            ),
            nat(
                "PORTCULLIS_OUTPUT",
                "-m mark --mark 0x539",
                "traffic the proxy marked (0x539)",
                "RETURN",
            ),
            nat("PORTCULLIS_OUTPUT", "-o lo", "loopback", "RETURN"),
            nat(
                "PORTCULLIS_OUTPUT",
                &format!("-d {resolver_net} -p tcp -m tcp --dport 53"),
                "resolver from resolv.conf (DNS over TCP)",
                "RETURN",
            ),
            nat(
                "PORTCULLIS_OUTPUT",
                &format!("-d {lo}"),
                "loopback destinations",
                "RETURN",
            ),
            nat(
                "PORTCULLIS_REDIRECT",
                "-p tcp -m multiport --dports 22,25",
                "exclude_ports 22,25",
                "RETURN",
            ),
            nat(
                "PORTCULLIS_REDIRECT",
                &format!("-d {excluded}"),
                &format!("exclude_cidrs {excluded}"),
                "RETURN",
            ),
            nat(
                "PORTCULLIS_REDIRECT",
                "-p tcp",
                &format!("include_cidrs {any} to the proxy"),
                "REDIRECT --to-ports 15001",
            ),
            nat(
                "PORTCULLIS_PREROUTING",
                "-m addrtype --dst-type LOCAL",
                "destinations on this host",
                "RETURN",
            ),
            nat(
                "PORTCULLIS_PREROUTING",
                "-i lan0",
                "capture_interfaces lan0",
                "PORTCULLIS_REDIRECT",
            ),
            filter(
                "PORTCULLIS_FORWARD",
                "-i lan0",
                "capture_interfaces lan0",
                "PORTCULLIS_EGRESS",
            ),
            // allow_udp without cidrs: the resolvers only
            filter(
                "PORTCULLIS_EGRESS",
                &format!("-d {resolver} -p udp -m udp --dport 53"),
                &format!("allow_udp ports 53 to resolver {resolver}"),
                "RETURN",
            ),
            filter(
                "PORTCULLIS_EGRESS",
                "-p udp",
                "other UDP refused at once (QUIC falls back to TCP)",
                &format!("REJECT --reject-with {unreachable}"),
            ),
        ]);
    }
    for (v6, m, why) in [
        (
            false,
            "-d 192.0.2.123/32 -p udp -m udp --dport 123",
            "allow_udp ports 123 to 192.0.2.123/32",
        ),
        (
            true,
            "-p ipv6-icmp -m icmp6 --icmpv6-type 135",
            "neighbour solicitation",
        ),
        (
            true,
            "-p ipv6-icmp -m icmp6 --icmpv6-type 143",
            "MLDv2 report",
        ),
    ] {
        key.push((
            v6,
            "filter",
            "PORTCULLIS_EGRESS",
            m.into(),
            why.into(),
            "RETURN".into(),
        ));
    }
    let spec = |m: &str, why: &str, target: &str| {
        format!("{m} -m comment --comment \"portcullis: {why}\" -j {target}")
    };
    for (v6, table, chain, m, why, target) in &key {
        let s = spec(m, why, target);
        assert!(
            ns.has_rule(*v6, table, chain, &s),
            "missing (ipv6 {v6}) {table} {chain} {s}"
        );
    }
    // an IPv4 exclusion stays out of the IPv6 rules
    assert!(!ns.has_rule(
        true,
        "nat",
        "PORTCULLIS_REDIRECT",
        &spec(
            "-d 198.51.100.0/24",
            "exclude_cidrs 198.51.100.0/24",
            "RETURN"
        )
    ));
    // the jumps come first in the built-in chains
    for (v6, table, chain, target) in [
        (false, "nat", "OUTPUT", "PORTCULLIS_OUTPUT"),
        (false, "nat", "PREROUTING", "PORTCULLIS_PREROUTING"),
        (false, "filter", "OUTPUT", "PORTCULLIS_OUTPUT"),
        (false, "filter", "FORWARD", "PORTCULLIS_FORWARD"),
        (true, "nat", "OUTPUT", "PORTCULLIS_OUTPUT"),
        (true, "filter", "OUTPUT", "PORTCULLIS_OUTPUT"),
    ] {
        let tool = if v6 { "ip6tables-nft" } else { "iptables-nft" };
        let list = ns.ok(&[tool, "-w", "-t", table, "-S", chain]);
        let first = list
            .lines()
            .find(|l| l.starts_with("-A "))
            .unwrap_or_default();
        assert!(
            first.ends_with(&format!("-j {target}")),
            "{table} {chain}: {list}"
        );
    }

    // Re-running gives the rule set of one run.
    let once = (ns.save(false), ns.save(true));
    let out = ns.init_ok(&resolv, &["-c", cfg_s]);
    assert!(out.contains("0 jumps inserted"), "{out}");
    let twice = (ns.save(false), ns.save(true));
    assert_eq!(normalized(&once.0), normalized(&twice.0));
    assert_eq!(normalized(&once.1), normalized(&twice.1));
    // one jump per table (nat and filter OUTPUT), however often init ran
    assert_eq!(
        twice.0.matches("-j PORTCULLIS_OUTPUT").count(),
        2,
        "{}",
        twice.0
    );

    // A config that no longer wants the filter (ALLOW_ANY) removes it.
    let any = ns.write_file(
        "any.toml",
        &format!("outbound_traffic_policy = \"ALLOW_ANY\"\n{POD_CONFIG}"),
    );
    ns.init_ok(&resolv, &["-c", any.to_str().expect("utf-8")]);
    let filter = ns.ok(&["iptables-nft", "-w", "-S"]);
    assert!(!filter.contains("PORTCULLIS"), "{filter}");
    let nat = ns.ok(&["iptables-nft", "-w", "-t", "nat", "-S"]);
    assert!(
        !nat.contains("PORTCULLIS_PREROUTING") && nat.contains("PORTCULLIS_REDIRECT"),
        "{nat}"
    );

    // --cleanup --dry-run changes nothing; --cleanup restores what was there.
    let dry = ns.init_ok(
        &resolv,
        &["--cleanup", "--dry-run", "-c", "/nonexistent.toml"],
    );
    assert!(dry.contains("-X PORTCULLIS_OUTPUT"), "{dry}");
    assert!(ns.save(false).contains("PORTCULLIS_OUTPUT"));
    let out = ns.init_ok(&resolv, &["--cleanup", "-c", "/nonexistent.toml"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(normalized(&ns.save(false)), before.0);
    assert_eq!(normalized(&ns.save(true)), before.1);
    let out = ns.init_ok(&resolv, &["--cleanup"]);
    assert!(out.contains("no portcullis rules"), "{out}");
}

/// The legacy backend works too, and `auto` then keeps using it.
#[test]
fn legacy_backend_and_detection() {
    let ns = Netns::new();
    let resolv = ns.write_file("resolv.conf", "");
    let cfg = ns.write_file("pod.toml", POD_CONFIG);
    let cfg_s = cfg.to_str().expect("utf-8 path");

    let out = ns.init_ok(&resolv, &["--backend", "legacy", "-c", cfg_s]);
    assert!(out.contains("iptables-legacy"), "{out}");
    let legacy = ns.ok(&["iptables-legacy-save"]);
    assert!(legacy.contains("-A OUTPUT -p tcp -m comment --comment \"portcullis: redirect outbound TCP\" -j PORTCULLIS_OUTPUT"), "{legacy}");
    assert!(!ns.save(false).contains("PORTCULLIS"), "nothing in nft");
    // auto: legacy holds the rules, so legacy is used again
    let out = ns.init_ok(&resolv, &["-c", cfg_s]);
    assert!(
        out.contains("iptables-legacy") && out.contains("0 jumps inserted"),
        "{out}"
    );
    assert_eq!(
        ns.ok(&["iptables-legacy-save"])
            .matches("-j PORTCULLIS_OUTPUT")
            .count(),
        2
    );
    ns.init_ok(&resolv, &["--cleanup"]);
    assert!(!ns.ok(&["iptables-legacy-save"]).contains("PORTCULLIS"));
    assert!(!ns.ok(&["ip6tables-legacy-save"]).contains("PORTCULLIS"));
}

/// A normal uid's TCP is redirected, the proxy's uid+gid and marked traffic
/// is not, IPv6 alike; TCP to the resolver's port 53 is not redirected; UDP
/// 443 is refused at once and UDP 53 allowed (REGISTRY_ONLY).
#[test]
fn traffic_is_redirected_and_filtered() {
    let (pod, inet) = pod_and_inet();
    let _up = inet.serve(
        None,
        &[&UPSTREAMS[..], &["tcp/192.0.2.1/53/resolver"]].concat(),
    );
    let _proxy = pod.serve(None, &["tcp/127.0.0.1/15001/proxy", "tcp/::1/15001/proxy"]);

    // before init everything reaches the upstream
    assert_answers(&pod, &[(APP, &["tcp", "192.0.2.1", "8080"], "upstream")]);
    assert!(answered(&pod.client(APP, &["udp", "192.0.2.1", "443"])));

    pod.apply("nameserver 192.0.2.1\nnameserver 2001:db8::1\n", POD_CONFIG);

    assert_answers(&pod, &REDIRECTED);
    assert_answers(
        &pod,
        &[
            (PROXY, &["tcp", "192.0.2.1", "8080"], "upstream"),
            (PROXY, &["tcp", "2001:db8::1", "8080"], "upstream"),
            // uid and gid are matched together: the proxy's uid with another gid is redirected
            (Some((1337, 1000)), &["tcp", "192.0.2.1", "8080"], "proxy"),
            // root is no exception, but marked packets are
            (None, &["tcp", "192.0.2.1", "8080"], "proxy"),
            (None, &["tcp", "192.0.2.1", "8080", "0x539"], "upstream"),
            (None, &["tcp", "2001:db8::1", "8080", "0x539"], "upstream"),
            // the resolver's TCP port 53 is never redirected
            (APP, &["tcp", "192.0.2.1", "53"], "resolver"),
        ],
    );

    // UDP: 53 allowed, 443 refused at once (ICMP port unreachable)
    for addr in ["192.0.2.1", "2001:db8::1"] {
        let dns = pod.client(APP, &["udp", addr, "53"]);
        assert!(answered(&dns), "{addr}: {dns}");
        let quic = pod.client(APP, &["udp", addr, "443"]);
        assert!(refused(&quic), "{addr}: {quic}");
        let ms: u64 = quic
            .split("ms=")
            .nth(1)
            .and_then(|n| n.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(ms < 1000, "refusal took {ms} ms");
        // the proxy's own UDP is not filtered
        assert!(answered(&pod.client(PROXY, &["udp", addr, "443"])));
    }
}

/// `ipv6 = false` under REGISTRY_ONLY: IPv6 egress is dropped, IPv4 works.
#[test]
fn ipv6_off_drops_ipv6() {
    let (pod, inet) = pod_and_inet();
    let _up = inet.serve(None, &UPSTREAMS);
    let _proxy = pod.serve(None, &["tcp/127.0.0.1/15001/proxy"]);
    pod.apply(
        "",
        "[proxy]\nlisten = [\"127.0.0.1:15001\"]\n[redirect]\nproxy_gid = 1337\ninclude_cidrs = [\"0.0.0.0/0\"]\nipv6 = false\n",
    );
    assert_answers(&pod, &[(APP, &["tcp", "192.0.2.1", "8080"], "proxy")]);
    // dropped (a timeout, not a refusal), for the proxy's uid too
    let started = Instant::now();
    let v6 = pod.client_with(PROXY, None, &["tcp", "2001:db8::1", "8080"], 0.5);
    assert_eq!(v6, "ERR timeout");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let v6 = pod.client_with(APP, None, &["udp", "2001:db8::1", "53"], 0.5);
    assert!(v6.starts_with("ERR timeout"), "{v6}");
    // loopback IPv6 still works
    let _lo = pod.serve(None, &["tcp/::1/9000/lo6"]);
    assert_answers(&pod, &[(APP, &["tcp", "::1", "9000"], "lo6")]);
}

/// Gateway mode: TCP forwarded from `capture_interfaces` is redirected to the
/// proxy; a connection to the gateway's own address is not; forwarded UDP 443
/// is refused, UDP 53 passes to the gateway's resolver only. With
/// `dhcp_client_uids` set, the rule set (owner matches only where OUTPUT
/// leads, never FORWARD) is accepted by iptables-restore and forwarded DHCP
/// requests are refused like any UDP.
#[test]
fn gateway_captures_forwarded_tcp() {
    // the gateway host where the traffic tests have the pod, a lan behind it
    let (host, inet) = pod_and_inet();
    let lan = Netns::new();
    lan.link(
        "eth0",
        &["198.18.0.2/24", "2001:db8:ff::2/64"],
        &host,
        "lan0",
        &["198.18.0.1/24", "2001:db8:ff::1/64"],
    );
    lan.ip(&["route", "add", "default", "via", "198.18.0.1"]);
    lan.ip(&["-6", "route", "add", "default", "via", "2001:db8:ff::1"]);
    inet.ip(&["route", "add", "198.18.0.0/24", "via", "192.0.2.2"]);
    inet.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:ff::/64",
        "via",
        "2001:db8::2",
    ]);
    host.ok(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ]);

    let _up = inet.serve(None, &[&UPSTREAMS[..], &["udp/192.0.2.1/67"]].concat());
    let _proxy = host.serve(
        None,
        &[
            "tcp/0.0.0.0/15001/proxy",
            "tcp/::/15001/proxy",
            "tcp/198.18.0.1/8080/gateway",
            "tcp/2001:db8:ff::1/8080/gateway",
        ],
    );
    // routing works
    assert_answers(&lan, &[(APP, &["tcp", "192.0.2.1", "8080"], "upstream")]);

    let resolv = host.write_file("resolv.conf", "nameserver 192.0.2.1\n");
    let cfg = host.write_file(
        "gw.toml",
        "[proxy]\nlisten = [\"0.0.0.0:15001\", \"[::]:15001\"]\n[redirect]\nproxy_gid = 1337\ncapture_interfaces = [\"lan0\"]\ndhcp_client_uids = [0]\n",
    );
    let out = host.init(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
    assert!(out.success() && out.stderr.is_empty(), "{out:?}");

    assert_answers(&lan, &REDIRECTED);
    assert_answers(
        &lan,
        &[
            // the gateway's own address is not captured
            (APP, &["tcp", "198.18.0.1", "8080"], "gateway"),
            (APP, &["tcp", "2001:db8:ff::1", "8080"], "gateway"),
        ],
    );
    // forwarded UDP: 53 passes to the resolver only, 443 and DHCP refused
    assert!(answered(&lan.client(APP, &["udp", "192.0.2.1", "53"])));
    for (who, sport, addr, port) in [
        (APP, None, "2001:db8::1", "53"),
        (None, Some(68), "192.0.2.1", "67"),
        (APP, None, "192.0.2.1", "443"),
        (APP, None, "2001:db8::1", "443"),
    ] {
        let got = lan.client_with(who, sport, &["udp", addr, port], 2.0);
        assert!(
            refused(&got),
            "{who:?} from {sport:?} to {addr}:{port}: {got}"
        );
    }
}

/// Without privileges: one sentence on stderr, exit 1, no backtrace.
#[test]
fn unprivileged_init_is_one_clear_sentence() {
    let ns = Netns::new();
    // readable by uid 1000 (the namespace's directory is 0755, its files 0644)
    let cfg = ns.write_file("pod.toml", POD_CONFIG);
    let out = ns
        .cmd(BIN)
        .user(1000, 1000)
        .args(["init", "-c", cfg.to_str().expect("utf-8")])
        .run();
    assert_one_sentence(&out, &["permission denied", "root"]);
}

/// A missing iptables is one sentence too.
#[test]
fn missing_iptables_is_one_clear_sentence() {
    let ns = Netns::new();
    let cfg = ns.write_file("pod.toml", POD_CONFIG);
    // init looks for iptables in PATH: point PATH at an empty directory
    // (`ip` itself is found by its full path, in the test's own PATH: with
    // PATH set for the child, the program is looked up in that PATH).
    let empty = ns.path("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let ip = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("ip"))
                .find(|p| p.is_file())
        })
        .expect("ip in PATH");
    let out = common::Cmd::new(ip)
        .args(["netns", "exec", &ns.name, BIN, "init", "-c"])
        .arg(&cfg)
        .env("PATH", &empty)
        .run();
    assert_one_sentence(&out, &["not found", "install iptables"]);
}

/// Issue 10.1: the DHCP exception was a UDP channel to any host. A workload
/// allowed to bind low ports (here `ip_unprivileged_port_start=0`, as
/// container runtimes set it in pods; root has CAP_NET_BIND_SERVICE anyway)
/// bound source port 68 and talked to any address on port 67, and back the
/// other way. Now DHCP passes only for `dhcp_client_uids`, only towards the
/// server ports 67/547, and only for local processes (gateway mode keeps
/// working: see `gateway_captures_forwarded_tcp`).
#[test]
fn dhcp_exception_is_no_udp_channel() {
    let (pod, inet) = pod_and_inet();
    pod.ok(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
    let _up = inet.serve(
        None,
        &[
            "udp/192.0.2.9/67",
            "udp/192.0.2.9/68",
            "udp/2001:db8::9/547",
            "udp/2001:db8::9/546",
        ],
    );
    let udp = |who, sport: u16, addr: &str, port: &str| {
        pod.client_with(who, Some(sport), &["udp", addr, port], 2.0)
    };
    // the world works before init
    assert!(answered(&udp(APP, 68, "192.0.2.9", "67")));

    pod.apply("nameserver 192.0.2.1\n", POD_CONFIG);
    for who in [APP, None] {
        for (sport, addr, port) in [
            (68, "192.0.2.9", "67"),
            (67, "192.0.2.9", "68"),
            (546, "2001:db8::9", "547"),
            (547, "2001:db8::9", "546"),
        ] {
            let got = udp(who, sport, addr, port);
            assert!(
                refused(&got),
                "{who:?} from port {sport} to {addr}:{port}: {got}"
            );
        }
    }

    // A host's DHCP client (root here) may reach the server ports, nothing else.
    let dry = pod.apply(
        "nameserver 192.0.2.1\n",
        &format!("{POD_CONFIG}dhcp_client_uids = [0]\n"),
    );
    assert!(dry.contains("dhcp_client_uids: 0"), "{dry}");
    // (the workload first: once the DHCP client's exchange is tracked, the
    // same addresses and ports count as its reply traffic)
    assert!(refused(&udp(APP, 68, "192.0.2.9", "67")));
    assert!(refused(&udp(APP, 546, "2001:db8::9", "547")));
    assert!(answered(&udp(None, 68, "192.0.2.9", "67")));
    assert!(answered(&udp(None, 546, "2001:db8::9", "547")));
    assert!(refused(&udp(None, 67, "192.0.2.9", "68")));
    assert!(refused(&udp(None, 547, "2001:db8::9", "546")));
}

/// Issue 10.2: an `allow_udp` rule without `cidrs` (the default `{ ports =
/// [53] }`) reaches the resolvers of resolv.conf only, not every address;
/// `cidrs = ["0.0.0.0/0", "::/0"]` opens every address deliberately.
#[test]
fn udp_53_reaches_only_the_resolvers() {
    let (pod, inet) = pod_and_inet();
    let _up = inet.serve(
        None,
        &[
            "udp/192.0.2.1/53",
            "udp/192.0.2.9/53",
            "udp/2001:db8::1/53",
            "udp/2001:db8::9/53",
        ],
    );
    let resolv = "nameserver 192.0.2.1\nnameserver 2001:db8::1\n";
    let dry = pod.apply(resolv, POD_CONFIG);
    assert!(
        dry.contains("192.0.2.1") && dry.contains("2001:db8::1"),
        "{dry}"
    );
    for (resolver, other) in [("192.0.2.1", "192.0.2.9"), ("2001:db8::1", "2001:db8::9")] {
        let got = pod.client(APP, &["udp", resolver, "53"]);
        assert!(answered(&got), "{resolver}: {got}");
        let got = pod.client(APP, &["udp", other, "53"]);
        assert!(refused(&got), "{other}: {got}");
    }

    // any address, written out
    pod.apply(
        resolv,
        &format!(
            "{POD_CONFIG}allow_udp = [{{ ports = [53], cidrs = [\"0.0.0.0/0\", \"::/0\"] }}]\n"
        ),
    );
    for addr in ["192.0.2.9", "2001:db8::9"] {
        let got = pod.client(APP, &["udp", addr, "53"]);
        assert!(answered(&got), "{addr}: {got}");
    }
}

/// Issue 10.2, the local stub: resolv.conf names 127.0.0.53 (systemd-resolved),
/// whose upstreams change with DHCP and VPNs. UDP and TCP 53 pass for the uid
/// that owns the stub's socket (found by `init` on the spot), to any address,
/// and its TCP 53 is not redirected; the workload's UDP 53 goes nowhere but
/// the stub.
#[test]
fn local_stub_resolver_uid_passes_port_53() {
    let (pod, inet) = pod_and_inet();
    const STUB: Who = Some((1500, 1500));
    pod.ok(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
    pod.ip(&["addr", "add", "127.0.0.53/8", "dev", "lo"]);
    let _stub = pod.serve(STUB, &["udp/127.0.0.53/53", "tcp/127.0.0.53/53/stub"]);
    let _up = inet.serve(
        None,
        &[
            "udp/192.0.2.9/53",
            "udp/192.0.2.9/443",
            "udp/2001:db8::9/53",
            "tcp/192.0.2.9/53/upstream",
        ],
    );
    let _proxy = pod.serve(None, &["tcp/127.0.0.1/15001/proxy", "tcp/::1/15001/proxy"]);
    let dry = pod.apply("nameserver 127.0.0.53\n", POD_CONFIG);
    assert!(
        dry.contains("127.0.0.53") && dry.contains("uid 1500"),
        "{dry}"
    );

    // the stub's uid reaches its upstreams on port 53, UDP and TCP
    for addr in ["192.0.2.9", "2001:db8::9"] {
        let got = pod.client(STUB, &["udp", addr, "53"]);
        assert!(answered(&got), "stub to {addr}: {got}");
    }
    assert_answers(&pod, &[(STUB, &["tcp", "192.0.2.9", "53"], "upstream")]);
    // ... and nothing else
    assert!(refused(&pod.client(STUB, &["udp", "192.0.2.9", "443"])));
    // the workload reaches the stub, not the upstream
    assert!(answered(&pod.client(APP, &["udp", "127.0.0.53", "53"])));
    assert!(refused(&pod.client(APP, &["udp", "192.0.2.9", "53"])));
    assert_answers(
        &pod,
        &[(
            APP,
            &["tcp", "192.0.2.9", "53"],
            "proxy ORIGDST 192.0.2.9:53",
        )],
    );
}

/// Issue 12.3: in a pod that Istio's sidecar injection reached, portcullis's
/// defaults collide with Envoy's (uid 1337, ports 15001/15000/15021): `init`
/// refuses in one sentence and installs nothing.
#[test]
fn init_refuses_beside_istio() {
    for (tool, chain) in [
        ("iptables-nft", "ISTIO_OUTPUT"),
        ("iptables-legacy", "ISTIO_INBOUND"),
    ] {
        let ns = Netns::new();
        let resolv = ns.write_file("resolv.conf", "");
        let cfg = ns.write_file("pod.toml", POD_CONFIG);
        // what istio-init leaves in the pod (abridged)
        ns.ok(&[tool, "-w", "-t", "nat", "-N", chain]);
        ns.ok(&[tool, "-w", "-t", "nat", "-N", "ISTIO_REDIRECT"]);
        ns.ok(&[
            tool,
            "-w",
            "-t",
            "nat",
            "-A",
            chain,
            "-p",
            "tcp",
            "-j",
            "ISTIO_REDIRECT",
        ]);
        let out = ns.init(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
        assert_one_sentence(&out, &["Istio", chain, "sidecar.istio.io/inject"]);
        for save in ["iptables-nft-save", "iptables-legacy-save"] {
            let s = ns.ok(&[save]);
            assert!(!s.contains("PORTCULLIS"), "{save}: {s}");
        }
    }
}
