//! Decision stage: the validated entries compiled into per-port indexes, and
//! the pure decision of docs/DESIGN.md §3 (steps 1-3, 5-8) from the facts of a flow.
//!
//! Matching never scans every pattern: exact hosts are a hash lookup, and a
//! name is tried against the wildcard map once per label suffix, longest
//! first, so a flow costs O(labels) whatever the registry's size.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{Config, Policy, Resolution, ServiceEntry};
use crate::name::HostPattern;
use crate::net::{canonical_ip, Cidr, OrigDst};
pub use crate::vocab::{Decision, Protocol, Reason};

/// Where an allowed or passed flow goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The original destination (resolution NONE, passthrough, audit, and
    /// TCP entries matched by a resolved address).
    Original(SocketAddr),
    /// Resolve the presented name; connect to D.ip if among the answers,
    /// else to the answers in turn, D's family first.
    Resolve {
        name: String,
        port: u16,
        dst: SocketAddr,
    },
    /// STATIC endpoints in order.
    Static(Vec<SocketAddr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Index of the matched entry in `Registry::entries`.
    pub entry: Option<usize>,
    /// For deny, audit and passthrough: why no entry allowed it.
    pub reason: Option<Reason>,
    /// None for deny.
    pub upstream: Option<Upstream>,
}

impl Verdict {
    /// A deny for `reason` that no entry could change (loop, overload, the
    /// explicit proxy's own refusals).
    pub fn refused(reason: Reason) -> Verdict {
        Verdict {
            decision: Decision::Deny,
            entry: None,
            reason: Some(reason),
            upstream: None,
        }
    }
}

/// The facts of a flow after detection.
#[derive(Debug, Clone)]
pub struct FlowFacts<'a> {
    pub dst: OrigDst,
    pub protocol: Protocol,
    /// Normalised name; None for opaque flows and IP literals.
    pub name: Option<&'a str>,
    /// Detection failed (malformed, too_large, timeout).
    pub detect_failure: Option<Reason>,
}

/// How the proxy must wait for the client's first bytes on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectPlan {
    /// REGISTRY_ONLY (not audit): up to hello_timeout, then deny `timeout`.
    Hello,
    /// ALLOW_ANY or audit: up to first_byte_timeout, then opaque.
    FirstByte,
    /// ALLOW_ANY on a port with no TLS/HTTP entry: connect at once, relay
    /// server-to-client immediately, classify the client's bytes for the log.
    ConnectFirst,
}

#[derive(Default, Debug)]
struct NameIndex {
    exact: HashMap<String, Vec<usize>>,
    /// keyed by the suffix after `*.`
    wildcard: HashMap<String, Vec<usize>>,
}

#[derive(Default, Debug)]
struct PortIndex {
    tls: NameIndex,
    http: NameIndex,
    /// TCP entries on this port with host addresses (/32, /128): hash lookup.
    tcp_hosts: HashMap<IpAddr, Vec<usize>>,
    /// TCP entries on this port with wider prefixes, in entry order.
    tcp_prefixes: Vec<(Cidr, usize)>,
    /// TCP entries on this port resolved by DNS (addresses come from the
    /// resolver, see [`ResolvedAddrs`]).
    tcp_dns: Vec<usize>,
    has_named: bool,
}

/// Addresses of DNS-resolved TCP entries, kept by the background resolver.
pub trait ResolvedAddrs {
    fn contains(&self, entry: usize, ip: IpAddr) -> bool;
}

/// No resolved addresses (tests, `explain`).
pub struct NoResolved;
impl ResolvedAddrs for NoResolved {
    fn contains(&self, _: usize, _: IpAddr) -> bool {
        false
    }
}

impl ResolvedAddrs for HashMap<usize, Vec<IpAddr>> {
    fn contains(&self, entry: usize, ip: IpAddr) -> bool {
        self.get(&entry).is_some_and(|v| v.contains(&ip))
    }
}

