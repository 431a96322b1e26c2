//! Rule rendering: `[redirect]` and the policy become iptables-restore text.
//! Pure: no files, no processes, no clock; what `init` read on the host (the
//! resolvers, a local stub's uid, the DHCP clients' uids) comes in as
//! [`HostFacts`].

use std::fmt::Write as _;
use std::net::IpAddr;

use super::host::HostFacts;
use crate::config::{Config, Policy, Redirect};
use crate::net::Cidr;

/// Every chain portcullis owns starts with this; `--cleanup` relies on it.
pub const CHAIN_PREFIX: &str = "PORTCULLIS_";
/// Every rule portcullis writes carries a comment starting with this.
pub const COMMENT_PREFIX: &str = "portcullis:";

const NAT_OUTPUT: &str = "PORTCULLIS_OUTPUT";
const NAT_PREROUTING: &str = "PORTCULLIS_PREROUTING";
const NAT_REDIRECT: &str = "PORTCULLIS_REDIRECT";
const FILTER_OUTPUT: &str = "PORTCULLIS_OUTPUT";
const FILTER_FORWARD: &str = "PORTCULLIS_FORWARD";
const FILTER_EGRESS: &str = "PORTCULLIS_EGRESS";

/// iptables' multiport match takes at most 15 ports.
const MULTIPORT_MAX: usize = 15;

/// ICMPv6 types a host needs to keep its link working: router and neighbour
/// solicitation/advertisement (133-136) and MLDv2 reports (143).
const ICMPV6_LINK: [(u8, &str); 5] = [
    (133, "router solicitation"),
    (134, "router advertisement"),
    (135, "neighbour solicitation"),
    (136, "neighbour advertisement"),
    (143, "MLDv2 report"),
];

/// An address family: each gets its own rule set and only its own CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    fn holds(self, c: &Cidr) -> bool {
        c.is_v4() == (self == Family::V4)
    }
    fn holds_ip(self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == (self == Family::V4)
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
    fn udp_unreachable(self) -> &'static str {
        match self {
            Family::V4 => "icmp-port-unreachable",
            Family::V6 => "icmp6-port-unreachable",
        }
    }
    fn prohibited(self) -> &'static str {
        match self {
            Family::V4 => "icmp-admin-prohibited",
            Family::V6 => "icmp6-adm-prohibited",
        }
    }
    /// DHCP client and server ports (client port first).
    pub fn dhcp(self) -> (u16, u16) {
        match self {
            Family::V4 => (68, 67),
            Family::V6 => (546, 547),
        }
    }
}

/// One rule appended to one of our own chains; `spec` is what follows
/// `-A CHAIN` (matches, comment, target), in iptables-save's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: String,
}

/// A jump from a built-in chain to one of ours, inserted at the top
/// (`-I FROM 1 SPEC`) where no identical jump exists yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub from: &'static str,
    pub to: &'static str,
    pub spec: String,
}

/// What portcullis wants in one table of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub chains: Vec<&'static str>,
    pub rules: Vec<Rule>,
    pub jumps: Vec<Jump>,
}

/// What portcullis wants for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    pub tables: Vec<Table>,
}

/// The whole rendering: IPv4 and IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub v4: RuleSet,
    pub v6: RuleSet,
    /// What was read on the host and chosen from it, one line each
    /// (`--dry-run` prints them as comments).
    pub chosen: Vec<String>,
}

impl Rules {
    pub fn families(&self) -> [&RuleSet; 2] {
        [&self.v4, &self.v6]
    }

    /// What `init --dry-run` prints: the iptables-restore input for IPv4,
    /// a line `# ip6tables-restore`, then the input for IPv6. This is the
    /// input for a namespace that holds no portcullis rules yet; on a re-run
    /// `init` leaves out the jumps that are already there.
    pub fn dry_run_text(&self) -> String {
        let mut out = String::new();
        for line in &self.chosen {
            let _ = writeln!(out, "# {line}");
        }
        out.push_str("# iptables-restore\n");
        out.push_str(&self.v4.restore_input());
        out.push_str("# ip6tables-restore\n");
        out.push_str(&self.v6.restore_input());
        out
    }
}

