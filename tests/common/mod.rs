//! End-to-end test harness for portcullis (docs/DESIGN.md §6). Use from an
//! integration test with `mod common;` and `use common::*;`.
//!
//! A [`World`] is two network namespaces joined by a veth pair:
//!
//! ```text
//!  pod  (eth0 192.0.2.2/24, 2001:db8::2/64)            the proxy and the "app" live here
//!    |  default routes via 192.0.2.1 / 2001:db8::1
//!  inet (eth0 192.0.2.1/24, 2001:db8::1/64 + upstream addresses, see `addr`)
//!        dnsmasq on 192.0.2.53 / 2001:db8::53, tests/upstreams.py on every address
//! ```
//!
//! and optionally (`WorldBuilder::lan`) a third namespace "lan" behind the pod
//! (198.18.0.2/24, 2001:db8:ff::2/64, routed through the pod's `lan0`, the pod
//! forwarding) for gateway-mode (`capture_interfaces = ["lan0"]`) tests.
//!
//! Every namespace has /etc/netns/NAME/{resolv.conf,hosts,nsswitch.conf}, so a
//! process started with `ip netns exec` (all of [`Cmd`] with `.ns(..)`, `run_in`,
//! `spawn_in`, `curl`, ...) resolves names only through the world's dnsmasq.
//! Everything is removed when the World drops, also when the test panics; the
//! logs of every process the world started are printed on a panic.

#![allow(dead_code, unused_imports, unused_macros)]

mod bulk;
mod lone;
mod netns;
mod pki;
mod proc;
mod proxy;

pub use bulk::*;
pub use lone::*;
pub use netns::*;
pub use pki::*;
pub use proc::*;
pub use proxy::*;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The uid (and gid) the proxy runs as in tests, as in the example config.
pub const PROXY_UID: u32 = 1337;
/// An ordinary application uid (its traffic is redirected).
pub const APP_UID: u32 = 1000;

/// Addresses of the test world.
pub mod addr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub const POD_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    pub const POD_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
    /// the inet side of the veth: the pod's default gateway (upstreams answer here too)
    pub const GW_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    pub const GW_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    /// upstream addresses (all served by tests/upstreams.py)
    pub const API_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    pub const API_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
    pub const FILES_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11));
    pub const FILES_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11));
    pub const OTHER_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    pub const ORG_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
    /// the world's resolver (dnsmasq)
    pub const DNS_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53));
    pub const DNS_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53));
    /// routed to inet, which drops it silently: connecting there times out
    pub const BLACKHOLE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 99));
    pub const BLACKHOLE_V6: IpAddr =
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xdead, 0, 0, 0, 0, 1));
    /// the lan namespace (WorldBuilder::lan) and the pod's side of that link
    pub const LAN_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    pub const LAN_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2));
    pub const POD_LAN_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    pub const POD_LAN_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1));
}

/// Ports served by tests/upstreams.py on every inet address (see that file).
pub mod port {
    /// TLS; HTTP/1.1 inside; body `tls ok sni=<sni|-> local=<addr>\n`
    pub const TLS: u16 = 443;
    pub const TLS_ALT: u16 = 8443;
    /// plain HTTP/1.1; body `http ok host=<Host|-> local=<addr>\n`; `GET /bytes/N` gives N pattern bytes
    pub const HTTP: u16 = 80;
    pub const HTTP_ALT: u16 = 8080;
    /// echo until EOF, then half-closes
    pub const ECHO: u16 = 7000;
    /// reads until EOF, then `got <n> bytes\n`
    pub const HALF_CLOSE: u16 = 7001;
    /// reads once, then closes with RST
    pub const RESET: u16 = 7003;
    /// server-first: `BANNER <addr>\r\n` on accept, then echo
    pub const BANNER: u16 = 2222;
    /// `SEND n\n` / `RECV n\n` bulk service (see bulk.rs)
    pub const BULK: u16 = 9000;
    /// nothing listens here on any upstream address: connecting is refused (RST)
    pub const CLOSED: u16 = 9;
}