/// The compiled registry: immutable, shared by all flows of one config
/// generation.
#[derive(Debug)]
pub struct Registry {
    pub config: Arc<Config>,
    ports: HashMap<u16, PortIndex>,
}

impl Registry {
    pub fn new(config: Arc<Config>) -> Registry {
        let mut ports: HashMap<u16, PortIndex> = HashMap::new();
        for (i, e) in config.entries.iter().enumerate() {
            for p in &e.ports {
                let idx = ports.entry(p.number).or_default();
                match p.protocol {
                    Protocol::Tls | Protocol::Http => {
                        idx.has_named = true;
                        let names = if p.protocol == Protocol::Tls {
                            &mut idx.tls
                        } else {
                            &mut idx.http
                        };
                        for h in &e.hosts {
                            let (map, key) = match h {
                                HostPattern::Exact(n) => (&mut names.exact, n),
                                HostPattern::Wildcard(s) => (&mut names.wildcard, s),
                            };
                            let v = map.entry(key.clone()).or_default();
                            if v.last() != Some(&i) {
                                v.push(i);
                            }
                        }
                    }
                    Protocol::Tcp => {
                        for c in &e.addresses {
                            if c.is_host() {
                                idx.tcp_hosts.entry(c.addr()).or_default().push(i);
                            } else {
                                idx.tcp_prefixes.push((*c, i));
                            }
                        }
                        if e.addresses.is_empty() && e.resolution == Resolution::Dns {
                            idx.tcp_dns.push(i);
                        }
                    }
                }
            }
        }
        Registry { config, ports }
    }

    pub fn entries(&self) -> &[ServiceEntry] {
        &self.config.entries
    }

    pub fn entry(&self, i: usize) -> &ServiceEntry {
        &self.config.entries[i]
    }

    fn policy(&self) -> Policy {
        self.config.outbound_traffic_policy
    }

    /// Step 1: a flow that was not redirected, or that comes from one of
    /// our own upstream sockets, is a loop — never audited, never passed.
    pub fn loop_verdict() -> Verdict {
        Verdict::refused(Reason::Loop)
    }

    /// Step 3: a TCP candidate that admits D.ip decides at once.
    pub fn decide_by_address(&self, dst: OrigDst, resolved: &dyn ResolvedAddrs) -> Option<Verdict> {
        let idx = self.ports.get(&dst.port())?;
        let ip = canonical_ip(dst.ip());
        let mut best: Option<usize> = idx.tcp_hosts.get(&ip).and_then(|v| v.first().copied());
        for (c, i) in &idx.tcp_prefixes {
            if best.is_some_and(|b| b < *i) {
                break;
            }
            if c.contains(ip) {
                best = Some(best.map_or(*i, |b| b.min(*i)));
                break;
            }
        }
        for i in &idx.tcp_dns {
            if best.is_some_and(|b| b < *i) {
                break;
            }
            if resolved.contains(*i, ip) {
                best = Some(best.map_or(*i, |b| b.min(*i)));
                break;
            }
        }
        let i = best?;
        Some(Verdict {
            decision: Decision::Allow,
            entry: Some(i),
            reason: None,
            upstream: Some(self.upstream_for(i, None, dst)),
        })
    }

    /// Step 4: how to wait for the client's bytes on D.port.
    pub fn detect_plan(&self, dst: OrigDst) -> DetectPlan {
        let named = self.ports.get(&dst.port()).is_some_and(|p| p.has_named);
        match (self.policy(), self.config.audit_mode()) {
            (Policy::AllowAny, _) if !named => DetectPlan::ConnectFirst,
            (Policy::AllowAny, _) | (_, true) => DetectPlan::FirstByte,
            _ => DetectPlan::Hello,
        }
    }

    /// Steps 5-8: the verdict from what the detector saw.
    pub fn decide(&self, facts: &FlowFacts<'_>, resolved: &dyn ResolvedAddrs) -> Verdict {
        if let Some(v) = self.decide_by_address(facts.dst, resolved) {
            return v;
        }
        let reason = match facts.detect_failure {
            Some(r) => r,
            None => match self.match_name(facts) {
                Ok(i) => {
                    return Verdict {
                        decision: Decision::Allow,
                        entry: Some(i),
                        reason: None,
                        upstream: Some(self.upstream_for(i, facts.name, facts.dst)),
                    }
                }
                Err(r) => r,
            },
        };
        self.refuse(reason, facts.dst)
    }

