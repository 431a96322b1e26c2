//! `check` and `explain`: the config and the decision, told to an operator.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, Policy, Resolution};
use crate::name::{normalize, Presented};
use crate::net::OrigDst;
use crate::registry::{DetectPlan, FlowFacts, NoResolved, Protocol, Reason, Registry, Upstream};

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
    if listen.is_empty() {
        let _ = writeln!(out, "listen: none (explicit proxy only: no redirect rules)");
    } else {
        let _ = writeln!(out, "listen: {}", listen.join(", "));
    }
    if !cfg.proxy.explicit_listen.is_empty() {
        let l: Vec<String> = cfg
            .proxy
            .explicit_listen
            .iter()
            .map(|a| a.to_string())
            .collect();
        let c: Vec<String> = cfg
            .proxy
            .explicit_clients
            .iter()
            .map(|a| a.to_string())
            .collect();
        let _ = writeln!(
            out,
            "explicit_listen: {} (clients: {})",
            l.join(", "),
            if c.is_empty() {
                "loopback only".to_string()
            } else {
                c.join(", ")
            }
        );
    }
    let _ = writeln!(out, "service entries: {}", cfg.entries.len());
    for e in &cfg.entries {
        let hosts: Vec<String> = e.hosts.iter().map(|h| h.to_string()).collect();
        let ports: Vec<String> = e
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.number, p.protocol.config_name()))
            .collect();
        let mut line = format!(
            "  {} ({}): {} on {}, resolution {}",
            e.name,
            e.origin(&cfg.path),
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
    for line in udp_notes(cfg) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// What `check` says about the UDP that the egress filter lets out
/// (docs/DESIGN.md §5), each line starting with `note:` or `warning:`.
///
/// "Host mode" here means a config that only makes sense on a host: it names
/// DHCP clients (`dhcp_client_uids`) or routes for others
/// (`capture_interfaces`). Pods have neither; a host with static addresses
/// and no gateway role is not recognised, and gets no NTP warning.
pub fn udp_notes(cfg: &Config) -> Vec<String> {
    let r = &cfg.redirect;
    let mut out = Vec::new();
    if !crate::init::render::filter_active(cfg) {
        return out;
    }
    let ports = |p: &[u16]| {
        p.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let to_resolvers: Vec<String> = r
        .allow_udp
        .iter()
        .filter(|u| u.cidrs.is_empty())
        .map(|u| ports(&u.ports))
        .collect();
    if !to_resolvers.is_empty() {
        out.push(format!(
            "note: [redirect] allow_udp without cidrs (ports {}) reaches only the host's resolvers, which `portcullis init` reads from /etc/resolv.conf on the target host when it runs (for a local stub such as 127.0.0.53, the uid owning its socket may use port 53 instead); `init --dry-run` there shows the choice",
            to_resolvers.join("; ")
        ));
    }
    for u in &r.allow_udp {
        let any: Vec<String> = u
            .cidrs
            .iter()
            .filter(|c| c.is_everything())
            .map(|c| c.to_string())
            .collect();
        if !any.is_empty() {
            out.push(format!(
                "warning: [redirect] allow_udp ports {} to {}: every process may send UDP on these ports to any address, a channel out of the allow-list; name the servers' CIDRs instead",
                ports(&u.ports),
                any.join(", ")
            ));
        }
    }
    let host_mode = !r.dhcp_client_uids.is_empty() || !r.capture_interfaces.is_empty();
    if host_mode && !r.allow_udp.iter().any(|u| u.ports.contains(&123)) {
        out.push(
            "warning: [redirect] allow_udp does not let UDP 123 (NTP) out: on a host the clock drifts (systemd-timesyncd and chronyd send as non-root users); add { ports = [123], cidrs = [your time servers] }".into(),
        );
    }
    out
}

/// What `explain` prints: the decision, the reason, the entry and its line.
pub fn explain(cfg: Arc<Config>, dst: SocketAddr, sni: Option<&str>, host: Option<&str>) -> String {
    let reg = Registry::new(cfg.clone());
    let dst = OrigDst::new(dst);
    let mut out = String::new();
    let (protocol, raw) = match (sni, host) {
        (Some(s), _) => (Protocol::Tls, Some(s)),
        (_, Some(h)) => (Protocol::Http, Some(h)),
        _ => (Protocol::Tcp, None),
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
        protocol.log_name(),
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
            let _ = writeln!(out, "entry: {} ({}:{})", e.name, e.source.display(), e.line);
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
        .map(|(e, p)| {
            format!(
                "{} ({} {})",
                e.name,
                p.protocol.config_name(),
                e.origin(&cfg.path)
            )
        })
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
                    .is_some_and(|p| p.protocol == Protocol::Tcp)
        }) {
            let hosts: Vec<String> = e.hosts.iter().map(|h| h.to_string()).collect();
            let _ = writeln!(
                out,
                "note: TCP entry {} ({}) admits this flow at once if {} is among what {} resolves to (explain never resolves)",
                e.name,
                e.origin(&cfg.path),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn notes(src: &str) -> Vec<String> {
        udp_notes(&Config::parse(Path::new("t.toml"), src).expect("valid"))
    }

    #[test]
    fn udp_notes_say_who_decides_and_warn() {
        // the default: the resolvers, decided on the target host
        let n = notes("");
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].starts_with(
            "note: [redirect] allow_udp without cidrs (ports 53) reaches only the host's resolvers"
        ));
        assert!(n[0].contains("on the target host"));
        // any address is a warning
        let n = notes(
            "[redirect]\nallow_udp = [{ ports = [53], cidrs = [\"0.0.0.0/0\", \"::/0\"] }]\n",
        );
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].starts_with("warning: [redirect] allow_udp ports 53 to 0.0.0.0/0, ::/0: "));
        // host mode without NTP
        let n = notes("[redirect]\ndhcp_client_uids = [0]\n");
        assert!(n.iter().any(|l| l.contains("UDP 123 (NTP)")), "{n:?}");
        let n = notes("[redirect]\ndhcp_client_uids = [0]\nallow_udp = [{ ports = [53] }, { ports = [123], cidrs = [\"192.0.2.123\"] }]\n");
        assert!(!n.iter().any(|l| l.contains("NTP")), "{n:?}");
        // a pod is not warned about NTP; no filter, nothing to say
        assert!(!notes("").iter().any(|l| l.contains("NTP")));
        assert!(notes(
            "outbound_traffic_policy = \"ALLOW_ANY\"\n[redirect]\ndhcp_client_uids = [0]\n"
        )
        .is_empty());
    }
}
