//! Table-driven cases for every matching rule of docs/DESIGN.md §3 steps 1-3 and 5-8.

use std::path::Path;
use std::sync::Arc;

use portcullis::config::Config;
use portcullis::net::OrigDst;
use portcullis::registry::{
    Decision, DetectPlan, FlowFacts, NoResolved, Protocol, Reason, Registry, Upstream,
};

const REGISTRY: &str = r#"
[[service_entry]]
name = "exact-api"
hosts = ["api.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }]

[[service_entry]]
name = "wild-example"
hosts = ["*.example.com"]
ports = [{ number = 443, protocol = "TLS" }]

[[service_entry]]
name = "wild-deep"
hosts = ["*.eu.example.com"]
ports = [{ number = 443, protocol = "TLS" }]

[[service_entry]]
name = "apex-only"
hosts = ["example.org"]
ports = [{ number = 443, protocol = "TLS" }]

[[service_entry]]
name = "pinned"
hosts = ["pinned.example.net"]
addresses = ["192.0.2.0/24", "2001:db8::/32"]
ports = [{ number = 443, protocol = "TLS" }]
resolution = "NONE"

[[service_entry]]
name = "pinned-second"
hosts = ["pinned.example.net"]
addresses = ["203.0.113.0/24"]
ports = [{ number = 443, protocol = "TLS" }]
resolution = "NONE"

[[service_entry]]
name = "tie-first"
hosts = ["tie.example.io"]
ports = [{ number = 8443, protocol = "TLS" }]

[[service_entry]]
name = "tie-second"
hosts = ["tie.example.io"]
ports = [{ number = 8443, protocol = "TLS" }]

[[service_entry]]
name = "db"
addresses = ["198.51.100.7", "2001:db8:5::/48"]
ports = [{ number = 5432, protocol = "TCP" }]

[[service_entry]]
name = "db-wide"
addresses = ["198.51.100.0/24"]
ports = [{ number = 5432, protocol = "TCP" }]

[[service_entry]]
name = "static"
hosts = ["legacy.example.org"]
ports = [{ number = 443, protocol = "TLS" }]
resolution = "STATIC"
endpoints = [{ address = "203.0.113.5", port = 8443 }, { address = "2001:db8::5" }]

[[service_entry]]
name = "http-only"
hosts = ["plain.example.com"]
ports = [{ number = 8080, protocol = "HTTP" }]
"#;

fn registry(extra: &str) -> Registry {
    let src = format!("{extra}\n{REGISTRY}");
    Registry::new(Arc::new(Config::parse(Path::new("t.toml"), &src).unwrap()))
}

struct Case {
    dst: &'static str,
    proto: Protocol,
    name: Option<&'static str>,
    want: Decision,
    entry: Option<&'static str>,
    reason: Option<Reason>,
}

fn c(
    dst: &'static str,
    proto: Protocol,
    name: Option<&'static str>,
    want: Decision,
    entry: Option<&'static str>,
    reason: Option<Reason>,
) -> Case {
    Case {
        dst,
        proto,
        name,
        want,
        entry,
        reason,
    }
}

/// A case the registry allows through entry `entry`, with no reason.
fn allow(
    dst: &'static str,
    proto: Protocol,
    name: Option<&'static str>,
    entry: &'static str,
) -> Case {
    c(dst, proto, name, Decision::Allow, Some(entry), None)
}

/// A case the registry denies for `reason`, with no entry.
fn deny(dst: &'static str, proto: Protocol, name: Option<&'static str>, reason: Reason) -> Case {
    c(dst, proto, name, Decision::Deny, None, Some(reason))
}

fn run(reg: &Registry, cases: &[Case]) {
    assert!(!cases.is_empty());
    for (n, k) in cases.iter().enumerate() {
        let dst = OrigDst::new(k.dst.parse().unwrap());
        let v = reg.decide(
            &FlowFacts {
                dst,
                protocol: k.proto,
                name: k.name,
                detect_failure: None,
            },
            &NoResolved,
        );
        let entry = v.entry.map(|i| reg.entry(i).name.as_str());
        assert_eq!(
            (v.decision, entry, v.reason),
            (k.want, k.entry, k.reason),
            "case {n}: {} {:?} {:?}",
            k.dst,
            k.proto,
            k.name
        );
        assert_eq!(
            v.upstream.is_none(),
            v.decision == Decision::Deny,
            "case {n}"
        );
    }
}

use Decision::*;
use Protocol::*;

#[test]
fn host_matching_rules() {
    let reg = registry("");
    run(
        &reg,
        &[
            // exact
            allow("192.0.2.10:443", Tls, Some("api.example.com"), "exact-api"),
            // exact beats wildcard though the wildcard entry is earlier? (exact is earlier here, and also more specific)
            allow(
                "192.0.2.10:443",
                Tls,
                Some("www.example.com"),
                "wild-example",
            ),
            // wildcard depth: one or more labels
            allow(
                "192.0.2.10:443",
                Tls,
                Some("a.b.c.example.com"),
                "wild-example",
            ),
            // longest wildcard wins over an earlier shorter one
            allow("192.0.2.10:443", Tls, Some("x.eu.example.com"), "wild-deep"),
            allow(
                "192.0.2.10:443",
                Tls,
                Some("eu.example.com"),
                "wild-example",
            ),
            // *.example.com never matches example.com itself, nor xexample.com
            deny(
                "192.0.2.10:443",
                Tls,
                Some("example.com"),
                Reason::NotInRegistry,
            ),
            deny(
                "192.0.2.10:443",
                Tls,
                Some("xexample.com"),
                Reason::NotInRegistry,
            ),
            // an exact apex entry does not cover subdomains
            deny(
                "192.0.2.10:443",
                Tls,
                Some("www.example.org"),
                Reason::NotInRegistry,
            ),
            allow("192.0.2.10:443", Tls, Some("example.org"), "apex-only"),
            // protocol mismatch: an HTTP flow on a TLS-only port, a TLS flow on an HTTP port
            deny(
                "192.0.2.10:443",
                Http,
                Some("api.example.com"),
                Reason::NotInRegistry,
            ),
            allow("192.0.2.10:80", Http, Some("api.example.com"), "exact-api"),
            deny(
                "192.0.2.10:80",
                Tls,
                Some("api.example.com"),
                Reason::NotInRegistry,
            ),
            allow(
                "192.0.2.10:8080",
                Http,
                Some("plain.example.com"),
                "http-only",
            ),
            // a name on the wrong port
            deny(
                "192.0.2.10:8443",
                Tls,
                Some("api.example.com"),
                Reason::NotInRegistry,
            ),
            // no name (opaque, IP literal, TLS without SNI)
            deny("192.0.2.10:443", Tls, None, Reason::NotInRegistry),
            deny("192.0.2.10:443", Tcp, None, Reason::NotInRegistry),
            // ties go to the earlier entry
            allow("192.0.2.10:8443", Tls, Some("tie.example.io"), "tie-first"),
            // unknown port
            deny(
                "192.0.2.10:9999",
                Tls,
                Some("api.example.com"),
                Reason::NotInRegistry,
            ),
        ],
    );
}

#[test]
fn address_constraints_v4_v6_and_mapped() {
    let reg = registry("");
    run(
        &reg,
        &[
            allow("192.0.2.77:443", Tls, Some("pinned.example.net"), "pinned"),
            allow(
                "[2001:db8::77]:443",
                Tls,
                Some("pinned.example.net"),
                "pinned",
            ),
            // IPv4-mapped IPv6 is IPv4
            allow(
                "[::ffff:192.0.2.77]:443",
                Tls,
                Some("pinned.example.net"),
                "pinned",
            ),
            // the first entry's addresses refuse; a later entry with the same host admits
            allow(
                "203.0.113.9:443",
                Tls,
                Some("pinned.example.net"),
                "pinned-second",
            ),
            // hosts matched but no entry admits D.ip
            deny(
                "198.51.100.1:443",
                Tls,
                Some("pinned.example.net"),
                Reason::AddressMismatch,
            ),
            deny(
                "[2001:db9::1]:443",
                Tls,
                Some("pinned.example.net"),
                Reason::AddressMismatch,
            ),
        ],
    );
}

#[test]
fn tcp_entries_by_address() {
    let reg = registry("");
    run(
        &reg,
        &[
            allow("198.51.100.7:5432", Tcp, None, "db"),
            allow("[::ffff:198.51.100.7]:5432", Tcp, None, "db"),
            allow("198.51.100.8:5432", Tcp, None, "db-wide"),
            allow("[2001:db8:5::9]:5432", Tcp, None, "db"),
            deny("[2001:db8:6::9]:5432", Tcp, None, Reason::NotInRegistry),
            deny("192.0.2.1:5432", Tcp, None, Reason::NotInRegistry),
            // a TCP entry matches whatever the client sends on its port
            allow("198.51.100.7:5432", Tls, Some("anything.example"), "db"),
        ],
    );
    // decided by address, before any detection
    let v = reg
        .decide_by_address(
            OrigDst::new("198.51.100.7:5432".parse().unwrap()),
            &NoResolved,
        )
        .unwrap();
    assert_eq!(
        v.upstream,
        Some(Upstream::Original("198.51.100.7:5432".parse().unwrap()))
    );
    assert!(reg
        .decide_by_address(OrigDst::new("192.0.2.10:443".parse().unwrap()), &NoResolved)
        .is_none());
}

#[test]
fn dns_resolved_tcp_entries() {
    let reg = Registry::new(Arc::new(
        Config::parse(
            Path::new("t.toml"),
            "[[service_entry]]\nhosts = [\"smtp.example.net\"]\nports = [{ number = 587, protocol = \"TCP\" }]\nresolution = \"DNS\"\n",
        )
        .unwrap(),
    ));
    let mut resolved = std::collections::HashMap::new();
    resolved.insert(0usize, vec!["192.0.2.25".parse().unwrap()]);
    let dst = OrigDst::new("192.0.2.25:587".parse().unwrap());
    let v = reg.decide_by_address(dst, &resolved).unwrap();
    assert_eq!(v.decision, Allow);
    assert_eq!(
        reg.dns_tcp_entries(),
        vec![(0, vec!["smtp.example.net".to_string()])]
    );
    let other = OrigDst::new("192.0.2.26:587".parse().unwrap());
    assert!(reg.decide_by_address(other, &resolved).is_none());
}

#[test]
fn upstream_plans() {
    let reg = registry("");
    let dst = OrigDst::new("192.0.2.10:443".parse().unwrap());
    let facts = |name| FlowFacts {
        dst,
        protocol: Tls,
        name: Some(name),
        detect_failure: None,
    };
    assert_eq!(
        reg.decide(&facts("a.example.com"), &NoResolved).upstream,
        Some(Upstream::Resolve {
            name: "a.example.com".into(),
            port: 443,
            dst: dst.0
        })
    );
    assert_eq!(
        reg.decide(&facts("legacy.example.org"), &NoResolved)
            .upstream,
        Some(Upstream::Static(vec![
            "203.0.113.5:8443".parse().unwrap(),
            "[2001:db8::5]:443".parse().unwrap()
        ]))
    );
    let pinned = OrigDst::new("192.0.2.99:443".parse().unwrap());
    let v = reg.decide(
        &FlowFacts {
            dst: pinned,
            protocol: Tls,
            name: Some("pinned.example.net"),
            detect_failure: None,
        },
        &NoResolved,
    );
    assert_eq!(v.upstream, Some(Upstream::Original(pinned.0)));
}

#[test]
fn policies_audit_and_failures() {
    let dst = OrigDst::new("192.0.2.10:443".parse().unwrap());
    let unknown = FlowFacts {
        dst,
        protocol: Tls,
        name: Some("evil.example.net"),
        detect_failure: None,
    };
    let malformed = FlowFacts {
        dst,
        protocol: Tls,
        name: None,
        detect_failure: Some(Reason::Malformed),
    };
    let known_but_malformed = FlowFacts {
        dst,
        protocol: Tls,
        name: Some("api.example.com"),
        detect_failure: Some(Reason::TooLarge),
    };

    let strict = registry("");
    assert_eq!(strict.decide(&unknown, &NoResolved).decision, Deny);
    assert_eq!(
        strict.decide(&malformed, &NoResolved).reason,
        Some(Reason::Malformed)
    );
    assert_eq!(
        strict.decide(&known_but_malformed, &NoResolved).reason,
        Some(Reason::TooLarge)
    );
    assert_eq!(strict.detect_plan(dst), DetectPlan::Hello);
    assert_eq!(strict.dns_failed(dst).decision, Deny);
    assert_eq!(strict.dns_failed(dst).reason, Some(Reason::Dns));

    let audit = registry("audit = true");
    let v = audit.decide(&unknown, &NoResolved);
    assert_eq!((v.decision, v.reason), (Audit, Some(Reason::NotInRegistry)));
    assert_eq!(v.upstream, Some(Upstream::Original(dst.0)));
    assert_eq!(audit.decide(&malformed, &NoResolved).decision, Audit);
    assert_eq!(audit.detect_plan(dst), DetectPlan::FirstByte);
    assert_eq!(audit.entry_label(&v), "Passthrough");
    // a match is still an allow in audit mode
    let known = FlowFacts {
        dst,
        protocol: Tls,
        name: Some("api.example.com"),
        detect_failure: None,
    };
    assert_eq!(audit.decide(&known, &NoResolved).decision, Allow);

    let any = registry("outbound_traffic_policy = \"ALLOW_ANY\"");
    let v = any.decide(&unknown, &NoResolved);
    assert_eq!(
        (v.decision, v.reason),
        (Passthrough, Some(Reason::NotInRegistry))
    );
    assert_eq!(any.decide(&known, &NoResolved).decision, Allow);
    assert_eq!(any.detect_plan(dst), DetectPlan::FirstByte);
    assert_eq!(
        any.detect_plan(OrigDst::new("192.0.2.10:22".parse().unwrap())),
        DetectPlan::ConnectFirst
    );
    assert_eq!(any.dns_failed(dst).decision, Passthrough);

    // loops are never audited or passed through
    for reg in [&strict, &audit, &any] {
        assert_eq!(reg.refuse(Reason::Loop, dst).decision, Deny);
        assert_eq!(reg.entry_label(&Registry::loop_verdict()), "BlackHole");
    }
}

#[test]
fn thousands_of_entries_match_by_index() {
    let mut src = String::new();
    for i in 0..5000 {
        src.push_str(&format!(
            "[[service_entry]]\nhosts = [\"svc{i}.example.com\", \"*.w{i}.example.net\"]\nports = [{{ number = 443, protocol = \"TLS\" }}]\n"
        ));
    }
    let reg = Registry::new(Arc::new(
        Config::parse(Path::new("big.toml"), &src).unwrap(),
    ));
    let dst = OrigDst::new("192.0.2.10:443".parse().unwrap());
    for (name, want) in [
        ("svc4999.example.com", "svc4999.example.com"),
        ("a.b.w17.example.net", "svc17.example.com"),
    ] {
        let v = reg.decide(
            &FlowFacts {
                dst,
                protocol: Tls,
                name: Some(name),
                detect_failure: None,
            },
            &NoResolved,
        );
        assert_eq!(reg.entry(v.entry.unwrap()).name, want);
    }
}
