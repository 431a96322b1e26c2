//! What `init` reads on the target host before it renders: the resolvers of
//! resolv.conf, the owner of a local DNS stub's socket, the uids of
//! `dhcp_client_uids` given by name (docs/DESIGN.md §5). Parsing is pure; only
//! [`HostFacts::gather`] reads files. Nothing here uses NSS (getpwnam,
//! getaddrinfo): the static binary reads the files itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::InitError;
use crate::config::{Config, UserRef};
use crate::net::canonical_ip;

/// Names the resolv.conf that `init` reads (tests pin it; so can operators
/// whose resolver lives elsewhere).
pub const RESOLV_CONF_ENV: &str = "PORTCULLIS_RESOLV_CONF";
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Names the directory holding `udp`, `udp6`, `tcp`, `tcp6` socket tables
/// (default `/proc/net`, this network namespace's); the golden tests pin it.
pub const PROC_NET_ENV: &str = "PORTCULLIS_PROC_NET";
pub const DEFAULT_PROC_NET: &str = "/proc/net";
pub const PASSWD: &str = "/etc/passwd";

/// The nameservers of a resolv.conf, split by where they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nameservers {
    /// Reached over the network: UDP to them passes (for `allow_udp` rules
    /// without `cidrs`), their TCP 53 is never redirected.
    pub remote: Vec<IpAddr>,
    /// On loopback: a local stub (systemd-resolved's 127.0.0.53, dnsmasq,
    /// unbound) whose own upstreams are not in the file.
    pub local: Vec<IpAddr>,
}

/// The nameservers of a resolv.conf, in order, without duplicates. A zone
/// (`fe80::1%eth0`) is dropped; lines that do not parse are ignored, as the
/// C library does.
pub fn parse_nameservers(text: &str) -> Nameservers {
    let mut out = Nameservers::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let ip = canonical_ip(ip);
            let list = if ip.is_loopback() {
                &mut out.local
            } else {
                &mut out.remote
            };
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    out
}

/// One socket of a /proc/net/{udp,tcp}{,6} table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketEntry {
    pub local: IpAddr,
    pub port: u16,
    /// TCP state (0x0A = LISTEN); UDP sockets show 0x07.
    pub state: u8,
    pub uid: u32,
}

/// Parses a /proc/net/{udp,tcp}{,6} table. The kernel prints each 32-bit
/// word of the address in host byte order, the port as a number. Lines that
/// do not parse are skipped.
pub fn parse_proc_net(text: &str) -> Vec<SocketEntry> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid ...
        if f.len() < 8 {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let (Some(local), Ok(port), Ok(state), Ok(uid)) = (
            parse_hex_addr(addr),
            u16::from_str_radix(port, 16),
            u8::from_str_radix(f[3], 16),
            f[7].parse::<u32>(),
        ) else {
            continue;
        };
        out.push(SocketEntry {
            local,
            port,
            state,
            uid,
        });
    }
    out
}

