//! Observability stage, served: the `health` listener (`/ready`, `/metrics`
//! for kubelet probes and Prometheus) and the local `admin` listener (also
//! `/config` and `/denied`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use crate::access_log::{timestamp, FlowRecord};
use crate::config::Config;
use crate::proxy::Shared;

/// Most denied/audit records kept for `/denied`.
const DENIED_MAX: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum DeniedKey {
    Name {
        name: String,
        port: u16,
        protocol: &'static str,
    },
    Addr {
        ip: std::net::IpAddr,
        port: u16,
        protocol: &'static str,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct DeniedRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
    pub port: u16,
    pub protocol: &'static str,
    pub decision: &'static str,
    pub reason: Option<&'static str>,
    pub count: u64,
    pub last_seen: String,
    #[serde(skip)]
    seen: u64,
}

/// The recent denied and audit flows, bounded; the oldest is evicted.
#[derive(Default)]
pub struct Denied {
    inner: Mutex<(HashMap<DeniedKey, DeniedRecord>, u64)>,
}

impl Denied {
    /// Records a flow if it was denied or audited (loops and overload are
    /// the proxy's own business, not the registry's).
    pub fn record(&self, rec: &FlowRecord) {
        if !matches!(rec.decision, "deny" | "audit")
            || matches!(rec.reason, Some("loop") | Some("overload"))
        {
            return;
        }
        let Some(dst) = rec.dst else { return };
        let key = match &rec.name {
            Some(n) => DeniedKey::Name {
                name: n.clone(),
                port: dst.port(),
                protocol: rec.protocol,
            },
            None => DeniedKey::Addr {
                ip: dst.ip(),
                port: dst.port(),
                protocol: rec.protocol,
            },
        };
        let Ok(mut g) = self.inner.lock() else { return };
        let (map, clock) = &mut *g;
        *clock += 1;
        let seen = *clock;
        if !map.contains_key(&key) && map.len() >= DENIED_MAX {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, r)| r.seen)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let e = map.entry(key).or_insert_with(|| DeniedRecord {
            name: rec.name.clone(),
            ip: if rec.name.is_none() {
                Some(dst.ip())
            } else {
                None
            },
            port: dst.port(),
            protocol: rec.protocol,
            decision: rec.decision,
            reason: rec.reason,
            count: 0,
            last_seen: String::new(),
            seen,
        });
        e.count += 1;
        e.seen = seen;
        e.decision = rec.decision;
        e.reason = rec.reason;
        e.last_seen = timestamp(SystemTime::now());
    }

    pub fn snapshot(&self) -> Vec<DeniedRecord> {
        let mut v: Vec<DeniedRecord> = match self.inner.lock() {
            Ok(g) => g.0.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by_key(|r| std::cmp::Reverse(r.seen));
        v
    }
}

/// `/denied?format=toml`: `[[service_entry]]` blocks ready to paste: one
/// block per name covering all its ports (a name's ports may mix TLS and
/// HTTP), nameless flows as TCP entries by address (one block per IP, all
/// its ports). Flows the registry admits now (an entry lists the name, or a
/// pattern matching it, on that port and protocol; or a TCP entry holds the
/// IP and port) are skipped, as are names the registry pins to other
/// addresses (`address_mismatch`: widening a pin is a decision, not a
/// paste). Entry names are unique, also against the registry.
pub fn denied_toml(records: &[DeniedRecord], cfg: &Config) -> String {
    use crate::config::PortProtocol;
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    let mut out = String::from(
        "# Flows portcullis denied (or, in audit mode, let through) recently, as\n\
         # service entries. Audit output lists whatever the workload contacted:\n\
         # review every entry before pasting it into the registry.\n",
    );
    let name_covered = |name: &str, port: u16, proto: PortProtocol| {
        cfg.entries.iter().any(|e| {
            e.hosts.iter().any(|h| h.matches(name))
                && e.port(port).is_some_and(|p| p.protocol == proto)
        })
    };
    let addr_covered = |ip: std::net::IpAddr, port: u16| {
        cfg.entries.iter().any(|e| {
            !e.addresses.is_empty()
                && e.addresses.iter().any(|c| c.contains(ip))
                && e.port(port)
                    .is_some_and(|p| p.protocol == PortProtocol::Tcp)
        })
    };
    struct Seen {
        proto: PortProtocol,
        count: u64,
        reasons: BTreeSet<&'static str>,
        conflict: Option<PortProtocol>,
    }
    let mut by_name: BTreeMap<&str, BTreeMap<u16, Seen>> = BTreeMap::new();
    let mut by_addr: BTreeMap<std::net::IpAddr, BTreeMap<u16, (u64, BTreeSet<&'static str>)>> =
        BTreeMap::new();
    for r in records {
        match (&r.name, r.ip) {
            (Some(n), _) => {
                let proto = match r.protocol {
                    "tls" => PortProtocol::Tls,
                    "http" => PortProtocol::Http,
                    _ => PortProtocol::Tcp,
                };
                if name_covered(n, r.port, proto) {
                    continue;
                }
                let seen = by_name
                    .entry(n.as_str())
                    .or_default()
                    .entry(r.port)
                    .or_insert(Seen {
                        proto,
                        count: 0,
                        reasons: BTreeSet::new(),
                        conflict: None,
                    });
                seen.count += r.count;
                seen.reasons.extend(r.reason);
                if seen.proto != proto {
                    seen.conflict = Some(proto);
                }
            }
            (None, Some(ip)) => {
                if addr_covered(ip, r.port) {
                    continue;
                }
                let e = by_addr.entry(ip).or_default().entry(r.port).or_default();
                e.0 += r.count;
                e.1.extend(r.reason);
            }
            _ => {}
        }
    }
    let mut taken: HashSet<String> = cfg.entries.iter().map(|e| e.name.clone()).collect();
    let mut unique = |base: String| {
        let mut candidate = base.clone();
        let mut i = 2;
        while taken.contains(&candidate) {
            candidate = format!("{base}-{i}");
            i += 1;
        }
        taken.insert(candidate.clone());
        candidate
    };
    let reasons = |r: &BTreeSet<&str>| r.iter().copied().collect::<Vec<_>>().join(",");
    for (name, ports) in by_name {
        let _ = writeln!(out, "\n[[service_entry]]");
        for (port, seen) in &ports {
            let _ = writeln!(
                out,
                "# seen: {port}/{} x{} ({})",
                seen.proto.as_str(),
                seen.count,
                reasons(&seen.reasons)
            );
            if let Some(other) = seen.conflict {
                let _ = writeln!(
                    out,
                    "# note: {name}:{port} was also seen as {}; one port has one protocol",
                    other.as_str()
                );
            }
        }
        let _ = writeln!(out, "name = \"{}\"", unique(name.to_string()));
        let _ = writeln!(out, "hosts = [\"{name}\"]");
        let ps: Vec<String> = ports
            .iter()
            .map(|(p, seen)| format!("{{ number = {p}, protocol = \"{}\" }}", seen.proto.as_str()))
            .collect();
        let _ = writeln!(out, "ports = [{}]", ps.join(", "));
        // TCP ports of a named entry need the name resolved ahead.
        let _ = writeln!(out, "resolution = \"DNS\"");
    }
    for (ip, ports) in by_addr {
        let cidr = crate::net::Cidr::host(ip);
        let _ = writeln!(out, "\n[[service_entry]]");
        for (port, (count, why)) in &ports {
            let _ = writeln!(
                out,
                "# seen: {port} without a name x{count} ({})",
                reasons(why)
            );
        }
        let _ = writeln!(out, "name = \"{}\"", unique(format!("tcp-{ip}")));
        let _ = writeln!(out, "addresses = [\"{cidr}\"]");
        let ps: Vec<String> = ports
            .keys()
            .map(|p| format!("{{ number = {p}, protocol = \"TCP\" }}"))
            .collect();
        let _ = writeln!(out, "ports = [{}]", ps.join(", "));
    }
    out
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    if s.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if s.draining.load(std::sync::atomic::Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn config(State(s): State<Arc<Shared>>) -> Response {
    let gen = s.generation();
    let status = s.reload_status();
    // The config in force (restart-required keys at their running values),
    // and what the last reload said: "restart required" keys, "re-run init".
    let body = serde_json::json!({
        "config": gen.config(),
        "reload": status,
        "restart_required": status.restart_required,
        "rerun_init": status.rerun_init,
        "draining": s.draining.load(std::sync::atomic::Ordering::Acquire),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )
        .into_response()
}

async fn denied(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let records = s.denied.snapshot();
    if q.get("format").map(String::as_str) == Some("toml") {
        let gen = s.generation();
        return (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            denied_toml(&records, gen.config()),
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&records).unwrap_or_default(),
    )
        .into_response()
}

/// Binds and serves `health` and `admin` (each may be "off").
pub async fn spawn(shared: Arc<Shared>, cfg: &Config) -> std::io::Result<()> {
    if let Some(addr) = cfg.proxy.health {
        let app = Router::new()
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(shared.clone());
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on health {addr}: {e}"))
        })?;
        tracing::info!(%addr, "health endpoint");
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    if let Some(addr) = cfg.proxy.admin {
        let app = Router::new()
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/config", get(config))
            .route("/denied", get(denied))
            .with_state(shared.clone());
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on admin {addr}: {e}"))
        })?;
        tracing::info!(%addr, "admin endpoint");
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn rec(name: Option<&str>, ip: &str, port: u16, protocol: &'static str) -> FlowRecord {
        FlowRecord {
            ts: String::new(),
            client: "192.0.2.2:40000".parse().unwrap(),
            dst: Some(std::net::SocketAddr::new(ip.parse().unwrap(), port)),
            upstream: None,
            protocol,
            name: name.map(str::to_string),
            decision: "audit",
            entry: None,
            reason: Some("not_in_registry"),
            ech: false,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            error: None,
            reset_by: None,
        }
    }

    const BASE: &str = "[redirect]\nproxy_uid = 1337\n\n[[service_entry]]\nname = \"www.example.org\"\nhosts = [\"*.files.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n";

    #[test]
    fn denied_toml_round_trips_into_a_valid_config() {
        let cfg = Config::parse(Path::new("t.toml"), BASE).unwrap();
        let d = Denied::default();
        for r in [
            rec(Some("www.example.org"), "203.0.113.5", 443, "tls"),
            rec(Some("www.example.org"), "203.0.113.5", 80, "http"),
            rec(Some("www.example.org"), "203.0.113.5", 8443, "tls"),
            rec(Some("www.example.org"), "203.0.113.5", 443, "tls"),
            rec(Some("a.files.example.com"), "192.0.2.11", 443, "tls"),
            rec(Some("a.files.example.com"), "192.0.2.11", 80, "http"),
            rec(None, "192.0.2.10", 7000, "tcp"),
            rec(None, "192.0.2.10", 443, "tls"),
            rec(None, "2001:db8::10", 7000, "tcp"),
        ] {
            d.record(&r);
        }
        let mut loop_rec = rec(None, "192.0.2.99", 1, "tcp");
        loop_rec.decision = "deny";
        loop_rec.reason = Some("loop");
        d.record(&loop_rec);
        let toml = denied_toml(&d.snapshot(), &cfg);
        assert!(toml.contains("review every entry"), "{toml}");
        // one block per name, all its ports; the registry's name is taken
        assert_eq!(
            toml.matches("hosts = [\"www.example.org\"]").count(),
            1,
            "{toml}"
        );
        assert!(toml.contains("name = \"www.example.org-2\""), "{toml}");
        assert!(toml.contains("ports = [{ number = 80, protocol = \"HTTP\" }, { number = 443, protocol = \"TLS\" }, { number = 8443, protocol = \"TLS\" }]"), "{toml}");
        assert!(
            toml.contains("# seen: 443/TLS x2 (not_in_registry)"),
            "{toml}"
        );
        // covered by the wildcard on 443, not on 80
        assert!(
            toml.contains(
                "hosts = [\"a.files.example.com\"]\nports = [{ number = 80, protocol = \"HTTP\" }]"
            ),
            "{toml}"
        );
        // nameless: by address, all ports of one IP in one block
        assert!(toml.contains("addresses = [\"192.0.2.10/32\"]\nports = [{ number = 443, protocol = \"TCP\" }, { number = 7000, protocol = \"TCP\" }]"), "{toml}");
        assert!(
            toml.contains("addresses = [\"2001:db8::10/128\"]"),
            "{toml}"
        );
        assert!(
            !toml.contains("192.0.2.99"),
            "loops are not the registry's business: {toml}"
        );

        let pasted = Config::parse(Path::new("t.toml"), &format!("{BASE}\n{toml}"))
            .unwrap_or_else(|e| panic!("{e}\n{BASE}\n{toml}"));
        assert_eq!(pasted.entries.len(), 1 + 4, "{toml}");
        // pasted again: everything is covered now, nothing new to suggest
        let again = denied_toml(&d.snapshot(), &pasted);
        assert!(!again.contains("[[service_entry]]"), "{again}");
    }

    #[test]
    fn denied_is_bounded() {
        let d = Denied::default();
        for i in 0..(DENIED_MAX as u32 + 50) {
            let name = format!("n{i}.example.com");
            d.record(&rec(Some(&name), "192.0.2.10", 443, "tls"));
        }
        let snap = d.snapshot();
        assert_eq!(snap.len(), DENIED_MAX);
        // the oldest went first
        assert!(!snap
            .iter()
            .any(|r| r.name.as_deref() == Some("n0.example.com")));
        assert_eq!(snap[0].name.as_deref(), Some("n1049.example.com"));
    }
}
