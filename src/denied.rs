//! The recently denied and audited flows, for `/denied` and the traffic
//! page: fed from the log path (`Shared::log`, one call per finished flow),
//! read by the control side (`admin`, `page`), which both render them as
//! service entries to paste (`denied_toml`; here rather than in `admin`, so
//! the page, which `admin` serves, need not reach back into `admin`).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::access_log::{timestamp, FlowRecord};
use crate::config::Config;
use crate::vocab::{Decision, Protocol, Reason};

/// Most denied/audit records kept for `/denied` and the traffic page.
pub const DENIED_MAX: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum DeniedKey {
    Name {
        name: String,
        port: u16,
        protocol: Protocol,
    },
    Addr {
        ip: std::net::IpAddr,
        port: u16,
        protocol: Protocol,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct DeniedRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub decision: Decision,
    pub reason: Option<Reason>,
    pub count: u64,
    /// Of `count`, the flows denied and those audited (a reload may switch
    /// audit on or off: one name can be both).
    pub denied: u64,
    pub audited: u64,
    pub last_seen: String,
    /// Insertion clock of the last flow: orders records by recency.
    #[serde(skip)]
    pub(crate) seen: u64,
}

/// The recent denied and audit flows: a least-recently-seen map, bounded
/// at [`DENIED_MAX`] records. An insert is O(1) however many names clients
/// invent (a hash lookup, then the least recent record evicted when full);
/// the hasher is SipHash with a per-process random key, so chosen names
/// cannot collide on purpose.
pub struct Denied {
    inner: Mutex<DeniedInner>,
}

struct DeniedInner {
    map: lru::LruCache<DeniedKey, DeniedRecord, std::collections::hash_map::RandomState>,
    clock: u64,
}

impl Default for Denied {
    fn default() -> Self {
        Denied::with_capacity(DENIED_MAX)
    }
}

/// An explicit request for a name has no original destination: its port
/// comes from the authority the client asked for (the address part is not
/// used for records with a name).
fn explicit_dst(rec: &FlowRecord) -> Option<std::net::SocketAddr> {
    let (_, port) = rec.authority.as_deref()?.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    rec.name.as_ref()?;
    Some(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
}

impl Denied {
    pub fn with_capacity(max: usize) -> Denied {
        let cap = std::num::NonZeroUsize::new(max.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        Denied {
            inner: Mutex::new(DeniedInner {
                map: lru::LruCache::with_hasher(cap, Default::default()),
                clock: 0,
            }),
        }
    }

    /// Records a flow if it was denied or audited (loops and overload are
    /// the proxy's own business, not the registry's).
    pub fn record(&self, rec: &FlowRecord) {
        // Mismatches, forbidden addresses and refused clients of the
        // explicit proxy are not names to allow either.
        if !matches!(rec.decision, Decision::Deny | Decision::Audit)
            || matches!(
                rec.reason,
                Some(
                    Reason::Loop
                        | Reason::Overload
                        | Reason::SniMismatch
                        | Reason::HostMismatch
                        | Reason::ForbiddenAddress
                        | Reason::ClientNotAllowed
                )
            )
        {
            return;
        }
        let Some(dst) = rec.dst.or_else(|| explicit_dst(rec)) else {
            return;
        };
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
        let now = timestamp(SystemTime::now());
        let Ok(mut g) = self.inner.lock() else { return };
        let g = &mut *g;
        g.clock += 1;
        let seen = g.clock;
        // get_mut also marks the record most recent
        if let Some(e) = g.map.get_mut(&key) {
            e.count += 1;
            if rec.decision == Decision::Audit {
                e.audited += 1;
            } else {
                e.denied += 1;
            }
            e.seen = seen;
            e.decision = rec.decision;
            e.reason = rec.reason;
            e.last_seen = now;
            return;
        }
        // push evicts the least recently seen record when full
        g.map.push(
            key,
            DeniedRecord {
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
                count: 1,
                denied: u64::from(rec.decision != Decision::Audit),
                audited: u64::from(rec.decision == Decision::Audit),
                last_seen: now,
                seen,
            },
        );
    }

    /// Every record, most recent first.
    pub fn snapshot(&self) -> Vec<DeniedRecord> {
        match self.inner.lock() {
            Ok(g) => g.map.iter().map(|(_, r)| r.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    let mut out = String::from(
        "# Flows portcullis denied (or, in audit mode, let through) recently, as\n\
         # service entries. Audit output lists whatever the workload contacted:\n\
         # review every entry before pasting it into the registry.\n",
    );
    for (_, block) in denied_toml_blocks(records, cfg) {
        out.push('\n');
        out.push_str(&block);
    }
    out
}

/// The `[[service_entry]]` blocks of [`denied_toml`], one per name (in name
/// order), then one per address, each with its name or address: the traffic
/// page shows each beside its name.
pub fn denied_toml_blocks(records: &[DeniedRecord], cfg: &Config) -> Vec<(String, String)> {
    use crate::config::Protocol;
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    let mut blocks = Vec::new();
    let name_covered = |name: &str, port: u16, proto: Protocol| {
        cfg.entries.iter().any(|e| {
            e.hosts.iter().any(|h| h.matches(name))
                && e.port(port).is_some_and(|p| p.protocol == proto)
        })
    };
    let addr_covered = |ip: std::net::IpAddr, port: u16| {
        cfg.entries.iter().any(|e| {
            !e.addresses.is_empty()
                && e.addresses.iter().any(|c| c.contains(ip))
                && e.port(port).is_some_and(|p| p.protocol == Protocol::Tcp)
        })
    };
    struct Seen {
        proto: Protocol,
        count: u64,
        reasons: BTreeSet<&'static str>,
        conflict: Option<Protocol>,
    }
    let mut by_name: BTreeMap<&str, BTreeMap<u16, Seen>> = BTreeMap::new();
    let mut by_addr: BTreeMap<std::net::IpAddr, BTreeMap<u16, (u64, BTreeSet<&'static str>)>> =
        BTreeMap::new();
    for r in records {
        match (&r.name, r.ip) {
            (Some(n), _) => {
                let proto = r.protocol;
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
                seen.reasons.extend(r.reason.map(|r| r.as_str()));
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
                e.1.extend(r.reason.map(|r| r.as_str()));
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
        let mut out = String::from("[[service_entry]]\n");
        for (port, seen) in &ports {
            let _ = writeln!(
                out,
                "# seen: {port}/{} x{} ({})",
                seen.proto.config_name(),
                seen.count,
                reasons(&seen.reasons)
            );
            if let Some(other) = seen.conflict {
                let _ = writeln!(
                    out,
                    "# note: {name}:{port} was also seen as {}; one port has one protocol",
                    other.config_name()
                );
            }
        }
        let _ = writeln!(out, "name = \"{}\"", unique(name.to_string()));
        let _ = writeln!(out, "hosts = [\"{name}\"]");
        let ps: Vec<String> = ports
            .iter()
            .map(|(p, seen)| {
                format!(
                    "{{ number = {p}, protocol = \"{}\" }}",
                    seen.proto.config_name()
                )
            })
            .collect();
        let _ = writeln!(out, "ports = [{}]", ps.join(", "));
        // TCP ports of a named entry need the name resolved ahead.
        let _ = writeln!(out, "resolution = \"DNS\"");
        blocks.push((name.to_string(), out));
    }
    for (ip, ports) in by_addr {
        let cidr = crate::net::Cidr::host(ip);
        let mut out = String::from("[[service_entry]]\n");
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
        blocks.push((ip.to_string(), out));
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::FlowRecord;
    #[allow(unused_imports)]
    use crate::vocab::{Decision, Mode, Protocol, Reason};
    use std::path::Path;

    fn rec(name: Option<&str>, ip: &str, port: u16, protocol: Protocol) -> FlowRecord {
        FlowRecord {
            dst: Some(std::net::SocketAddr::new(ip.parse().unwrap(), port)),
            protocol,
            name: name.map(str::to_string),
            decision: Decision::Audit,
            reason: Some(Reason::NotInRegistry),
            ..FlowRecord::new("192.0.2.2:40000".parse().unwrap(), Mode::Transparent)
        }
    }

    const BASE: &str = "[redirect]\nproxy_uid = 1337\n\n[[service_entry]]\nname = \"www.example.org\"\nhosts = [\"*.files.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n";

    #[test]
    fn denied_toml_round_trips_into_a_valid_config() {
        let cfg = Config::parse(Path::new("t.toml"), BASE).unwrap();
        let d = Denied::default();
        for r in [
            rec(Some("www.example.org"), "203.0.113.5", 443, Protocol::Tls),
            rec(Some("www.example.org"), "203.0.113.5", 80, Protocol::Http),
            rec(Some("www.example.org"), "203.0.113.5", 8443, Protocol::Tls),
            rec(Some("www.example.org"), "203.0.113.5", 443, Protocol::Tls),
            rec(
                Some("a.files.example.com"),
                "192.0.2.11",
                443,
                Protocol::Tls,
            ),
            rec(
                Some("a.files.example.com"),
                "192.0.2.11",
                80,
                Protocol::Http,
            ),
            rec(None, "192.0.2.10", 7000, Protocol::Tcp),
            rec(None, "192.0.2.10", 443, Protocol::Tls),
            rec(None, "2001:db8::10", 7000, Protocol::Tcp),
        ] {
            d.record(&r);
        }
        let mut loop_rec = rec(None, "192.0.2.99", 1, Protocol::Tcp);
        loop_rec.decision = Decision::Deny;
        loop_rec.reason = Some(Reason::Loop);
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
            d.record(&rec(Some(&name), "192.0.2.10", 443, Protocol::Tls));
        }
        let snap = d.snapshot();
        assert_eq!(snap.len(), DENIED_MAX);
        // the oldest went first
        assert!(!snap
            .iter()
            .any(|r| r.name.as_deref() == Some("n0.example.com")));
        let newest = format!("n{}.example.com", DENIED_MAX + 49);
        assert_eq!(snap[0].name.as_deref(), Some(newest.as_str()));
    }

    #[test]
    fn denied_counts_deny_and_audit_apart() {
        // a reload switched audit on: the same name was denied, then audited
        let d = Denied::default();
        let mut r = rec(Some("www.example.org"), "203.0.113.5", 443, Protocol::Tls);
        r.decision = Decision::Deny;
        d.record(&r);
        r.decision = Decision::Audit;
        d.record(&r);
        d.record(&r);
        let snap = d.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].count, snap[0].denied, snap[0].audited), (3, 1, 2));
        assert_eq!(snap[0].decision, Decision::Audit, "the latest decision");
    }

    #[test]
    fn denied_evicts_the_least_recently_seen() {
        // a client inventing names cannot push out a name that keeps coming
        let d = Denied::with_capacity(100);
        d.record(&rec(
            Some("keep.example.com"),
            "192.0.2.10",
            443,
            Protocol::Tls,
        ));
        for i in 0..100_000u32 {
            d.record(&rec(
                Some(&format!("junk{i}.example")),
                "192.0.2.10",
                443,
                Protocol::Tls,
            ));
            if i % 50 == 0 {
                d.record(&rec(
                    Some("keep.example.com"),
                    "192.0.2.10",
                    443,
                    Protocol::Tls,
                ));
            }
        }
        let snap = d.snapshot();
        assert_eq!(snap.len(), 100);
        assert_eq!(d.len(), 100);
        let keep = snap
            .iter()
            .find(|r| r.name.as_deref() == Some("keep.example.com"))
            .expect("the recurring name survives");
        assert_eq!(keep.count, 1 + 2000);
        // most recent first
        assert_eq!(snap[0].name.as_deref(), Some("junk99999.example"));
        assert!(snap.windows(2).all(|w| w[0].seen > w[1].seen));
    }
}