fn parse_hex_addr(s: &str) -> Option<IpAddr> {
    let word = |w: &str| u32::from_str_radix(w, 16).ok().map(u32::to_ne_bytes);
    match s.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(s)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&s[i * 8..i * 8 + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

const TCP_LISTEN: u8 = 0x0A;

/// The uids owning a DNS socket that serves `stub`: bound to port 53 on that
/// address (or on the wildcard address, which serves it too), UDP sockets of
/// any state and listening TCP sockets.
pub fn stub_owners(stub: IpAddr, udp: &[SocketEntry], tcp: &[SocketEntry]) -> Vec<u32> {
    let serves = |e: &SocketEntry| {
        e.port == 53 && (canonical_ip(e.local) == stub || e.local.is_unspecified())
    };
    let mut uids: Vec<u32> = udp
        .iter()
        .filter(|e| serves(e))
        .chain(tcp.iter().filter(|e| serves(e) && e.state == TCP_LISTEN))
        .map(|e| e.uid)
        .collect();
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// The uid of `name` in an /etc/passwd text.
pub fn passwd_uid(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

/// A loopback nameserver and the uids that own its port-53 sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stub {
    pub addr: IpAddr,
    pub uids: Vec<u32>,
}

/// Everything `init` learns on the target host; [`super::render`] turns it
/// into rules, and `--dry-run` prints it as comments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The resolv.conf read, as named (for the comments).
    pub resolv_conf: String,
    pub resolvers: Vec<IpAddr>,
    pub stubs: Vec<Stub>,
    /// `dhcp_client_uids` as numbers, with the name each came from.
    pub dhcp_uids: Vec<(u32, Option<String>)>,
    /// What the operator should know (stderr).
    pub warnings: Vec<String>,
}

impl HostFacts {
    /// Facts from a resolver list alone (no stub; names in
    /// `dhcp_client_uids` are left out): for tests and callers that only know
    /// the resolvers.
    pub fn from_resolvers(cfg: &Config, resolvers: &[IpAddr]) -> HostFacts {
        HostFacts {
            resolv_conf: "(given)".into(),
            resolvers: resolvers.iter().map(|ip| canonical_ip(*ip)).collect(),
            dhcp_uids: cfg
                .redirect
                .dhcp_client_uids
                .iter()
                .filter_map(|u| match u {
                    UserRef::Id(n) => Some((*n, None)),
                    UserRef::Name(_) => None,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Reads the host: resolv.conf (`PORTCULLIS_RESOLV_CONF`, default
    /// /etc/resolv.conf; missing means no resolvers), the socket tables of
    /// this network namespace (`PORTCULLIS_PROC_NET`) when resolv.conf names
    /// a loopback resolver, and /etc/passwd when `dhcp_client_uids` holds names.
    pub fn gather(cfg: &Config) -> Result<HostFacts, InitError> {
        let path = std::env::var_os(RESOLV_CONF_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF));
        let ns = match std::fs::read_to_string(&path) {
            Ok(text) => parse_nameservers(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Nameservers::default(),
            Err(source) => {
                return Err(InitError::ResolvConf {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let proc_net = std::env::var_os(PROC_NET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PROC_NET));
        let passwd = if cfg
            .redirect
            .dhcp_client_uids
            .iter()
            .any(|u| matches!(u, UserRef::Name(_)))
        {
            std::fs::read_to_string(PASSWD).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Self::build(
            cfg,
            &path.display().to_string(),
            ns,
            |name| std::fs::read_to_string(proc_net.join(name)).unwrap_or_default(),
            &passwd,
        ))
    }

    /// [`HostFacts::gather`] without the file system.
    pub fn build(
        cfg: &Config,
        resolv_conf: &str,
        ns: Nameservers,
        proc_net: impl Fn(&str) -> String,
        passwd: &str,
    ) -> HostFacts {
        let mut warnings = Vec::new();
        let mut stubs = Vec::new();
        if !ns.local.is_empty() {
            let table = |names: [&str; 2]| -> Vec<SocketEntry> {
                names
                    .iter()
                    .flat_map(|n| parse_proc_net(&proc_net(n)))
                    .collect()
            };
            let udp = table(["udp", "udp6"]);
            let tcp = table(["tcp", "tcp6"]);
            for addr in &ns.local {
                let uids = stub_owners(*addr, &udp, &tcp);
                if uids.is_empty() {
                    warnings.push(format!(
                        "{resolv_conf} names the local resolver {addr}, but no socket listens on its port 53 now: start it before `portcullis init`, or its queries to its upstreams are refused"
                    ));
                } else if uids.contains(&0) {
                    warnings.push(format!(
                        "the local resolver {addr} runs as root: port 53 passes for every root process"
                    ));
                }
                stubs.push(Stub { addr: *addr, uids });
            }
        }
        let mut dhcp_uids: Vec<(u32, Option<String>)> = Vec::new();
        for u in &cfg.redirect.dhcp_client_uids {
            let entry = match u {
                UserRef::Id(n) => (*n, None),
                UserRef::Name(name) => match passwd_uid(passwd, name) {
                    Some(n) => (n, Some(name.clone())),
                    None => {
                        warnings.push(format!(
                            "[redirect] dhcp_client_uids: no user `{name}` in {PASSWD}: left out"
                        ));
                        continue;
                    }
                },
            };
            if !dhcp_uids.iter().any(|(n, _)| *n == entry.0) {
                dhcp_uids.push(entry);
            }
        }
        HostFacts {
            resolv_conf: resolv_conf.to_string(),
            resolvers: ns.remote,
            stubs,
            dhcp_uids,
            warnings,
        }
    }

    /// Every uid owning a local stub's socket, once.
    pub fn stub_uids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.stubs.iter().flat_map(|s| s.uids.clone()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// What was chosen, one line each: `--dry-run` prints them as comments,
    /// `init` after its summary.
    pub fn describe(&self, filter: bool, any_udp_to_resolvers: bool) -> Vec<String> {
        let mut out = Vec::new();
        let list = |v: &[IpAddr]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out.push(format!(
            "resolvers (nameservers in {}): {}{}",
            self.resolv_conf,
            list(&self.resolvers),
            if filter && any_udp_to_resolvers {
                "; allow_udp rules without cidrs reach these only"
            } else {
                ""
            }
        ));
        for s in &self.stubs {
            if s.uids.is_empty() {
                out.push(format!(
                    "local resolver {}: no socket on its port 53, nothing passes for it",
                    s.addr
                ));
            } else {
                let uids: Vec<String> = s.uids.iter().map(|u| format!("uid {u}")).collect();
                out.push(format!(
                    "local resolver {}: UDP and TCP 53 pass for {}, the owner of its socket",
                    s.addr,
                    uids.join(", ")
                ));
            }
        }
        if filter {
            let uids: Vec<String> = self
                .dhcp_uids
                .iter()
                .map(|(n, name)| match name {
                    Some(name) => format!("{n} ({name})"),
                    None => n.to_string(),
                })
                .collect();
            out.push(format!(
                "dhcp_client_uids: {}",
                if uids.is_empty() {
                    "none (no DHCP request leaves)".to_string()
                } else {
                    uids.join(", ")
                }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\n; nameserver 198.51.100.1\nnameserver bogus\nnameserver ::ffff:198.51.100.9\nnameserver ::1\noptions ndots:5\n";
        let ns = parse_nameservers(text);
        let s = |v: &[IpAddr]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(s(&ns.remote), ["192.0.2.53", "fe80::1", "198.51.100.9"]);
        assert_eq!(s(&ns.local), ["127.0.0.53", "::1"]);
    }

    // Captured on this machine (x86_64, little-endian): a stub on
    // 127.0.0.53:53 as uid 991, dnsmasq on [::]:53 as uid 0, others.
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  1: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   991        0 1234 2 0000000000000000 0\n  2: 0100007F:0BB8 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1235 2 0000000000000000 0\n garbage line\n";
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 3500007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   991        0 99 1 0000000000000000 100 0 0 10 0\n   1: 3500007F:0035 0200007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 98 1 0000000000000000 100 0 0 10 0\n";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n 5: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 77 2 0000000000000000 0\n 6: 000080FE00000000FF030201FF050400:0222 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   998        0 78 2 0000000000000000 0\n";

    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_tables() {
        let udp = parse_proc_net(UDP);
        assert_eq!(udp.len(), 2);
        assert_eq!(udp[0].local.to_string(), "127.0.0.53");
        assert_eq!((udp[0].port, udp[0].uid), (53, 991));
        let udp6 = parse_proc_net(UDP6);
        assert_eq!(udp6[0].local.to_string(), "::");
        assert_eq!(udp6[1].local.to_string(), "fe80::102:3ff:4:5ff");
        assert_eq!(udp6[1].port, 546);
        let tcp = parse_proc_net(TCP);
        let stub: IpAddr = "127.0.0.53".parse().unwrap();
        // the connected TCP socket of uid 1000 is no listener
        assert_eq!(stub_owners(stub, &udp, &tcp), vec![991]);
        // a wildcard socket serves the stub address too
        let all: Vec<SocketEntry> = udp.iter().chain(&udp6).copied().collect();
        assert_eq!(stub_owners(stub, &all, &tcp), vec![0, 991]);
        assert!(stub_owners("127.0.0.1".parse().unwrap(), &udp, &tcp).is_empty());
    }

    #[test]
    fn passwd() {
        let p = "root:x:0:0:root:/root:/bin/bash\nsystemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin\nbad:x:notanumber:1::/:\n";
        assert_eq!(passwd_uid(p, "root"), Some(0));
        assert_eq!(passwd_uid(p, "systemd-network"), Some(998));
        assert_eq!(passwd_uid(p, "systemd"), None);
        assert_eq!(passwd_uid(p, "bad"), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn facts() {
        let cfg = Config::parse(
            Path::new("t.toml"),
            "[redirect]\ndhcp_client_uids = [0, \"systemd-network\", \"nobody-here\", 998]\n",
        )
        .unwrap();
        let ns = parse_nameservers("nameserver 127.0.0.53\nnameserver 192.0.2.53\n");
        let f = HostFacts::build(
            &cfg,
            "r.conf",
            ns,
            |n| match n {
                "udp" => UDP.into(),
                "tcp" => TCP.into(),
                _ => String::new(),
            },
            "systemd-network:x:998:998::/:/usr/sbin/nologin\n",
        );
        assert_eq!(f.stub_uids(), vec![991]);
        assert_eq!(
            f.dhcp_uids,
            vec![(0, None), (998, Some("systemd-network".into()))]
        );
        assert_eq!(f.warnings.len(), 1, "{:?}", f.warnings);
        assert!(f.warnings[0].contains("nobody-here"));
        let d = f.describe(true, true).join("\n");
        assert!(d.contains("resolvers (nameservers in r.conf): 192.0.2.53; allow_udp"));
        assert!(d.contains("local resolver 127.0.0.53: UDP and TCP 53 pass for uid 991"));
        assert!(d.contains("dhcp_client_uids: 0, 998 (systemd-network)"));
        // a stub nobody serves is a warning
        let f = HostFacts::build(
            &cfg,
            "r.conf",
            parse_nameservers("nameserver ::1\n"),
            |_| String::new(),
            "",
        );
        assert!(f.warnings.iter().any(|w| w.contains("no socket listens")));
    }
}