    /// Step 8 for a flow no entry allows: deny, audit or passthrough.
    pub fn refuse(&self, reason: Reason, dst: OrigDst) -> Verdict {
        let decision = if reason == Reason::Loop {
            Decision::Deny
        } else if self.policy() == Policy::AllowAny {
            Decision::Passthrough
        } else if self.config.audit {
            Decision::Audit
        } else {
            Decision::Deny
        };
        Verdict {
            decision,
            entry: None,
            reason: Some(reason),
            upstream: (decision != Decision::Deny).then_some(Upstream::Original(dst.0)),
        }
    }

    /// Step 6 for a TLS or HTTP flow with a name.
    fn match_name(&self, facts: &FlowFacts<'_>) -> Result<usize, Reason> {
        let name = facts.name.ok_or(Reason::NotInRegistry)?;
        let idx = self
            .ports
            .get(&facts.dst.port())
            .ok_or(Reason::NotInRegistry)?;
        let names = match facts.protocol {
            Protocol::Tls => &idx.tls,
            Protocol::Http => &idx.http,
            Protocol::Tcp => return Err(Reason::NotInRegistry),
        };
        let ip = facts.dst.ip();
        let mut host_matched = false;
        // Tiers in order of specificity: exact, then wildcards longest first;
        // within a tier the earlier entry wins.
        let mut tiers: Vec<&Vec<usize>> = Vec::new();
        if let Some(v) = names.exact.get(name) {
            tiers.push(v);
        }
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(v) = names.wildcard.get(suffix) {
                tiers.push(v);
            }
            rest = suffix;
        }
        for tier in tiers {
            host_matched = true;
            if let Some(i) = tier.iter().copied().find(|i| self.entry(*i).admits_ip(ip)) {
                return Ok(i);
            }
        }
        Err(if host_matched {
            Reason::AddressMismatch
        } else {
            Reason::NotInRegistry
        })
    }

    /// Step 7: the upstream plan of an allowed flow.
    fn upstream_for(&self, i: usize, name: Option<&str>, dst: OrigDst) -> Upstream {
        let e = self.entry(i);
        match e.resolution {
            Resolution::None => Upstream::Original(dst.0),
            Resolution::Static => Upstream::Static(
                e.endpoints
                    .iter()
                    .map(|ep| SocketAddr::new(ep.address, ep.port.unwrap_or(dst.port())))
                    .collect(),
            ),
            Resolution::Dns => match name {
                Some(n) => Upstream::Resolve {
                    name: n.to_string(),
                    port: dst.port(),
                    dst: dst.0,
                },
                // A TCP entry matched by one of its resolved addresses: D
                // is already known to be what the name resolves to.
                None => Upstream::Original(dst.0),
            },
        }
    }

    /// Step 7, `dns` failure: a name that resolves to nothing.
    pub fn dns_failed(&self, dst: OrigDst) -> Verdict {
        self.refuse(Reason::Dns, dst)
    }

    /// DNS TCP entries and their hosts, for the background resolver.
    pub fn dns_tcp_entries(&self) -> Vec<(usize, Vec<String>)> {
        self.entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.resolution == Resolution::Dns
                    && e.addresses.is_empty()
                    && e.ports.iter().any(|p| p.protocol == Protocol::Tcp)
            })
            .map(|(i, e)| (i, e.hosts.iter().map(|h| h.to_string()).collect()))
            .collect()
    }

    /// The metric/log label of a verdict's entry.
    pub fn entry_label(&self, v: &Verdict) -> &str {
        match v.entry {
            Some(i) => &self.entry(i).name,
            None if v.decision == Decision::Deny => "BlackHole",
            None => "Passthrough",
        }
    }
}
