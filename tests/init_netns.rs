//! `portcullis init` for real, in network namespaces (docs/DESIGN.md §5, §6).
//!
//! Every iptables command here runs as `ip netns exec NS ...` inside a
//! namespace this test created (`common::Netns`, named `pc<pid>x<n>n`); the machine's own
//! rules are never read or touched. Namespaces, temp files and processes are
//! removed by Drop guards, also when a test panics. Processes are killed by
//! pid. Addresses are documentation ranges only.
//!
//! World of the traffic tests:
//! ```text
//!  pod  eth0 192.0.2.2/24 2001:db8::2/64  -- init's rules, a stand-in proxy on :15001
//!   |
//!  inet eth0 192.0.2.1/24 2001:db8::1/64  -- upstream TCP :8080, TCP :53, UDP echo :53 :443
//! ```
//! The stand-in proxy is a python listener that answers with the original
//! destination (SO_ORIGINAL_DST), so a client sees who answered and for whom.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";
const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

// ---------------------------------------------------------------- guards

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

fn must(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace (the harness's [`common::Netns`]: deleted, with every
/// process inside, on drop) and what this file runs in it.
struct Ns(common::Netns);

impl std::ops::Deref for Ns {
    type Target = common::Netns;
    fn deref(&self) -> &common::Netns {
        &self.0
    }
}

impl Ns {
    fn new() -> Ns {
        Ns(common::Netns::new())
    }

    /// `ip netns exec NAME args...`: the only way this file runs a command
    /// in a namespace (it fails, rather than running outside, if NAME is gone).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    fn ok(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&must(&mut self.cmd(args)).stdout).into_owned()
    }

    fn ip(&self, args: &[&str]) {
        must(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// `portcullis init ARGS` inside the namespace.
    fn init(&self, resolv: &Path, args: &[&str]) -> Output {
        let mut c = self.cmd(&[BIN, "init"]);
        c.args(args).env("PORTCULLIS_RESOLV_CONF", resolv);
        c.output().expect("run portcullis init")
    }

    fn init_ok(&self, resolv: &Path, args: &[&str]) -> String {
        let out = self.init(resolv, args);
        assert!(
            out.status.success(),
            "init {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `iptables-save` (or ip6tables-save) of this namespace, nft backend.
    fn save(&self, v6: bool) -> String {
        self.ok(&[if v6 {
            "ip6tables-nft-save"
        } else {
            "iptables-nft-save"
        }])
    }

    /// `iptables -C` / `ip6tables -C`: whether the rule exists, by meaning.
    fn has_rule(&self, v6: bool, table: &str, chain: &str, spec: &str) -> bool {
        let tool = if v6 { "ip6tables-nft" } else { "iptables-nft" };
        let words = portcullis::init::apply::split_words(spec);
        let mut args = vec![tool, "-w", "-t", table, "-C", chain];
        args.extend(words.iter().map(String::as_str));
        self.run(&args).status.success()
    }

    /// Starts the python helper server in this namespace; returns once it
    /// listens on every spec (`tcp/ADDR/PORT/LABEL`, `udp/ADDR/PORT`).
    fn serve(&self, specs: &[&str]) -> Proc {
        self.serve_as(None, specs)
    }

    /// [`Ns::serve`] as uid/gid `who` (None: root).
    fn serve_as(&self, who: Option<(u32, u32)>, specs: &[&str]) -> Proc {
        let (u, g) = who.map(|(u, g)| (u.to_string(), g.to_string())).unzip();
        let mut argv: Vec<&str> = Vec::new();
        if let (Some(u), Some(g)) = (&u, &g) {
            argv.extend(["setpriv", "--reuid", u, "--regid", g, "--clear-groups"]);
        }
        argv.extend([PYTHON, "-c", SERVER]);
        let mut c = self.cmd(&argv);
        c.args(specs)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawn python server");
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("server output");
        assert_eq!(line.trim(), "ready", "server {specs:?} did not start");
        proc
    }

    /// Runs the python client as `who` (None: root); returns its one line.
    fn client(&self, who: Option<(u32, u32)>, args: &[&str]) -> String {
        self.client_with_timeout(who, args, 3.0)
    }

    fn client_with_timeout(&self, who: Option<(u32, u32)>, args: &[&str], secs: f64) -> String {
        self.client_from(who, None, args, secs)
    }

    /// The client, bound to source port `sport` when given.
    fn client_from(
        &self,
        who: Option<(u32, u32)>,
        sport: Option<u16>,
        args: &[&str],
        secs: f64,
    ) -> String {
        let (u, g) = who.map(|(u, g)| (u.to_string(), g.to_string())).unzip();
        let mut argv: Vec<&str> = Vec::new();
        if let (Some(u), Some(g)) = (&u, &g) {
            argv.extend(["setpriv", "--reuid", u, "--regid", g, "--clear-groups"]);
        }
        argv.extend([PYTHON, "-c", CLIENT]);
        argv.extend(args);
        let mut cmd = self.cmd(&argv);
        cmd.env("CLIENT_TIMEOUT", secs.to_string());
        if let Some(p) = sport {
            cmd.env("CLIENT_SPORT", p.to_string());
        }
        let out = cmd.output().expect("run client");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// A child process, killed by its pid on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temp directory for configs and resolv.conf files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("portcullis-init-"));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Joins `a` and `b` with a veth pair made inside the namespaces (never in
/// the machine's own), addresses given as `ip addr` arguments.
fn link(a: &Ns, a_if: &str, a_addrs: &[&str], b: &Ns, b_if: &str, b_addrs: &[&str]) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["-6", "addr", "add", addr, "dev", ifname, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname]);
            }
        }
        ns.ip(&["link", "set", ifname, "up"]);
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

// ---------------------------------------------------------------- python helpers

/// Server: `tcp/ADDR/PORT/LABEL` answers `LABEL orig=<SO_ORIGINAL_DST>` and
/// closes; `udp/ADDR/PORT` echoes. Prints `ready` once everything listens.
const SERVER: &str = r#"
import socket, struct, sys, threading
def orig(c, fam):
    try:
        if fam == socket.AF_INET:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            return '%s:%d' % (socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack('!H', raw[2:4])[0])
        raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
        return '[%s]:%d' % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack('!H', raw[2:4])[0])
    except OSError:
        return '-'
def tcp(s, label, fam):
    while True:
        c, _ = s.accept()
        try:
            c.sendall(('%s orig=%s\n' % (label, orig(c, fam))).encode())
        except OSError:
            pass
        c.close()
def udp(s):
    while True:
        d, a = s.recvfrom(2048)
        s.sendto(d, a)
threads = []
for spec in sys.argv[1:]:
    parts = spec.split('/')
    kind, addr, port = parts[0], parts[1], int(parts[2])
    fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if kind == 'tcp' else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    if kind == 'tcp':
        s.listen(64)
        threads.append(threading.Thread(target=tcp, args=(s, parts[3], fam), daemon=True))
    else:
        threads.append(threading.Thread(target=udp, args=(s,), daemon=True))
for t in threads:
    t.start()
print('ready', flush=True)
threading.Event().wait()
"#;

/// Client: `tcp|udp ADDR PORT [MARK]` prints what came back, or `ERR <kind>`
/// (`CLIENT_SPORT` in the environment: bind that source port first);
/// UDP also prints how long the answer took (`ms=N`). A UDP send refused
/// locally (EPERM: the packet was rejected in OUTPUT) is noted as `send=...`
/// and the client still reads, where the ICMP error shows as ECONNREFUSED.
const CLIENT: &str = r#"
import os, socket, sys, time
kind, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if kind == 'tcp' else socket.SOCK_DGRAM)
if len(sys.argv) > 4:
    s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[4], 0))