/// The DNS records a world serves unless told otherwise (name, IP).
pub const DEFAULT_DNS: &[(&str, &str)] = &[
    ("api.example.com", "192.0.2.10"),
    ("api.example.com", "2001:db8::10"),
    ("a.files.example.com", "192.0.2.11"),
    ("a.files.example.com", "2001:db8::11"),
    ("b.files.example.com", "192.0.2.11"),
    ("other.example.net", "198.51.100.7"),
    ("www.example.org", "203.0.113.5"),
    ("v4only.example.com", "192.0.2.10"),
    ("v6only.example.com", "2001:db8::10"),
    ("blackhole.example.com", "203.0.113.99"),
];

/// Where the upstream servers' script is.
pub const UPSTREAMS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upstreams.py");

/// The portcullis binary cargo built for these tests.
pub fn portcullis_bin() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// `addr:port` as a SocketAddr.
pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

pub(crate) fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs a setup command on the host (never a network-changing one) or in a
/// namespace; panics with its output if it fails.
#[track_caller]
pub(crate) fn must(cmd: Cmd) -> Output {
    let out = cmd.run();
    assert!(out.success(), "setup command failed: {out:?}");
    out
}

/// Writes `dir/name` (mode 0644, readable by the uids tests run as); its path.
pub(crate) fn write_file_in(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    set_mode(&p, 0o644);
    p
}

/// pod, inet, lan of a world; `n` for a lone [`Netns`] (lone.rs).
const NS_SUFFIXES: [char; 4] = ['p', 'i', 'l', 'n'];

/// Whether `ns` is a name this harness makes: pc<pid hex>x<counter hex><p|i|l|n>;
/// returns the pid.
fn harness_ns_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix("pc")?;
    let rest = rest.strip_suffix(NS_SUFFIXES)?;
    let (pid, n) = rest.split_once('x')?;
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process inside `ns` (they can only be ones tests started) and
/// deletes the namespace and its /etc/netns directory.
pub(crate) fn destroy_ns(ns: &str) {
    if netns_path(ns).exists() {
        for _ in 0..100 {
            let pids = Cmd::new("ip").args(["netns", "pids", ns]).run();
            let pids: Vec<i32> = pids
                .stdout
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p > 1 && p != std::process::id() as i32)
                .collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: plain kill(2) of a process living in our test namespace.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = Cmd::new("ip").args(["netns", "del", ns]).run();
        if !out.success() && netns_path(ns).exists() {
            eprintln!("warning: could not delete netns {ns}: {out:?}");
        }
    }
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Once per test process: remove namespaces left by test processes that died
/// without cleaning up (SIGKILL, Ctrl-C).
fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut names: Vec<String> = netns_list();
        if let Ok(rd) = std::fs::read_dir("/etc/netns") {
            names.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        names.sort();
        names.dedup();
        for ns in names {
            let Some(pid) = harness_ns_pid(&ns) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                destroy_ns(&ns);
                let base = &ns[..ns.len() - 1];
                let _ = std::fs::remove_dir_all(
                    std::env::temp_dir().join(format!("portcullis-{base}")),
                );
            }
        }
    });
}

fn parse_records(records: &[(&str, &str)]) -> Vec<(String, IpAddr)> {
    records
        .iter()
        .map(|(n, ip)| {
            let ip: IpAddr = ip
                .parse()
                .unwrap_or_else(|_| panic!("bad IP {ip:?} for {n}"));
            (n.to_string(), ip)
        })
        .collect()
}

fn hosts_text(records: &[(String, IpAddr)]) -> String {
    records
        .iter()
        .map(|(n, ip)| format!("{ip} {n}\n"))
        .collect()
}

/// Configures a world before it starts. `World::builder().dns(..).start()`.
#[derive(Clone, Debug)]
pub struct WorldBuilder {
    dns: Vec<(String, IpAddr)>,
    dns_ttl: u32,
    lan: bool,
    upstreams: bool,
}

impl WorldBuilder {
    /// Replaces the DNS records (default [`DEFAULT_DNS`]); a name may appear
    /// several times (A and AAAA, or several A). Names not listed answer NXDOMAIN;
    /// a listed name without a record of the asked type answers NODATA.
    pub fn dns(mut self, records: &[(&str, &str)]) -> Self {
        self.dns = parse_records(records);
        self
    }

    /// Adds records to the current ones.
    pub fn add_dns(mut self, records: &[(&str, &str)]) -> Self {
        self.dns.extend(parse_records(records));
        self
    }

