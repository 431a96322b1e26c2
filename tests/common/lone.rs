//! A lone network namespace, for tests that build their own topology instead
//! of a [`super::World`] (init_netns.rs): commands run in it, veth links
//! between such namespaces, labelled listeners (`tests/upstreams.py --listen`)
//! and one-shot clients (`tests/client.py`) as any uid.
//!
//! Named like a world's namespaces (`pc<pid>x<n>n`), so one a dead test
//! process left is swept; its directory (`$TMPDIR/portcullis-pc<pid>x<n>`,
//! mode 0755 so the uids the tests run as can read what is written there) is
//! swept with it. On drop every process inside is killed, the namespace is
//! deleted and the directory removed; on a panic, the logs of the processes it
//! started are printed first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{
    destroy_ns, fresh_base, must, proc, python, set_mode, Cmd, Output, Proc, UPSTREAMS_PY,
};

/// Where the one-connection client script is.
pub const CLIENT_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client.py");

/// Who runs a client or a listener: `Some((uid, gid))` (no supplementary
/// groups), or `None` for root.
pub type Who = Option<(u32, u32)>;

pub struct Netns {
    pub name: String,
    /// a directory (mode 0755) for configs and the logs of what runs here
    pub dir: PathBuf,
    seq: AtomicUsize,
}

impl Netns {
    /// A new namespace with only `lo` up.
    pub fn new() -> Netns {
        let base = fresh_base();
        let dir = std::env::temp_dir().join(format!("portcullis-{base}"));
        let ns = Netns {
            name: format!("{base}n"),
            dir,
            seq: AtomicUsize::new(0),
        };
        // from here on, a panic drops `ns`, which removes whatever exists
        let _ = std::fs::remove_dir_all(&ns.dir);
        std::fs::create_dir_all(&ns.dir).expect("create netns dir");
        set_mode(&ns.dir, 0o755);
        must(Cmd::new("ip").args(["netns", "add", &ns.name]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `program` to run inside this namespace (`ip netns exec`: it fails,
    /// rather than running outside, if the namespace is gone).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        Cmd::new(program).ns(&self.name)
    }

    /// Runs `argv` here to completion.
    pub fn run(&self, argv: &[&str]) -> Output {
        self.cmd(argv[0]).args(&argv[1..]).run()
    }

    /// Runs `argv` here; panics (showing its output) unless it exits 0; its stdout.
    #[track_caller]
    pub fn ok(&self, argv: &[&str]) -> String {
        self.run(argv).ok().to_string()
    }

    /// `ip -n NAME args...`, which must succeed.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) {
        must(Cmd::new("ip").args(["-n", &self.name]).args(args));
    }

    /// Joins this namespace and `peer` with a veth pair made inside the
    /// namespaces (never in the machine's own), `ifname` here and `peer_if`
    /// there, up, with the addresses given (`ip addr` form; IPv6 without DAD).
    #[track_caller]
    pub fn link(
        &self,
        ifname: &str,
        addrs: &[&str],
        peer: &Netns,
        peer_if: &str,
        peer_addrs: &[&str],
    ) {
        self.ip(&[
            "link", "add", ifname, "type", "veth", "peer", "name", peer_if, "netns", &peer.name,
        ]);
        for (ns, ifname, addrs) in [(self, ifname, addrs), (peer, peer_if, peer_addrs)] {
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

    /// A path inside this namespace's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a file (mode 0644) into this namespace's directory; its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        super::write_file_in(&self.dir, name, contents)
    }

    /// Starts `cmd` here; the guard kills it (by its process group) when
    /// dropped. Its output goes to files in `self.dir`, shown on a panic.
    pub fn spawn(&self, cmd: Cmd) -> Proc {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        cmd.ns(&self.name).spawn_logged(&self.dir, n)
    }

    /// Starts `tests/upstreams.py --listen SPECS` here as `who` and returns
    /// once every listener is up: `tcp/ADDR/PORT/LABEL` answers `LABEL
    /// ORIGDST <original destination>`, `udp/ADDR/PORT` echoes.
    #[track_caller]
    pub fn serve(&self, who: Who, specs: &[&str]) -> Proc {
        let mut cmd = Cmd::new(python())
            .label("listen")
            .args(["-u", UPSTREAMS_PY, "--listen"])
            .args(specs);
        if let Some((u, g)) = who {
            cmd = cmd.user(u, g);
        }
        let mut p = self.spawn(cmd);
        assert!(
            p.wait_output("READY", Duration::from_secs(10)),
            "listeners {specs:?} did not start: {p:?}"
        );
        p
    }

    /// `tests/client.py ARGS` (`tcp|udp ADDR PORT [MARK]`) here as `who`,
    /// with a 3 s timeout; its one line.
    pub fn client(&self, who: Who, args: &[&str]) -> String {
        self.client_with(who, None, args, 3.0)
    }

    /// [`Netns::client`] from source port `sport` (when given), giving up
    /// after `secs`.
    pub fn client_with(&self, who: Who, sport: Option<u16>, args: &[&str], secs: f64) -> String {
        let mut cmd = self
            .cmd(python())
            .arg(CLIENT_PY)
            .args(args)
            .env("CLIENT_TIMEOUT", secs.to_string())
            .timeout(Duration::from_secs_f64(secs + 10.0));
        if let Some(p) = sport {
            cmd = cmd.env("CLIENT_SPORT", p.to_string());
        }
        if let Some((u, g)) = who {
            cmd = cmd.user(u, g);
        }
        cmd.run().stdout.trim().to_string()
    }

    fn dump(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "out" || x == "err"))
            .collect();
        logs.sort();
        for p in logs {
            eprintln!(
                "=== netns {}: {}\n{}",
                self.name,
                p.file_name().map(Path::new).unwrap_or(&p).display(),
                proc::file_tail(&p, 4000)
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        destroy_ns(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