impl RuleSet {
    /// The iptables-restore (`--noflush`) input that installs this rule set
    /// where none of it exists yet.
    pub fn restore_input(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let _ = writeln!(out, "*{}", t.name);
            for c in &t.chains {
                // In a --noflush restore, declaring a chain creates it, or
                // flushes it when it exists: a re-run starts from empty chains.
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            for r in &t.rules {
                let _ = writeln!(out, "-A {} {}", r.chain, r.spec);
            }
            for j in &t.jumps {
                let _ = writeln!(out, "-I {} 1 {}", j.from, j.spec);
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// Whether init installs the non-TCP filter: REGISTRY_ONLY, not audit.
pub fn filter_active(cfg: &Config) -> bool {
    cfg.outbound_traffic_policy == Policy::RegistryOnly && !cfg.audit_mode()
}

/// Renders the rules of `cfg` for both families, knowing only the resolvers
/// (no local stub; `dhcp_client_uids` given by name are left out): see
/// [`render_for`].
pub fn render(cfg: &Config, resolvers: &[IpAddr]) -> Rules {
    render_for(cfg, &HostFacts::from_resolvers(cfg, resolvers))
}

/// Renders the rules of `cfg` for both families with what `init` read on the
/// host: TCP to the resolvers' port 53 is never redirected, `allow_udp`
/// rules without `cidrs` reach the resolvers, a local stub's uid passes port
/// 53, the DHCP clients' uids pass DHCP requests.
pub fn render_for(cfg: &Config, host: &HostFacts) -> Rules {
    Rules {
        v4: render_family(cfg, host, Family::V4),
        v6: render_family(cfg, host, Family::V6),
        chosen: host.describe(
            filter_active(cfg),
            cfg.redirect.allow_udp.iter().any(|u| u.cidrs.is_empty()),
        ),
    }
}

fn render_family(cfg: &Config, host: &HostFacts, fam: Family) -> RuleSet {
    let r = &cfg.redirect;
    let filter = filter_active(cfg);
    // ipv6 = false under the filter: everything but loopback is dropped, so
    // redirecting IPv6 to the proxy would only turn drops into proxied flows.
    let v6_dropped = fam == Family::V6 && !r.ipv6 && filter;
    let mut tables = Vec::new();
    if !v6_dropped && r.include_cidrs.iter().any(|c| fam.holds(c)) {
        tables.push(nat_table(r, host, fam));
    }
    if filter {
        tables.push(if v6_dropped {
            filter_table_v6_off(r)
        } else {
            filter_table(r, host, fam)
        });
    }
    RuleSet {
        family: fam,
        tables,
    }
}

/// `[matches] -m comment --comment "portcullis: WHY" -j TARGET`
fn spec(matches: &str, why: &str, target: &str) -> String {
    // Quotes and backslashes would need escaping that the save output of
    // the two backends renders differently; comments never contain them.
    debug_assert!(
        !why.contains(['"', '\'', '\\']),
        "comment {why:?} needs escaping"
    );
    let mut s = String::new();
    if !matches.is_empty() {
        s.push_str(matches);
        s.push(' ');
    }
    let _ = write!(
        s,
        "-m comment --comment \"{COMMENT_PREFIX} {why}\" -j {target}"
    );
    s
}

fn dst(c: &Cidr) -> String {
    if c.is_everything() {
        String::new()
    } else {
        format!("-d {c}")
    }
}

fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `-p PROTO -m PROTO --dport N` or `-p PROTO -m multiport --dports A,B,..`,
/// one string per group of at most 15 ports.
fn port_matches(proto: &str, ports: &[u16]) -> Vec<String> {
    let mut uniq: Vec<u16> = Vec::new();
    for p in ports {
        if !uniq.contains(p) {
            uniq.push(*p);
        }
    }
    uniq.chunks(MULTIPORT_MAX)
        .map(|chunk| match chunk {
            [one] => format!("-p {proto} -m {proto} --dport {one}"),
            many => format!(
                "-p {proto} -m multiport --dports {}",
                many.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        })
        .collect()
}

fn owner(r: &Redirect) -> (String, String) {
    match r.proxy_gid {
        Some(g) => (
            format!("-m owner --uid-owner {} --gid-owner {g}", r.proxy_uid),
            format!("traffic of the proxy (uid {} gid {g})", r.proxy_uid),
        ),
        None => (
            format!("-m owner --uid-owner {}", r.proxy_uid),
            format!("traffic of the proxy (uid {})", r.proxy_uid),
        ),
    }
}

fn mark(m: u32) -> (String, String) {
    (
        format!("-m mark --mark {m:#x}"),
        format!("traffic the proxy marked ({m:#x})"),
    )
}

fn nat_table(r: &Redirect, host: &HostFacts, fam: Family) -> Table {
    let mut rules = Vec::new();
    let mut add = |chain: &'static str, matches: &str, why: &str, target: &str| {
        rules.push(Rule {
            chain,
            spec: spec(matches, why, target),
        })
    };

    // Locally generated traffic.
    let (m, why) = owner(r);
    add(NAT_OUTPUT, &m, &why, "RETURN");
    if let Some(v) = r.mark {
        let (m, why) = mark(v);
        add(NAT_OUTPUT, &m, &why, "RETURN");
    }
    add(NAT_OUTPUT, "-o lo", "loopback", "RETURN");
    add(
        NAT_OUTPUT,
        &format!("-d {}", fam.loopback()),
        "loopback destinations",
        "RETURN",
    );
    for ip in resolvers(host, fam) {
        add(
            NAT_OUTPUT,
            &format!("-d {} -p tcp -m tcp --dport 53", Cidr::host(ip)),
            "resolver from resolv.conf (DNS over TCP)",
            "RETURN",
        );
    }
    // A local stub forwards to upstreams that resolv.conf does not name
    // (they change with DHCP and VPNs): its uid's DNS over TCP is not
    // redirected, wherever it goes.
    for uid in host.stub_uids() {
        add(
            NAT_OUTPUT,
            &format!("-p tcp -m owner --uid-owner {uid} -m tcp --dport 53"),
            &format!("local resolver (uid {uid}) to its upstreams (DNS over TCP)"),
            "RETURN",
        );
    }
    add(NAT_OUTPUT, "", "exclusions, then the proxy", NAT_REDIRECT);

    // Gateway mode: TCP forwarded from the capture interfaces.
    if !r.capture_interfaces.is_empty() {
        add(
            NAT_PREROUTING,
            "-m addrtype --dst-type LOCAL",
            "destinations on this host",
            "RETURN",
        );
        for iface in &r.capture_interfaces {
            add(
                NAT_PREROUTING,
                &format!("-i {iface}"),
                &format!("capture_interfaces {iface}"),
                NAT_REDIRECT,
            );
        }
    }

    // Shared by both: exclusions, then the redirect.
    for m in port_matches("tcp", &r.exclude_ports) {
        let ports = m.rsplit(' ').next().unwrap_or_default();
        add(
            NAT_REDIRECT,
            &m,
            &format!("exclude_ports {ports}"),
            "RETURN",
        );
    }
    for c in r.exclude_cidrs.iter().filter(|c| fam.holds(c)) {
        add(
            NAT_REDIRECT,
            &dst(c),
            &format!("exclude_cidrs {c}"),
            "RETURN",
        );
    }
    for c in r.include_cidrs.iter().filter(|c| fam.holds(c)) {
        add(
            NAT_REDIRECT,
            &join(&[&dst(c), "-p tcp"]),
            &format!("include_cidrs {c} to the proxy"),
            &format!("REDIRECT --to-ports {}", r.proxy_port),
        );
    }

    let mut chains = vec![NAT_OUTPUT, NAT_REDIRECT];
    let mut jumps = vec![Jump {
        from: "OUTPUT",
        to: NAT_OUTPUT,
        spec: spec("-p tcp", "redirect outbound TCP", NAT_OUTPUT),
    }];
    if !r.capture_interfaces.is_empty() {
        chains.insert(1, NAT_PREROUTING);
        jumps.push(Jump {
            from: "PREROUTING",
            to: NAT_PREROUTING,
            spec: spec("-p tcp", "redirect forwarded TCP", NAT_PREROUTING),
        });
    }
    Table {
        name: "nat",
        chains,
        rules,
        jumps,
    }
}

/// The non-loopback resolvers of one family, once each.
fn resolvers(host: &HostFacts, fam: Family) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in host.resolvers.iter().filter(|ip| fam.holds_ip(ip)) {
        if !out.contains(ip) {
            out.push(*ip);
        }
    }
    out
}

fn filter_table(r: &Redirect, host: &HostFacts, fam: Family) -> Table {
    let mut rules = Vec::new();
    let mut add = |chain: &'static str, matches: &str, why: &str, target: &str| {
        rules.push(Rule {
            chain,
            spec: spec(matches, why, target),
        })
    };
    // What passes returns to the built-in chain, so the host's own rules
    // still apply: portcullis only ever takes permissions away.
    add(FILTER_OUTPUT, "-o lo", "loopback", "RETURN");
    let (m, why) = owner(r);
    add(FILTER_OUTPUT, &m, &why, "RETURN");
    if let Some(v) = r.mark {
        let (m, why) = mark(v);
        add(FILTER_OUTPUT, &m, &why, "RETURN");
    }
    // Owner matches exist only for locally generated packets: these rules
    // live in the chain that OUTPUT alone reaches (iptables-restore refuses
    // `-m owner` in a chain FORWARD jumps to). A local stub's DNS over UDP
    // (TCP passes the filter anyway, and its nat exclusion is above):
    for uid in host.stub_uids() {
        add(
            FILTER_OUTPUT,
            &format!("-p udp -m owner --uid-owner {uid} -m udp --dport 53"),
            &format!("local resolver (uid {uid}) to its upstreams"),
            "RETURN",
        );
    }
    // DHCP requests of the host's DHCP clients, from the client port to the
    // server port only: a pod runs none, and a low source port proves
    // nothing where any uid may bind it.
    let (client, server) = fam.dhcp();
    for (uid, name) in &host.dhcp_uids {
        add(
            FILTER_OUTPUT,
            &format!("-p udp -m owner --uid-owner {uid} -m udp --sport {client} --dport {server}"),
            &match name {
                Some(n) => format!("DHCP client {n} (uid {uid})"),
                None => format!("DHCP client (uid {uid})"),
            },
            "RETURN",
        );
    }
    add(
        FILTER_OUTPUT,
        "",
        "what the workload may send",
        FILTER_EGRESS,
    );

    for iface in &r.capture_interfaces {
        add(
            FILTER_FORWARD,
            &format!("-i {iface}"),
            &format!("capture_interfaces {iface}"),
            FILTER_EGRESS,
        );
    }

    add(
        FILTER_EGRESS,
        "-m conntrack --ctstate RELATED,ESTABLISHED",
        "replies and related",
        "RETURN",
    );
    add(
        FILTER_EGRESS,
        "-p tcp",
        "TCP (redirected to the proxy)",
        "RETURN",
    );
    for u in &r.allow_udp {
        // Without `cidrs` a rule reaches the resolvers of resolv.conf only
        // (none of this family: nothing); any address must be written out.
        // A rule whose CIDRs are all of the other family opens nothing here.
        let dsts: Vec<(String, String)> = if u.cidrs.is_empty() {
            resolvers(host, fam)
                .into_iter()
                .map(|ip| {
                    let c = Cidr::host(ip);
                    (format!("-d {c}"), format!("resolver {ip}"))
                })
                .collect()
        } else {
            u.cidrs
                .iter()
                .filter(|c| fam.holds(c))
                .map(|c| (dst(c), c.to_string()))
                .collect()
        };
        for (d, to) in &dsts {
            for m in port_matches("udp", &u.ports) {
                let ports = m.rsplit(' ').next().unwrap_or_default();
                let why = if d.is_empty() {
                    format!("allow_udp ports {ports}")
                } else {
                    format!("allow_udp ports {ports} to {to}")
                };
                add(FILTER_EGRESS, &join(&[d, &m]), &why, "RETURN");
            }
        }
    }
    if fam == Family::V6 {
        for (ty, what) in ICMPV6_LINK {
            add(
                FILTER_EGRESS,
                &format!("-p ipv6-icmp -m icmp6 --icmpv6-type {ty}"),
                what,
                "RETURN",
            );
        }
    }
    add(
        FILTER_EGRESS,
        "-p udp",
        "other UDP refused at once (QUIC falls back to TCP)",
        &format!("REJECT --reject-with {}", fam.udp_unreachable()),
    );
    add(
        FILTER_EGRESS,
        "",
        "other non-TCP egress refused",
        &format!("REJECT --reject-with {}", fam.prohibited()),
    );

    filter_shell(r, vec![FILTER_OUTPUT, FILTER_EGRESS], rules)
}

/// `ipv6 = false` under REGISTRY_ONLY: IPv6 leaves only through loopback.
fn filter_table_v6_off(r: &Redirect) -> Table {
    let mut rules = vec![
        Rule {
            chain: FILTER_OUTPUT,
            spec: spec("-o lo", "loopback", "RETURN"),
        },
        Rule {
            chain: FILTER_OUTPUT,
            spec: spec("", "ipv6 = false: IPv6 egress dropped", "DROP"),
        },
    ];
    for iface in &r.capture_interfaces {
        rules.push(Rule {
            chain: FILTER_FORWARD,
            spec: spec(
                &format!("-i {iface}"),
                &format!("ipv6 = false: IPv6 from {iface} dropped"),
                "DROP",
            ),
        });
    }
    filter_shell(r, vec![FILTER_OUTPUT], rules)
}

fn filter_shell(r: &Redirect, mut chains: Vec<&'static str>, rules: Vec<Rule>) -> Table {
    let mut jumps = vec![Jump {
        from: "OUTPUT",
        to: FILTER_OUTPUT,
        spec: spec("", "egress filter", FILTER_OUTPUT),
    }];
    if !r.capture_interfaces.is_empty() {
        chains.insert(1, FILTER_FORWARD);
        jumps.push(Jump {
            from: "FORWARD",
            to: FILTER_FORWARD,
            spec: spec("", "egress filter for capture_interfaces", FILTER_FORWARD),
        });
    }
    Table {
        name: "filter",
        chains,
        rules,
        jumps,
    }
}

/// Things about `[redirect]` that are valid but probably not what the
/// operator meant; `init` prints them on stderr.
pub fn warnings(cfg: &Config, host: &HostFacts) -> Vec<String> {
    let r = &cfg.redirect;
    let filter = filter_active(cfg);
    let mut out = Vec::new();
    if filter
        && r.allow_udp.iter().any(|u| u.cidrs.is_empty())
        && host.resolvers.is_empty()
        && host.stubs.is_empty()
    {
        out.push(format!(
            "{} names no resolver: [redirect] allow_udp rules without cidrs open nothing",
            host.resolv_conf
        ));
    }
    for fam in [Family::V4, Family::V6] {
        if fam == Family::V6 && !r.ipv6 && filter {
            continue;
        }
        if !r.include_cidrs.iter().any(|c| fam.holds(c)) {
            out.push(format!(
                "[redirect] include_cidrs has no {} prefix: {} TCP is not redirected to the proxy{}",
                fam.name(),
                fam.name(),
                if filter {
                    " and the egress filter lets it out"
                } else {
                    ""
                }
            ));
        }
    }
    if !r.capture_interfaces.is_empty() {
        for (fam, want) in [(Family::V4, "0.0.0.0"), (Family::V6, "[::]")] {
            let has = cfg.proxy.listen.iter().any(|a| {
                a.port() == r.proxy_port && a.ip().is_unspecified() && fam.holds_ip(&a.ip())
            });
            let used = r.include_cidrs.iter().any(|c| fam.holds(c))
                && !(fam == Family::V6 && !r.ipv6 && filter);
            if used && !has {
                out.push(format!(
                    "[redirect] capture_interfaces: forwarded flows are redirected to the receiving interface's address, but [proxy] listen has no {want}:{}",
                    r.proxy_port
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(src: &str) -> Config {
        Config::parse(Path::new("t.toml"), src).expect("valid config")
    }

    fn specs(rs: &RuleSet, table: &str, chain: &str) -> Vec<String> {
        rs.table(table)
            .map(|t| {
                t.rules
                    .iter()
                    .filter(|r| r.chain == chain)
                    .map(|r| r.spec.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn every_rule_is_tagged_and_in_own_chains() {
        let c = cfg("[redirect]\nmark = 0x539\ncapture_interfaces = [\"eth1\"]\nexclude_ports = [22]\nexclude_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\n");
        let rules = render(&c, &["192.0.2.53".parse().unwrap()]);
        for rs in rules.families() {
            for t in &rs.tables {
                for r in &t.rules {
                    assert!(r.chain.starts_with(CHAIN_PREFIX));
                    assert!(t.chains.contains(&r.chain), "{} undeclared", r.chain);
                    assert!(r.spec.contains("--comment \"portcullis: "), "{}", r.spec);
                }
                for j in &t.jumps {
                    assert!(j.spec.contains("--comment \"portcullis: "));
                    assert!(j.spec.ends_with(&format!("-j {}", j.to)));
                    assert!(t.chains.contains(&j.to));
                }
            }
        }
    }

    #[test]
    fn families_get_their_own_cidrs() {
        let c = cfg("[redirect]\nexclude_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\nallow_udp = [{ ports = [123], cidrs = [\"192.0.2.1\"] }]\n");
        let rules = render(
            &c,
            &[
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
        );
        let v4 = rules.v4.restore_input();
        let v6 = rules.v6.restore_input();
        assert!(v4.contains("-d 10.0.0.0/8 ") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8 ") && !v6.contains("10.0.0.0/8"));
        assert!(v4.contains("-d 192.0.2.53/32 -p tcp -m tcp --dport 53"));
        assert!(v6.contains("-d 2001:db8::53/128 -p tcp -m tcp --dport 53"));
        assert!(v4.contains("-d 127.0.0.0/8 ") && v6.contains("-d ::1/128 "));
        // the v4-only UDP allowance opens nothing for IPv6
        assert!(v4.contains("-d 192.0.2.1/32 -p udp -m udp --dport 123"));
        assert!(!v6.contains("--dport 123"));
        assert!(v6.contains("--icmpv6-type 135") && !v4.contains("icmpv6"));
        // no DHCP without dhcp_client_uids
        assert!(!v4.contains("--dport 67") && !v6.contains("--dport 547"));
    }

    #[test]
    fn dhcp_only_for_its_uids_and_only_from_output() {
        let c = cfg("[redirect]\ndhcp_client_uids = [0, \"systemd-network\", 998]\ncapture_interfaces = [\"lan0\"]\n");
        let host = HostFacts {
            dhcp_uids: vec![(0, None), (998, Some("systemd-network".into()))],
            ..Default::default()
        };
        let r = render_for(&c, &host);
        for (rs, client, server) in [(&r.v4, 68, 67), (&r.v6, 546, 547)] {
            let out = specs(rs, "filter", FILTER_OUTPUT);
            let dhcp: Vec<&String> = out.iter().filter(|s| s.contains("DHCP")).collect();
            assert_eq!(dhcp.len(), 2, "{out:?}");
            assert!(dhcp[0].starts_with(&format!(
                "-p udp -m owner --uid-owner 0 -m udp --sport {client} --dport {server} "
            )));
            assert!(dhcp[1].contains("--uid-owner 998 ") && dhcp[1].contains("systemd-network"));
            // the jump to the shared chain comes after them
            assert!(out.last().unwrap().ends_with("-j PORTCULLIS_EGRESS"));
            // nothing with an owner match where FORWARD leads
            for chain in [FILTER_EGRESS, FILTER_FORWARD] {
                for s in specs(rs, "filter", chain) {
                    assert!(
                        !s.contains("-m owner") && !s.contains("DHCP"),
                        "{chain}: {s}"
                    );
                }
            }
        }
        // `render` alone knows no names: the numbers only
        let r = render(&c, &[]);
        let out = specs(&r.v4, "filter", FILTER_OUTPUT);
        assert_eq!(out.iter().filter(|s| s.contains("DHCP")).count(), 2);
        assert!(
            r.chosen.iter().any(|l| l == "dhcp_client_uids: 0, 998"),
            "{:?}",
            r.chosen
        );
    }

    #[test]
    fn udp_without_cidrs_reaches_the_resolvers() {
        let c = cfg("[redirect]\nallow_udp = [{ ports = [53] }, { ports = [123], cidrs = [\"0.0.0.0/0\"] }]\n");
        let r = render(
            &c,
            &[
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
        );
        let v4 = specs(&r.v4, "filter", FILTER_EGRESS);
        let v6 = specs(&r.v6, "filter", FILTER_EGRESS);
        assert!(v4.iter().any(
            |s| s.starts_with("-d 192.0.2.53/32 -p udp -m udp --dport 53 ")
                && s.contains("allow_udp ports 53 to resolver 192.0.2.53")
        ));
        assert!(v6
            .iter()
            .any(|s| s.starts_with("-d 2001:db8::53/128 -p udp -m udp --dport 53 ")));
        assert!(!v4
            .iter()
            .any(|s| s.starts_with("-p udp -m udp --dport 53 ")));
        // "any address" is written out, and is what it says
        assert!(v4
            .iter()
            .any(|s| s.starts_with("-p udp -m udp --dport 123 ")));
        assert!(!v6.iter().any(|s| s.contains("--dport 123")));
        // no resolver of a family: nothing for it
        let r = render(&c, &["192.0.2.53".parse().unwrap()]);
        assert!(!specs(&r.v6, "filter", FILTER_EGRESS)
            .iter()
            .any(|s| s.contains("--dport 53")));
        assert!(r.chosen[0].contains("192.0.2.53; allow_udp rules without cidrs reach these only"));
        let none = HostFacts::from_resolvers(&c, &[]);
        assert_eq!(warnings(&c, &none).len(), 1);
    }

    #[test]
    fn local_stub_uid_passes_port_53() {
        let c = cfg("[redirect]\ncapture_interfaces = [\"lan0\"]\n");
        let host = HostFacts {
            resolv_conf: "r".into(),
            stubs: vec![crate::init::host::Stub {
                addr: "127.0.0.53".parse().unwrap(),
                uids: vec![991],
            }],
            ..Default::default()
        };
        let r = render_for(&c, &host);
        for rs in [&r.v4, &r.v6] {
            let nat = specs(rs, "nat", NAT_OUTPUT);
            assert!(nat.iter().any(|s| s
                .starts_with("-p tcp -m owner --uid-owner 991 -m tcp --dport 53 ")
                && s.ends_with("-j RETURN")));
            let out = specs(rs, "filter", FILTER_OUTPUT);
            assert!(out
                .iter()
                .any(|s| s.starts_with("-p udp -m owner --uid-owner 991 -m udp --dport 53 ")));
            // the workload's UDP 53 reaches no remote address
            assert!(!specs(rs, "filter", FILTER_EGRESS)
                .iter()
                .any(|s| s.contains("--dport 53")));
        }
        let text = r.dry_run_text();
        assert!(
            text.starts_with("# resolvers (nameservers in r): none"),
            "{text}"
        );
        assert!(text.contains("\n# local resolver 127.0.0.53: UDP and TCP 53 pass for uid 991, the owner of its socket\n"), "{text}");
        assert!(warnings(&c, &host)
            .iter()
            .all(|w| !w.contains("names no resolver")));
    }

    #[test]
    fn owner_rule_matches_uid_and_gid_together() {
        let c = cfg("[redirect]\nproxy_uid = 1337\nproxy_gid = 1338\n");
        let rules = render(&c, &[]);
        let out = specs(&rules.v4, "nat", NAT_OUTPUT);
        assert!(out[0].starts_with("-m owner --uid-owner 1337 --gid-owner 1338 "));
        let c = cfg("[redirect]\nproxy_uid = 1337\n");
        let out = specs(&render(&c, &[]).v4, "nat", NAT_OUTPUT);
        assert!(out[0].starts_with("-m owner --uid-owner 1337 -m comment"));
    }

    #[test]
    fn policy_decides_the_filter() {
        let any = cfg("outbound_traffic_policy = \"ALLOW_ANY\"\n");
        let r = render(&any, &[]);
        assert!(r.v4.table("filter").is_none() && r.v6.table("filter").is_none());
        let audit = cfg("audit = true\n");
        assert!(render(&audit, &[]).v4.table("filter").is_none());
        let strict = cfg("");
        assert!(render(&strict, &[]).v4.table("filter").is_some());
    }

    #[test]
    fn ipv6_off_drops_instead_of_redirecting() {
        let c = cfg("[redirect]\nipv6 = false\n");
        let r = render(&c, &[]);
        assert!(r.v6.table("nat").is_none());
        let f = specs(&r.v6, "filter", FILTER_OUTPUT);
        assert_eq!(f.len(), 2);
        assert!(f[0].starts_with("-o lo ") && f[1].ends_with("-j DROP"));
        // ... but only where the filter applies
        let c = cfg("outbound_traffic_policy = \"ALLOW_ANY\"\n[redirect]\nipv6 = false\n");
        assert!(render(&c, &[]).v6.table("nat").is_some());
    }

    #[test]
    fn many_ports_are_chunked() {
        let ports: Vec<u16> = (1..=20).collect();
        let m = port_matches("tcp", &ports);
        assert_eq!(m.len(), 2);
        assert!(m[0].ends_with("--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"));
        assert_eq!(m[1], "-p tcp -m multiport --dports 16,17,18,19,20");
        assert_eq!(
            port_matches("udp", &[53, 53]),
            vec!["-p udp -m udp --dport 53"]
        );
    }

    #[test]
    fn gateway_chains_and_jumps() {
        let c = cfg("[proxy]\nlisten = [\"0.0.0.0:15001\", \"[::]:15001\"]\n[redirect]\ncapture_interfaces = [\"eth1\", \"eth2\"]\n");
        let r = render(&c, &[]);
        let host = HostFacts::from_resolvers(&c, &["192.0.2.53".parse().unwrap()]);
        assert!(warnings(&c, &host).is_empty(), "{:?}", warnings(&c, &host));
        let pre = specs(&r.v4, "nat", NAT_PREROUTING);
        assert!(pre[0].starts_with("-m addrtype --dst-type LOCAL "));
        assert!(pre[1].starts_with("-i eth1 ") && pre[1].ends_with("-j PORTCULLIS_REDIRECT"));
        assert!(pre[2].starts_with("-i eth2 "));
        let nat = r.v4.table("nat").unwrap();
        assert_eq!(nat.jumps.len(), 2);
        let filter = r.v4.table("filter").unwrap();
        assert!(filter.jumps.iter().any(|j| j.from == "FORWARD"));
        // loopback-only listeners cannot receive forwarded flows
        let c = cfg("[redirect]\ncapture_interfaces = [\"eth1\"]\n");
        assert_eq!(warnings(&c, &host).len(), 2);
    }
}