    /// TTL of the answers, seconds (default 5).
    pub fn dns_ttl(mut self, secs: u32) -> Self {
        self.dns_ttl = secs;
        self
    }

    /// Also build the "lan" namespace behind the pod (gateway mode).
    pub fn lan(mut self, yes: bool) -> Self {
        self.lan = yes;
        self
    }

    /// Whether to start tests/upstreams.py in inet (default true).
    pub fn upstreams(mut self, yes: bool) -> Self {
        self.upstreams = yes;
        self
    }

    pub fn start(self) -> World {
        World::start_with(self)
    }
}

/// A test world. See the module documentation.
pub struct World {
    /// common prefix of the namespace names
    pub name: String,
    /// namespace names
    pub pod: String,
    pub inet: String,
    pub lan: Option<String>,
    /// a directory (mode 0755, readable by the proxy's uid) for configs and logs
    pub dir: PathBuf,
    dns_hosts: PathBuf,
    dns_log: PathBuf,
    dns_ttl: u32,
    dnsmasq: Mutex<Option<Proc>>,
    upstreams: Mutex<Option<Proc>>,
    /// (label, command, stdout, stderr) of every process the world started, for panic dumps
    logs: Mutex<Vec<(String, String, PathBuf, PathBuf)>>,
    seq: AtomicUsize,
    created: Mutex<Vec<String>>,
}

