//! `check` and `explain`: the config and the decision, told to an operator.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, Policy, PortProtocol, Resolution};
use crate::name::{normalize, Presented};
use crate::net::OrigDst;
use crate::registry::{
    DetectPlan, FlowFacts, FlowProtocol, NoResolved, Reason, Registry, Upstream,
};

/// The summary `check` prints for a valid file.
pub fn summary(cfg: &Config) -> String {
    let mut out = String::new();
    let policy = match cfg.outbound_traffic_policy {
        Policy::RegistryOnly => "REGISTRY_ONLY",
        Policy::AllowAny => "ALLOW_ANY",
    };
    let _ = writeln!(out, "{}: valid", cfg.path.display());
    let _ = writeln!(
        out,
        "policy: {policy}{}",
        if cfg.audit_mode() {
            " (audit: denials are logged, not enforced)"
        } else {
            ""
        }
    );
    let listen: Vec<String> = cfg.proxy.listen.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "listen: {}", listen.join(", "));
    let _ = writeln!(out, "service entries: {}", cfg.entries.len());
    for e in &cfg.entries {
        let hosts: Vec<String> = e.hosts.iter().map(|h| h.to_string()).collect();
        let ports: Vec<String> = e
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.number, p.protocol.as_str()))
            .collect();
        let mut line = format!(
            "  {} (line {}): {} on {}, resolution {}",
            e.name,
            e.line,
            if hosts.is_empty() {
                "-".to_string()
            } else {
                hosts.join(", ")
            },
            ports.join(", "),
            resolution_str(&e.resolution)
        );
        if !e.addresses.is_empty() {
            let a: Vec<String> = e.addresses.iter().map(|c| c.to_string()).collect();
            let _ = write!(line, ", addresses {}", a.join(", "));
        }
        let _ = writeln!(out, "{line}");
    }
    for w in &cfg.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// What `explain` prints: the decision, the reason, the entry and its line.
pub fn explain(cfg: Arc<Config>, dst: SocketAddr, sni: Option<&str>, host: Option<&str>) -> String {
    let reg = Registry::new(cfg.clone());
    let dst = OrigDst::new(dst);
    let mut out = String::new();
    let (protocol, raw) = match (sni, host) {
        (Some(s), _) => (FlowProtocol::Tls, Some(s)),
        (_, Some(h)) => (FlowProtocol::Http, Some(h)),
        _ => (FlowProtocol::Tcp, None),
    };
    let presented = raw.map(normalize);
    let (name, failure) = match &presented {
        Some(Presented::Name(n)) => (Some(n.as_str()), None),
        Some(Presented::Invalid) => (None, Some(Reason::Malformed)),
        _ => (None, None),
    };
    let verdict = match reg.decide_by_address(dst, &NoResolved) {
        Some(v) => v,
        None => reg.decide(
            &FlowFacts {
                dst,
                protocol,
                name,
                detect_failure: failure,
            },
            &NoResolved,
        ),
    };
    let _ = writeln!(
        out,
        "flow: {} to {}{}",
        protocol.as_str(),
        dst.0,
        match raw {
            Some(r) => format!(" presenting {r:?}"),
            None => String::new(),
        }
    );
    if matches!(presented, Some(Presented::IpLiteral)) {
        let _ = writeln!(
            out,
            "name: none (an IP literal is no name and matches no host)"
        );
    }
    let _ = writeln!(out, "decision: {}", verdict.decision.as_str());
    let _ = writeln!(
        out,
        "reason: {}",
        verdict.reason.map(|r| r.as_str()).unwrap_or("matched")
    );
    match verdict.entry {
        Some(i) => {
            let e = reg.entry(i);
            let _ = writeln!(out, "entry: {} ({}:{})", e.name, cfg.path.display(), e.line);
        }
        None => {
            let _ = writeln!(out, "entry: none ({})", reg.entry_label(&verdict));
        }
    }
    match &verdict.upstream {
        None => {
            let _ = writeln!(
                out,
                "upstream: none (denied: no upstream connection is opened)"
            );
        }
        Some(Upstream::Original(a)) => {
            let _ = writeln!(out, "upstream: {a} (the original destination)");
        }
        Some(Upstream::Static(v)) => {
            let l: Vec<String> = v.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                out,
                "upstream: {} (STATIC endpoints, in turn)",
                l.join(", ")
            );
        }
        Some(Upstream::Resolve { name, port, dst }) => {
            let _ = writeln!(
                out,
                "upstream: would resolve {name} (A and AAAA; explain never resolves) and connect to {dst} if it is among the answers, else to the answers on port {port} in turn"
            );
        }
    }
    if raw.is_none() && verdict.entry.is_none() {
        let plan = reg.detect_plan(dst);
        let note = match plan {
            DetectPlan::Hello => format!(
                "note: without --sni or --host this is an opaque flow; a client sending nothing within hello_timeout ({}) is denied with reason timeout",
                crate::config::format_duration(cfg.proxy.hello_timeout)
            ),
            DetectPlan::FirstByte => format!(
                "note: the proxy waits up to first_byte_timeout ({}) for the client's first bytes, then treats the flow as opaque",
                crate::config::format_duration(cfg.proxy.first_byte_timeout)
            ),
            DetectPlan::ConnectFirst => "note: ALLOW_ANY on a port without TLS/HTTP entries: the proxy connects at once and relays the server's bytes immediately".to_string(),
        };
        let _ = writeln!(out, "{note}");
    }
    let candidates: Vec<String> = cfg
        .entries
        .iter()
        .filter_map(|e| e.port(dst.port()).map(|p| (e, p)))
        .map(|(e, p)| format!("{} ({} line {})", e.name, p.protocol.as_str(), e.line))
        .collect();
    if verdict.entry.is_none() {
        if candidates.is_empty() {
            let _ = writeln!(out, "candidates: no entry has port {}", dst.port());
        } else {
            let _ = writeln!(
                out,
                "candidates on port {}: {}",
                dst.port(),
                candidates.join(", ")
            );
        }
    }
    if verdict.entry.is_none() {
        for e in cfg.entries.iter().filter(|e| {
            e.resolution == Resolution::Dns
                && e.addresses.is_empty()
                && e.port(dst.port())
                    .is_some_and(|p| p.protocol == PortProtocol::Tcp)
        }) {
            let hosts: Vec<String> = e.hosts.iter().map(|h| h.to_string()).collect();
            let _ = writeln!(
                out,
                "note: TCP entry {} (line {}) admits this flow at once if {} is among what {} resolves to (explain never resolves)",
                e.name,
                e.line,
                dst.ip(),
                hosts.join(", ")
            );
        }
    }
    out
}

/// The resolution as the config file spells it.
fn resolution_str(r: &crate::config::Resolution) -> &'static str {
    match r {
        crate::config::Resolution::Dns => "DNS",
        crate::config::Resolution::None => "NONE",
        crate::config::Resolution::Static => "STATIC",
    }
}