s.settimeout(float(os.environ.get('CLIENT_TIMEOUT', '3')))
if os.environ.get('CLIENT_SPORT'):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('::' if fam == socket.AF_INET6 else '0.0.0.0', int(os.environ['CLIENT_SPORT'])))
t = time.monotonic()
note = ''
try:
    s.connect((addr, port))
    if kind == 'udp':
        try:
            s.send(b'ping')
        except OSError as e:
            note = ' send=%s' % type(e).__name__
    data = s.recv(200).decode().strip()
    print('%s ms=%d' % (data, (time.monotonic() - t) * 1000) if kind == 'udp' else data)
except socket.timeout:
    print('ERR timeout' + note)
except OSError as e:
    print('ERR %s ms=%d%s' % (type(e).__name__, (time.monotonic() - t) * 1000, note))
"#;

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

const APP: Option<(u32, u32)> = Some((1000, 1000));
const PROXY: Option<(u32, u32)> = Some((1337, 1337));

// ---------------------------------------------------------------- tests

/// Applied for real: key rules exist by meaning, a re-run changes nothing, a
/// config change removes what is no longer wanted, `--cleanup` restores the
/// namespace as it was (the operator's own rules untouched throughout).
#[test]
fn apply_rerun_and_cleanup() {
    let ns = Ns::new();
    let tmp = TempDir::new();
    let resolv = tmp.file(
        "resolv.conf",
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\n",
    );
    let cfg = tmp.file("full.toml", FULL_CONFIG);
    let cfg_s = cfg.to_str().expect("utf-8 path");

    // the operator's own rules, which portcullis must leave alone
    ns.ok(&[
        "iptables-nft",
        "-w",
        "-A",
        "OUTPUT",
        "-d",
        "203.0.113.9/32",
        "-j",
        "ACCEPT",
    ]);
    ns.ok(&[
        "iptables-nft",
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "203.0.113.10/32",
        "-j",
        "RETURN",
    ]);
    ns.ok(&[
        "ip6tables-nft",
        "-w",
        "-A",
        "OUTPUT",
        "-d",
        "2001:db8::9/128",
        "-j",
        "ACCEPT",
    ]);
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
    // Key rules, written out by hand.
    let c = |why: &str| format!("-m comment --comment \"portcullis: {why}\"");
    let own = format!(
        "-m owner --uid-owner 1337 --gid-owner 1337 {} -j RETURN",
        c("traffic of the proxy (uid 1337 gid 1337)")
    );
    for v6 in [false, true] {
        assert!(ns.has_rule(v6, "nat", "PORTCULLIS_OUTPUT", &own));
        assert!(ns.has_rule(
            v6,
            "nat",
            "PORTCULLIS_OUTPUT",
            &format!(
                "-m mark --mark 0x539 {} -j RETURN",
                c("traffic the proxy marked (0x539)")
            )
        ));
        assert!(ns.has_rule(
            v6,
            "nat",
            "PORTCULLIS_OUTPUT",
            &format!("-o lo {} -j RETURN", c("loopback"))
        ));
        assert!(ns.has_rule(
            v6,
            "nat",
            "PORTCULLIS_REDIRECT",
            &format!(
                "-p tcp -m multiport --dports 22,25 {} -j RETURN",
                c("exclude_ports 22,25")
            )
        ));
        assert!(ns.has_rule(
            v6,
            "nat",
            "PORTCULLIS_PREROUTING",
            &format!(
                "-m addrtype --dst-type LOCAL {} -j RETURN",
                c("destinations on this host")
            )
        ));
        assert!(ns.has_rule(
            v6,
            "nat",
            "PORTCULLIS_PREROUTING",
            &format!(
                "-i lan0 {} -j PORTCULLIS_REDIRECT",
                c("capture_interfaces lan0")
            )
        ));
        assert!(ns.has_rule(
            v6,
            "filter",
            "PORTCULLIS_FORWARD",
            &format!(
                "-i lan0 {} -j PORTCULLIS_EGRESS",
                c("capture_interfaces lan0")
            )
        ));
        // allow_udp without cidrs: the resolvers only
        let resolver = if v6 { "2001:db8::53" } else { "192.0.2.53" };
        assert!(ns.has_rule(
            v6,
            "filter",
            "PORTCULLIS_EGRESS",
            &format!(
                "-d {resolver} -p udp -m udp --dport 53 {} -j RETURN",
                c(&format!("allow_udp ports 53 to resolver {resolver}"))
            )
        ));
    }
    assert!(ns.has_rule(
        false,
        "nat",
        "PORTCULLIS_OUTPUT",
        &format!(
            "-d 192.0.2.53/32 -p tcp -m tcp --dport 53 {} -j RETURN",
            c("resolver from resolv.conf (DNS over TCP)")
        )
    ));
    assert!(ns.has_rule(
        true,
        "nat",
        "PORTCULLIS_OUTPUT",
        &format!(
            "-d 2001:db8::53/128 -p tcp -m tcp --dport 53 {} -j RETURN",
            c("resolver from resolv.conf (DNS over TCP)")
        )
    ));
    assert!(ns.has_rule(
        false,
        "nat",
        "PORTCULLIS_OUTPUT",
        &format!("-d 127.0.0.0/8 {} -j RETURN", c("loopback destinations"))
    ));
    assert!(ns.has_rule(
        true,
        "nat",
        "PORTCULLIS_OUTPUT",
        &format!("-d ::1/128 {} -j RETURN", c("loopback destinations"))
    ));
    assert!(ns.has_rule(
        false,
        "nat",
        "PORTCULLIS_REDIRECT",
        &format!(
            "-d 198.51.100.0/24 {} -j RETURN",
            c("exclude_cidrs 198.51.100.0/24")
        )
    ));
    assert!(ns.has_rule(
        true,
        "nat",
        "PORTCULLIS_REDIRECT",
        &format!(
            "-d 2001:db8:100::/48 {} -j RETURN",
            c("exclude_cidrs 2001:db8:100::/48")
        )
    ));
    assert!(!ns.has_rule(
        true,
        "nat",
        "PORTCULLIS_REDIRECT",
        &format!(
            "-d 198.51.100.0/24 {} -j RETURN",
            c("exclude_cidrs 198.51.100.0/24")
        )
    ));
    assert!(ns.has_rule(
        false,
        "nat",
        "PORTCULLIS_REDIRECT",
        &format!(
            "-p tcp {} -j REDIRECT --to-ports 15001",
            c("include_cidrs 0.0.0.0/0 to the proxy")
        )
    ));
    assert!(ns.has_rule(
        true,
        "nat",
        "PORTCULLIS_REDIRECT",
        &format!(
            "-p tcp {} -j REDIRECT --to-ports 15001",
            c("include_cidrs ::/0 to the proxy")
        )
    ));
    assert!(ns.has_rule(
        false,
        "filter",
        "PORTCULLIS_EGRESS",
        &format!(
            "-d 192.0.2.123/32 -p udp -m udp --dport 123 {} -j RETURN",
            c("allow_udp ports 123 to 192.0.2.123/32")
        )
    ));
    assert!(ns.has_rule(
        true,
        "filter",
        "PORTCULLIS_EGRESS",
        &format!(
            "-p ipv6-icmp -m icmp6 --icmpv6-type 135 {} -j RETURN",
            c("neighbour solicitation")
        )
    ));
    assert!(ns.has_rule(
        true,
        "filter",
        "PORTCULLIS_EGRESS",
        &format!(
            "-p ipv6-icmp -m icmp6 --icmpv6-type 143 {} -j RETURN",
            c("MLDv2 report")
        )
    ));
    assert!(ns.has_rule(
        false,
        "filter",
        "PORTCULLIS_EGRESS",
        &format!(
            "-p udp {} -j REJECT --reject-with icmp-port-unreachable",
            c("other UDP refused at once (QUIC falls back to TCP)")
        )
    ));
    assert!(ns.has_rule(
        true,
        "filter",
        "PORTCULLIS_EGRESS",
        &format!(
            "-p udp {} -j REJECT --reject-with icmp6-port-unreachable",
            c("other UDP refused at once (QUIC falls back to TCP)")
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
    let any = tmp.file(
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
    let ns = Ns::new();
    let tmp = TempDir::new();
    let resolv = tmp.file("resolv.conf", "");
    let cfg = tmp.file("pod.toml", POD_CONFIG);
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
    let pod = Ns::new();
    let inet = Ns::new();
    link(
        &pod,
        "eth0",
        &["192.0.2.2/24", "2001:db8::2/64"],
        &inet,
        "eth0",
        &["192.0.2.1/24", "2001:db8::1/64"],
    );
    pod.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    pod.ip(&["-6", "route", "add", "default", "via", "2001:db8::1"]);
    let _up = inet.serve(&[
        "tcp/192.0.2.1/8080/upstream",
        "tcp/2001:db8::1/8080/upstream",
        "tcp/192.0.2.1/53/resolver",
        "udp/192.0.2.1/53",
        "udp/2001:db8::1/53",
        "udp/192.0.2.1/443",
        "udp/2001:db8::1/443",
    ]);
    let _proxy = pod.serve(&["tcp/127.0.0.1/15001/proxy", "tcp/::1/15001/proxy"]);

    // before init everything reaches the upstream
    assert!(pod
        .client(APP, &["tcp", "192.0.2.1", "8080"])
        .starts_with("upstream"));
    assert!(pod
        .client(APP, &["udp", "192.0.2.1", "443"])
        .starts_with("ping"));

    let tmp = TempDir::new();
    let resolv = tmp.file(
        "resolv.conf",
        "nameserver 192.0.2.1\nnameserver 2001:db8::1\n",
    );
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);

    let t = |who, addr: &str, port: &str| pod.client(who, &["tcp", addr, port]);
    assert_eq!(t(APP, "192.0.2.1", "8080"), "proxy orig=192.0.2.1:8080");
    assert_eq!(
        t(APP, "2001:db8::1", "8080"),
        "proxy orig=[2001:db8::1]:8080"
    );
    assert!(t(PROXY, "192.0.2.1", "8080").starts_with("upstream"));
    assert!(t(PROXY, "2001:db8::1", "8080").starts_with("upstream"));
    // uid and gid are matched together: the proxy's uid with another gid is redirected
    assert!(t(Some((1337, 1000)), "192.0.2.1", "8080").starts_with("proxy"));
    // root is no exception, but marked packets are
    assert!(t(None, "192.0.2.1", "8080").starts_with("proxy"));
    assert!(pod
        .client(None, &["tcp", "192.0.2.1", "8080", "0x539"])
        .starts_with("upstream"));
    assert!(pod
        .client(None, &["tcp", "2001:db8::1", "8080", "0x539"])
        .starts_with("upstream"));
    // the resolver's TCP port 53 is never redirected
    assert!(t(APP, "192.0.2.1", "53").starts_with("resolver"));

    // UDP: 53 allowed, 443 refused at once (ICMP port unreachable)
    for addr in ["192.0.2.1", "2001:db8::1"] {
        let dns = pod.client(APP, &["udp", addr, "53"]);
        assert!(dns.starts_with("ping"), "{addr}: {dns}");
        let quic = pod.client(APP, &["udp", addr, "443"]);
        assert!(
            quic.starts_with("ERR ConnectionRefusedError"),
            "{addr}: {quic}"
        );
        let ms: u64 = quic
            .split("ms=")
            .nth(1)
            .and_then(|n| n.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(ms < 1000, "refusal took {ms} ms");
        // the proxy's own UDP is not filtered
        assert!(pod.client(PROXY, &["udp", addr, "443"]).starts_with("ping"));
    }
}

/// `ipv6 = false` under REGISTRY_ONLY: IPv6 egress is dropped, IPv4 works.
#[test]
fn ipv6_off_drops_ipv6() {
    let pod = Ns::new();
    let inet = Ns::new();
    link(
        &pod,
        "eth0",
        &["192.0.2.2/24", "2001:db8::2/64"],
        &inet,
        "eth0",
        &["192.0.2.1/24", "2001:db8::1/64"],
    );
    let _up = inet.serve(&[
        "tcp/2001:db8::1/8080/upstream",
        "tcp/192.0.2.1/8080/upstream",
    ]);
    let _proxy = pod.serve(&["tcp/127.0.0.1/15001/proxy"]);
    let tmp = TempDir::new();
    let resolv = tmp.file("resolv.conf", "");
    let cfg = tmp.file(
        "v4.toml",
        "[proxy]\nlisten = [\"127.0.0.1:15001\"]\n[redirect]\nproxy_gid = 1337\ninclude_cidrs = [\"0.0.0.0/0\"]\nipv6 = false\n",
    );
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
    assert!(pod
        .client(APP, &["tcp", "192.0.2.1", "8080"])
        .starts_with("proxy"));
    // dropped (a timeout, not a refusal), for the proxy's uid too
    let started = Instant::now();
    let v6 = pod.client_with_timeout(PROXY, &["tcp", "2001:db8::1", "8080"], 0.5);
    assert_eq!(v6, "ERR timeout");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let v6 = pod.client_with_timeout(APP, &["udp", "2001:db8::1", "53"], 0.5);
    assert!(v6.starts_with("ERR timeout"), "{v6}");
    // loopback IPv6 still works
    let _lo = pod.serve(&["tcp/::1/9000/lo6"]);
    assert!(pod.client(APP, &["tcp", "::1", "9000"]).starts_with("lo6"));
}

/// Gateway mode: TCP forwarded from `capture_interfaces` is redirected to the
/// proxy; a connection to the gateway's own address is not; forwarded UDP 443
/// is refused, UDP 53 passes to the gateway's resolver only. With
/// `dhcp_client_uids` set, the rule set (owner matches only where OUTPUT
/// leads, never FORWARD) is accepted by iptables-restore and forwarded DHCP
/// requests are refused like any UDP.
#[test]
fn gateway_captures_forwarded_tcp() {
    let lan = Ns::new();
    let host = Ns::new();
    let inet = Ns::new();
    link(
        &lan,
        "eth0",
        &["198.18.0.2/24", "2001:db8:ff::2/64"],
        &host,
        "lan0",
        &["198.18.0.1/24", "2001:db8:ff::1/64"],
    );
    link(
        &host,
        "eth0",
        &["192.0.2.2/24", "2001:db8::2/64"],
        &inet,
        "eth0",
        &["192.0.2.1/24", "2001:db8::1/64"],
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
    host.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    host.ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

    let _up = inet.serve(&[
        "tcp/192.0.2.1/8080/upstream",
        "tcp/2001:db8::1/8080/upstream",
        "udp/192.0.2.1/53",
        "udp/2001:db8::1/53",
        "udp/192.0.2.1/443",
        "udp/2001:db8::1/443",
        "udp/192.0.2.1/67",
    ]);
    let _proxy = host.serve(&[
        "tcp/0.0.0.0/15001/proxy",
        "tcp/::/15001/proxy",
        "tcp/198.18.0.1/8080/gateway",
        "tcp/2001:db8:ff::1/8080/gateway",
    ]);
    assert!(
        lan.client(APP, &["tcp", "192.0.2.1", "8080"])
            .starts_with("upstream"),
        "routing works"
    );

    let tmp = TempDir::new();
    let resolv = tmp.file("resolv.conf", "nameserver 192.0.2.1\n");
    let cfg = tmp.file(
        "gw.toml",
        "[proxy]\nlisten = [\"0.0.0.0:15001\", \"[::]:15001\"]\n[redirect]\nproxy_gid = 1337\ncapture_interfaces = [\"lan0\"]\ndhcp_client_uids = [0]\n",
    );
    let out = host.init(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        lan.client(APP, &["tcp", "192.0.2.1", "8080"]),
        "proxy orig=192.0.2.1:8080"
    );
    assert_eq!(
        lan.client(APP, &["tcp", "2001:db8::1", "8080"]),
        "proxy orig=[2001:db8::1]:8080"
    );
    // the gateway's own address is not captured
    assert!(lan
        .client(APP, &["tcp", "198.18.0.1", "8080"])
        .starts_with("gateway"));
    assert!(lan
        .client(APP, &["tcp", "2001:db8:ff::1", "8080"])
        .starts_with("gateway"));
    // forwarded UDP: 53 passes to the resolver only, 443 and DHCP refused
    assert!(lan
        .client(APP, &["udp", "192.0.2.1", "53"])
        .starts_with("ping"));
    assert!(refused(&lan.client(APP, &["udp", "2001:db8::1", "53"])));
    assert!(refused(&lan.client_from(
        None,
        Some(68),
        &["udp", "192.0.2.1", "67"],
        2.0
    )));
    assert!(lan
        .client(APP, &["udp", "192.0.2.1", "443"])
        .starts_with("ERR ConnectionRefusedError"));
    assert!(lan
        .client(APP, &["udp", "2001:db8::1", "443"])
        .starts_with("ERR ConnectionRefusedError"));
}

/// Without privileges: one sentence on stderr, exit 1, no backtrace.
#[test]
fn unprivileged_init_is_one_clear_sentence() {
    let ns = Ns::new();
    let tmp = TempDir::new();
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    // readable by uid 1000
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&tmp.0)
        .status();
    let out = ns.run(&[
        "setpriv",
        "--reuid",
        "1000",
        "--regid",
        "1000",
        "--clear-groups",
        BIN,
        "init",
        "-c",
        cfg.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("permission denied") && err.contains("root"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A missing iptables is one sentence too.
#[test]
fn missing_iptables_is_one_clear_sentence() {
    let ns = Ns::new();
    let tmp = TempDir::new();
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    // init looks for iptables in PATH: point PATH at an empty directory
    // (`ip` itself is found by its full path, in the test's own PATH).
    let empty = tmp.0.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let ip = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("ip"))
                .find(|p| p.is_file())
        })
        .expect("ip in PATH");
    let out = Command::new(ip)
        .args(["netns", "exec", &ns.name, BIN, "init", "-c"])
        .arg(&cfg)
        .env("PATH", &empty)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("not found") && err.contains("install iptables"),
        "{err}"
    );
}

/// The pod/inet world of the traffic tests: pod 192.0.2.2 / 2001:db8::2,
/// inet 192.0.2.1 and .9 / 2001:db8::1 and ::9, default routes via inet.
fn pod_and_inet() -> (Ns, Ns) {
    let pod = Ns::new();
    let inet = Ns::new();
    link(
        &pod,
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

fn answered(reply: &str) -> bool {
    reply.starts_with("ping")
}

fn refused(reply: &str) -> bool {
    reply.starts_with("ERR ConnectionRefusedError")
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
    let _up = inet.serve(&[
        "udp/192.0.2.9/67",
        "udp/192.0.2.9/68",
        "udp/2001:db8::9/547",
        "udp/2001:db8::9/546",
    ]);
    let udp = |who, sport: u16, addr: &str, port: &str| {
        pod.client_from(who, Some(sport), &["udp", addr, port], 2.0)
    };
    // the world works before init
    assert!(answered(&udp(APP, 68, "192.0.2.9", "67")));

    let tmp = TempDir::new();
    let resolv = tmp.file("resolv.conf", "nameserver 192.0.2.1\n");
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
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
    let cfg = tmp.file(
        "host.toml",
        &format!("{POD_CONFIG}dhcp_client_uids = [0]\n"),
    );
    let dry = pod.init_ok(&resolv, &["--dry-run", "-c", cfg.to_str().expect("utf-8")]);
    assert!(dry.contains("dhcp_client_uids: 0"), "{dry}");
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
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
    let _up = inet.serve(&[
        "udp/192.0.2.1/53",
        "udp/192.0.2.9/53",
        "udp/2001:db8::1/53",
        "udp/2001:db8::9/53",
    ]);
    let tmp = TempDir::new();
    let resolv = tmp.file(
        "resolv.conf",
        "nameserver 192.0.2.1\nnameserver 2001:db8::1\n",
    );
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    let dry = pod.init_ok(&resolv, &["--dry-run", "-c", cfg.to_str().expect("utf-8")]);
    assert!(
        dry.contains("192.0.2.1") && dry.contains("2001:db8::1"),
        "{dry}"
    );
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
    for (resolver, other) in [("192.0.2.1", "192.0.2.9"), ("2001:db8::1", "2001:db8::9")] {
        let got = pod.client(APP, &["udp", resolver, "53"]);
        assert!(answered(&got), "{resolver}: {got}");
        let got = pod.client(APP, &["udp", other, "53"]);
        assert!(refused(&got), "{other}: {got}");
    }

    // any address, written out
    let cfg = tmp.file(
        "any.toml",
        &format!(
            "{POD_CONFIG}allow_udp = [{{ ports = [53], cidrs = [\"0.0.0.0/0\", \"::/0\"] }}]\n"
        ),
    );
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);
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
    const STUB: Option<(u32, u32)> = Some((1500, 1500));
    pod.ok(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
    pod.ip(&["addr", "add", "127.0.0.53/8", "dev", "lo"]);
    let _stub = pod.serve_as(STUB, &["udp/127.0.0.53/53", "tcp/127.0.0.53/53/stub"]);
    let _up = inet.serve(&[
        "udp/192.0.2.9/53",
        "udp/192.0.2.9/443",
        "udp/2001:db8::9/53",
        "tcp/192.0.2.9/53/upstream",
    ]);
    let _proxy = pod.serve(&["tcp/127.0.0.1/15001/proxy", "tcp/::1/15001/proxy"]);
    let tmp = TempDir::new();
    let resolv = tmp.file("resolv.conf", "nameserver 127.0.0.53\n");
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    let dry = pod.init_ok(&resolv, &["--dry-run", "-c", cfg.to_str().expect("utf-8")]);
    assert!(
        dry.contains("127.0.0.53") && dry.contains("uid 1500"),
        "{dry}"
    );
    pod.init_ok(&resolv, &["-c", cfg.to_str().expect("utf-8")]);

    // the stub's uid reaches its upstreams on port 53, UDP and TCP
    for addr in ["192.0.2.9", "2001:db8::9"] {
        let got = pod.client(STUB, &["udp", addr, "53"]);
        assert!(answered(&got), "stub to {addr}: {got}");
    }
    assert!(pod
        .client(STUB, &["tcp", "192.0.2.9", "53"])
        .starts_with("upstream"));
    // ... and nothing else
    assert!(refused(&pod.client(STUB, &["udp", "192.0.2.9", "443"])));
    // the workload reaches the stub, not the upstream
    assert!(answered(&pod.client(APP, &["udp", "127.0.0.53", "53"])));
    assert!(refused(&pod.client(APP, &["udp", "192.0.2.9", "53"])));
    assert_eq!(
        pod.client(APP, &["tcp", "192.0.2.9", "53"]),
        "proxy orig=192.0.2.9:53"
    );
}

/// Issue 12.3: in a pod that Istio's sidecar injection reached, portcullis's
/// defaults collide with Envoy's (uid 1337, ports 15001/15000/15021): `init`
/// refuses in one sentence and installs nothing.
#[test]
fn init_refuses_beside_istio() {
    let tmp = TempDir::new();
    let resolv = tmp.file("resolv.conf", "");
    let cfg = tmp.file("pod.toml", POD_CONFIG);
    let cfg_s = cfg.to_str().expect("utf-8");
    for (tool, chain) in [
        ("iptables-nft", "ISTIO_OUTPUT"),
        ("iptables-legacy", "ISTIO_INBOUND"),
    ] {
        let ns = Ns::new();
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
        let out = ns.init(&resolv, &["-c", cfg_s]);
        assert_eq!(out.status.code(), Some(1), "{tool}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("Istio") && err.contains(chain) && err.contains("sidecar.istio.io/inject"),
            "{err}"
        );
        for save in ["iptables-nft-save", "iptables-legacy-save"] {
            let s = ns.ok(&[save]);
            assert!(!s.contains("PORTCULLIS"), "{save}: {s}");
        }
    }
}