static WORLD_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name base no namespace of this process uses yet (`pc<pid>x<n>`, a suffix
/// of [`NS_SUFFIXES`] to come); stale namespaces of dead test processes are
/// swept first.
pub(crate) fn fresh_base() -> String {
    sweep_stale();
    let pid = std::process::id();
    let base = loop {
        let n = WORLD_SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("pc{pid:x}x{n:x}");
        let clash = NS_SUFFIXES.iter().any(|s| {
            let ns = format!("{base}{s}");
            netns_path(&ns).exists() || Path::new("/etc/netns").join(&ns).exists()
        });
        if !clash {
            break base;
        }
    };
    assert!(base.len() < 15, "namespace name too long: {base}");
    base
}

impl World {
    pub fn builder() -> WorldBuilder {
        WorldBuilder {
            dns: parse_records(DEFAULT_DNS),
            dns_ttl: 5,
            lan: false,
            upstreams: true,
        }
    }

    /// A world with the default DNS records, upstreams running.
    pub fn start() -> World {
        World::builder().start()
    }

    fn start_with(b: WorldBuilder) -> World {
        let t0 = Instant::now();
        let base = fresh_base();
        let dir = std::env::temp_dir().join(format!("portcullis-{base}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create world dir");
        set_mode(&dir, 0o755);

        let mut w = World {
            pod: format!("{base}p"),
            inet: format!("{base}i"),
            lan: b.lan.then(|| format!("{base}l")),
            name: base,
            dns_hosts: dir.join("dns.hosts"),
            dns_log: dir.join("dnsmasq.log"),
            dir,
            dns_ttl: b.dns_ttl,
            dnsmasq: Mutex::new(None),
            upstreams: Mutex::new(None),
            logs: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
            created: Mutex::new(Vec::new()),
        };
        // from here on, a panic drops `w`, which removes whatever exists
        w.build_network();
        w.write_hosts(&b.dns);
        w.start_services(b.upstreams);
        if std::env::var_os("PORTCULLIS_TEST_VERBOSE").is_some() {
            eprintln!("world {} up in {:?}", w.name, t0.elapsed());
        }
        w
    }

    fn all_ns(&self) -> Vec<String> {
        let mut v = vec![self.pod.clone(), self.inet.clone()];
        v.extend(self.lan.clone());
        v
    }

    fn build_network(&mut self) {
        for ns in self.all_ns() {
            // /etc/netns first: nothing may run in the namespace before it exists
            let etc = Path::new("/etc/netns").join(&ns);
            self.created.lock().unwrap().push(ns.clone());
            std::fs::create_dir_all(&etc).expect("create /etc/netns/NS");
            set_mode(&etc, 0o755);
            let files = [
                (
                    "resolv.conf",
                    "nameserver 192.0.2.53\nnameserver 2001:db8::53\noptions timeout:2 attempts:2\n",
                ),
                (
                    "hosts",
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                ),
                (
                    "nsswitch.conf",
                    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
                     networks: files\nprotocols: files\nservices: files\n",
                ),
            ];
            for (f, text) in files {
                std::fs::write(etc.join(f), text).expect("write /etc/netns file");
                set_mode(&etc.join(f), 0o644);
            }
            must(Cmd::new("ip").args(["netns", "add", &ns]));
        }
        let (pod, inet) = (self.pod.clone(), self.inet.clone());
        // veth created directly across the two namespaces: the machine's own
        // namespace never sees it
        must(Cmd::new("ip").args([
            "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &inet,
        ]));
        let mut pod_cfg = String::from(
            "link set lo up\n\
             link set eth0 up\n\
             addr add 192.0.2.2/24 dev eth0\n\
             addr add 2001:db8::2/64 dev eth0 nodad\n\
             route add default via 192.0.2.1 dev eth0\n\
             route add default via 2001:db8::1 dev eth0\n",
        );
        let mut inet_cfg = String::from(
            "link set lo up\n\
             link set eth0 up\n\
             addr add 192.0.2.1/24 dev eth0\n\
             addr add 2001:db8::1/64 dev eth0 nodad\n",
        );
        for a in [
            "192.0.2.10",
            "192.0.2.11",
            "192.0.2.53",
            "198.51.100.7",
            "203.0.113.5",
        ] {
            inet_cfg.push_str(&format!("addr add {a}/32 dev eth0\n"));
        }
        for a in ["2001:db8::10", "2001:db8::11", "2001:db8::53"] {
            inet_cfg.push_str(&format!("addr add {a}/128 dev eth0 nodad\n"));
        }
        if let Some(lan) = self.lan.clone() {
            must(Cmd::new("ip").args([
                "-n", &pod, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns",
                &lan,
            ]));
            pod_cfg.push_str(
                "link set lan0 up\n\
                 addr add 198.18.0.1/24 dev lan0\n\
                 addr add 2001:db8:ff::1/64 dev lan0 nodad\n",
            );
            inet_cfg.push_str(
                "route add 198.18.0.0/24 via 192.0.2.2 dev eth0\n\
                 route add 2001:db8:ff::/64 via 2001:db8::2 dev eth0\n",
            );
            must(Cmd::new("ip").args(["-n", &lan, "-b", "-"]).stdin(
                "link set lo up\n\
                 link set eth0 up\n\
                 addr add 198.18.0.2/24 dev eth0\n\
                 addr add 2001:db8:ff::2/64 dev eth0 nodad\n\
                 route add default via 198.18.0.1 dev eth0\n\
                 route add default via 2001:db8:ff::1 dev eth0\n",
            ));
            must(Cmd::new("sysctl").ns(&pod).args([
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]));
        }
        must(Cmd::new("ip").args(["-n", &pod, "-b", "-"]).stdin(pod_cfg));
        must(
            Cmd::new("ip")
                .args(["-n", &inet, "-b", "-"])
                .stdin(inet_cfg),
        );
    }

    fn write_hosts(&self, records: &[(String, IpAddr)]) {
        let tmp = self.dir.join("dns.hosts.tmp");
        std::fs::write(&tmp, hosts_text(records)).expect("write dns hosts");
        set_mode(&tmp, 0o644);
        std::fs::rename(&tmp, &self.dns_hosts).expect("rename dns hosts");
    }

    fn dnsmasq_cmd(&self) -> Cmd {
        let hosts = self.dns_hosts.to_string_lossy().into_owned();
        Cmd::new("dnsmasq").label("dnsmasq").args([
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            format!("--addn-hosts={hosts}"),
            // names not in the hosts file: NXDOMAIN, never forwarded
            "--address=/#/".into(),
            "--bind-interfaces".into(),
            "--listen-address=192.0.2.53".into(),
            "--listen-address=2001:db8::53".into(),
            "--port=53".into(),
            format!("--local-ttl={}", self.dns_ttl),
            "--neg-ttl=1".into(),
            "--no-negcache".into(),
            "--user=root".into(),
            "--group=root".into(),
            format!("--pid-file={}", self.dir.join("dnsmasq.pid").display()),
            "--log-queries".into(),
            format!("--log-facility={}", self.dns_log.display()),
        ])
    }

    fn start_services(&self, upstreams: bool) {
        *self.dnsmasq.lock().unwrap() = Some(self.spawn_in(&self.inet, self.dnsmasq_cmd()));
        if upstreams {
            let pki = pki();
            let up = self.spawn_in(
                &self.inet,
                Cmd::new(python()).label("upstreams").args([
                    "-u",
                    UPSTREAMS_PY,
                    "--cert",
                    &pki.cert.to_string_lossy(),
                    "--key",
                    &pki.key.to_string_lossy(),
                ]),
            );
            *self.upstreams.lock().unwrap() = Some(up);
        }
        self.wait_dns();
        if upstreams {
            let mut g = self.upstreams.lock().unwrap();
            let p = g.as_mut().unwrap();
            let t = Duration::from_secs(10);
            assert!(
                p.wait_output("READY", t),
                "upstreams did not come up: {p:?}"
            );
        }
    }

    fn wait_dns(&self) {
        let t = Duration::from_secs(10);
        let dns_up = wait_udp_in(&self.inet, sa(addr::DNS_V4, 53), t)
            && wait_udp_in(&self.inet, sa(addr::DNS_V6, 53), t);
        if !dns_up {
            let mut g = self.dnsmasq.lock().unwrap();
            panic!("dnsmasq did not come up: {:?}", g.as_mut());
        }
    }

    /// Stops the world's resolver (queries then go unanswered: port unreachable).
    pub fn stop_dns(&self) {
        let p = self.dnsmasq.lock().unwrap().take();
        drop(p);
    }

    /// Starts the resolver again (after `stop_dns`), with the current records.
    pub fn start_dns(&self) {
        let mut g = self.dnsmasq.lock().unwrap();
        if g.is_none() {
            *g = Some(self.spawn_in(&self.inet, self.dnsmasq_cmd()));
        }
        drop(g);
        self.wait_dns();
    }

    /// The connections the upstreams accepted so far, as (local, peer): proves
    /// whether a flow reached an upstream at all.
    pub fn upstream_accepts(&self) -> Vec<(SocketAddr, SocketAddr)> {
        let g = self.upstreams.lock().unwrap();
        let Some(p) = g.as_ref() else {
            return Vec::new();
        };
        p.stdout()
            .lines()
            .filter_map(|l| {
                let mut it = l.strip_prefix("ACCEPT ")?.split(' ');
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect()
    }

    // ------------------------------------------------------------ processes

    /// Runs `cmd` inside namespace `ns` to completion (see [`Cmd`] for uid, stdin, timeout).
    pub fn run_in(&self, ns: &str, cmd: Cmd) -> Output {
        cmd.ns(ns).run()
    }

    /// Starts `cmd` inside namespace `ns`; the guard kills it (by pid/process
    /// group) when dropped. Its output goes to files in `self.dir`, shown on panic.
    pub fn spawn_in(&self, ns: &str, cmd: Cmd) -> Proc {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let p = cmd.ns(ns).spawn_logged(&self.dir, n);
        self.logs.lock().unwrap().push((
            p.label.clone(),
            p.command.clone(),
            p.stdout_path().to_path_buf(),
            p.stderr_path().to_path_buf(),
        ));
        p
    }

    pub fn run_pod(&self, cmd: Cmd) -> Output {
        self.run_in(&self.pod, cmd)
    }

    pub fn spawn_pod(&self, cmd: Cmd) -> Proc {
        self.spawn_in(&self.pod, cmd)
    }

    /// `portcullis ARGS` run to completion in the pod as root (init, check, explain, ...).
    pub fn portcullis(&self, args: &[&str]) -> Output {
        self.run_pod(
            Cmd::new(portcullis_bin())
                .args(args)
                .timeout(Duration::from_secs(30)),
        )
    }

    /// `portcullis ARGS` started in the pod as PROXY_UID:PROXY_UID (e.g. `["run", "-c", cfg]`).
    pub fn spawn_proxy(&self, args: &[&str]) -> Proc {
        self.spawn_pod(
            Cmd::new(portcullis_bin())
                .label("portcullis")
                .args(args)
                .user(PROXY_UID, PROXY_UID),
        )
    }

    /// Waits (up to 10 s, panicking after) until something in `ns` listens on
    /// `addr` (unspecified IP = any address, that port). It never connects.
    #[track_caller]
    pub fn wait_tcp(&self, ns: &str, addr: SocketAddr) {
        assert!(
            wait_tcp_in(ns, addr, Duration::from_secs(10)),
            "nothing listens on {addr} in {ns}; listeners: {:?}",
            tcp_listeners(ns)
        );
    }

    // ------------------------------------------------------------ clients

    /// A TCP connection from the pod (owned by the test process, uid 0, so it
    /// is subject to the pod's REDIRECT rules). 5 s connect timeout.
    pub fn pod_connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(&self.pod, addr, Duration::from_secs(5))
    }

    /// Same, from any namespace of the world.
    pub fn connect(&self, ns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(ns, addr, Duration::from_secs(5))
    }

    /// `curl -q -sS --max-time 20 --cacert <test CA> ARGS`, not yet placed in a namespace.
    pub fn curl_cmd(&self, args: &[&str]) -> Cmd {
        Cmd::new("curl")
            .args(["-q", "-sS", "--max-time", "20", "--cacert"])
            .arg(&pki().ca_cert)
            .args(args)
            .timeout(Duration::from_secs(30))
    }

    /// curl in the pod as root (redirected like any app).
    pub fn curl(&self, args: &[&str]) -> Output {
        self.run_pod(self.curl_cmd(args))
    }

    /// curl in the pod as uid/gid.
    pub fn curl_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        self.run_pod(self.curl_cmd(args).user(uid, gid))
    }

    /// `openssl s_client -connect CONNECT -CAfile <test CA> -verify_return_error
    /// -ign_eof ARGS` in the pod, with `input` on stdin. Add `-servername NAME` or
    /// `-noservername`; `-brief` shortens the output. With -ign_eof it runs until
    /// the server closes, so send `Connection: close` in HTTP requests.
    pub fn s_client(&self, connect: &str, args: &[&str], input: &[u8]) -> Output {
        self.run_pod(
            Cmd::new("openssl")
                .args(["s_client", "-connect", connect, "-CAfile"])
                .arg(&pki().ca_cert)
                .args(["-verify_return_error", "-ign_eof"])
                .args(args)
                .stdin(input.to_vec())
                .env("OPENSSL_CONF", "/dev/null")
                .timeout(Duration::from_secs(30)),
        )
    }

    // ------------------------------------------------------------ DNS

    /// Replaces the DNS records while running (dnsmasq re-reads on SIGHUP);
    /// returns once dnsmasq has read the new file.
    pub fn set_dns(&self, records: &[(&str, &str)]) {
        let path = self.dns_hosts.to_string_lossy().into_owned();
        let marker = format!("read {path} - ");
        let reads = || self.dns_log().matches(&marker).count();
        let before = reads();
        self.write_hosts(&parse_records(records));
        let mut g = self.dnsmasq.lock().unwrap();
        let d = g.as_mut().expect("dnsmasq");
        assert!(d.signal(libc::SIGHUP), "dnsmasq is gone: {d:?}");
        drop(g);
        let reread = poll_until(Duration::from_secs(5), || reads() > before);
        assert!(
            reread,
            "dnsmasq did not re-read {path}:\n{}",
            self.dns_log()
        );
    }

    /// dnsmasq's log (with --log-queries: `query[A] api.example.com from 192.0.2.2` lines).
    pub fn dns_log(&self) -> String {
        std::fs::read_to_string(&self.dns_log).unwrap_or_default()
    }

    /// The (type, name) of every query dnsmasq received so far, e.g. ("AAAA", "api.example.com").
    pub fn dns_queries(&self) -> Vec<(String, String)> {
        self.dns_log()
            .lines()
            .filter_map(|l| {
                let q = &l[l.find("query[")? + 6..];
                let (ty, rest) = q.split_once(']')?;
                let name = rest.split_whitespace().next()?;
                Some((ty.to_string(), name.to_string()))
            })
            .collect()
    }

    // ------------------------------------------------------------ network helpers

    /// Adds an extra address to inet's interface (served by the upstreams, which
    /// listen on every address; routed from the pod by its default route).
    pub fn add_inet_addr(&self, ip: IpAddr) {
        let cidr = match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        };
        let mut args = vec!["-n", &self.inet, "addr", "add", &cidr, "dev", "eth0"];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        must(Cmd::new("ip").args(args));
    }

    /// `portcullis init -c CFG` in the pod (root): the real redirect and
    /// egress rules of the config's `[redirect]` and policy.
    #[track_caller]
    pub fn init(&self, cfg: &std::path::Path) {
        let out = self.portcullis(&["init", "-c", &cfg.to_string_lossy()]);
        assert!(out.success(), "portcullis init failed: {out:?}");
    }

    /// A stand-in for `portcullis init` until it exists: in the pod's nat OUTPUT,
    /// TCP to the documentation ranges (192.0.2.0/24, 198.51.100.0/24,
    /// 203.0.113.0/24, 2001:db8::/32) is REDIRECTed to `port`, except TCP to the
    /// world's resolver on port 53 and, when given, traffic of `exclude_uid`
    /// (the proxy's). Rules live in chain PCTEST_REDIRECT (v4 and v6).
    pub fn redirect(&self, port: u16, exclude_uid: Option<u32>) {
        for (tool, dns, cidrs) in [
            (
                "iptables-restore",
                "192.0.2.53",
                &["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"][..],
            ),
            ("ip6tables-restore", "2001:db8::53", &["2001:db8::/32"][..]),
        ] {
            let mut rules = String::from(
                "*nat\n:PCTEST_REDIRECT - [0:0]\n-A OUTPUT -p tcp -j PCTEST_REDIRECT\n",
            );
            if let Some(uid) = exclude_uid {
                rules.push_str(&format!(
                    "-A PCTEST_REDIRECT -m owner --uid-owner {uid} -j RETURN\n"
                ));
            }
            rules.push_str(&format!(
                "-A PCTEST_REDIRECT -p tcp -d {dns} --dport 53 -j RETURN\n"
            ));
            for c in cidrs {
                rules.push_str(&format!(
                    "-A PCTEST_REDIRECT -p tcp -d {c} -j REDIRECT --to-ports {port}\n"
                ));
            }
            rules.push_str("COMMIT\n");
            must(
                Cmd::new(tool)
                    .ns(&self.pod)
                    .args(["--noflush", "--wait"])
                    .stdin(rules),
            );
        }
    }

    /// Starts a fake proxy in the pod on 0.0.0.0:PORT and [::]:PORT that answers
    /// each connection with `ORIGDST <addr>\n` (its SO_ORIGINAL_DST, or `none`),
    /// then echoes. Returns once it listens.
    pub fn spawn_origdst_listener(&self, port: u16) -> Proc {
        let mut p = self.spawn_pod(Cmd::new(python()).label("origdst").args([
            "-u",
            UPSTREAMS_PY,
            "--origdst",
            &port.to_string(),
        ]));
        assert!(p.wait_output("READY", Duration::from_secs(10)), "{p:?}");
        p
    }

    /// iptables-save and ip6tables-save of `ns`.
    pub fn iptables_save(&self, ns: &str) -> String {
        let v4 = Cmd::new("iptables-save").ns(ns).run();
        let v6 = Cmd::new("ip6tables-save").ns(ns).run();
        format!("{}# ip6tables-save\n{}", v4.stdout, v6.stdout)
    }

    // ------------------------------------------------------------ files

    /// A path inside the world's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a file (mode 0644) into the world's directory; returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        write_file_in(&self.dir, name, contents)
    }

    fn dump(&self) {
        eprintln!(
            "===== world {} (pod {}, inet {}) =====",
            self.name, self.pod, self.inet
        );
        for (label, cmd, out, err) in self.logs.lock().unwrap().iter() {
            eprintln!(
                "=== {label}: `{cmd}`\n--- stdout ---\n{}\n--- stderr ---\n{}",
                proc::file_tail(out, 6000),
                proc::file_tail(err, 6000)
            );
        }
        eprintln!("=== dnsmasq log\n{}", proc::file_tail(&self.dns_log, 3000));
        if netns_path(&self.pod).exists() {
            eprintln!("=== pod rules\n{}", self.iptables_save(&self.pod));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.dump();
        }
        if let Ok(mut g) = self.dnsmasq.lock() {
            drop(g.take());
        }
        if let Ok(mut g) = self.upstreams.lock() {
            drop(g.take());
        }
        let created = self.created.lock().map(|g| g.clone()).unwrap_or_default();
        for ns in created {
            destroy_ns(&ns);
        }
        if panicking && std::env::var_os("PORTCULLIS_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
