//! The shipped binary (README "Install", scripts/build-static.sh): statically
//! linked, stripped, free of glibc NSS, and working with nothing around it.
//!
//! - `check`, `explain` and `run` in an empty chroot holding only the binary
//!   and its config (`run` inside a network namespace: /ready answers on both
//!   families, a redirected flow is relayed, SIGTERM by pid ends it);
//! - `init` from a chroot holding the binary and Debian's iptables tools with
//!   their libraries (found with ldd), in a namespace, for both backends: the
//!   rules equal what the ordinary build installs; the Dockerfile's runtime
//!   stage installs every Debian package those files came from;
//! - the Kubernetes example's /etc/portcullis (both ConfigMaps, laid out as
//!   kubelet mounts them) passes `check` and `init --dry-run` in a chroot.
//!
//! The static build runs once per test run (the first test to need it
//! builds; the others wait), into `<target>/static` so it never invalidates
//! the ordinary build. Set PORTCULLIS_STATIC_BIN to test a binary built
//! elsewhere. When the build cannot be produced on this machine (no static
//! glibc, no binutils) the tests say so and skip; a binary that links NSS or a
//! shared library fails them.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the static build goes: beside this test run's own target dir.
fn static_target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("static")
}

/// The stripped static binary, built once per test run; None (with the
/// reason printed) when this machine cannot produce it.
fn static_bin() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PORTCULLIS_STATIC_BIN") {
            return Some(PathBuf::from(p));
        }
        let t = Instant::now();
        let out = Cmd::new(root().join("scripts/build-static.sh"))
            .env("CARGO_TARGET_DIR", static_target_dir())
            .timeout(Duration::from_secs(3600))
            .run();
        eprintln!(
            "static build: {:.1}s (scripts/build-static.sh, CARGO_TARGET_DIR={})",
            t.elapsed().as_secs_f64(),
            static_target_dir().display()
        );
        if out.success() {
            let bin = PathBuf::from(out.stdout.lines().last().expect("the binary's path"));
            assert!(bin.is_file(), "{bin:?}");
            return Some(bin);
        }
        // The script's own checks (dynamic loader, shared libraries, NSS)
        // exit 3: that is a failure of the binary, never a reason to skip.
        assert_ne!(
            out.status,
            Some(3),
            "the static build is not static or uses NSS: {out:?}"
        );
        let env_problem = ["cannot find -l", "command not found", "No such file or directory"]
            .iter()
            .any(|m| out.stderr.contains(m));
        assert!(env_problem, "scripts/build-static.sh failed: {out:?}");
        eprintln!(
            "SKIPPED: the static build cannot be produced on this machine (it needs glibc's static libraries, libc6-dev, and binutils):\n{}",
            out.stderr
        );
        None
    })
    .as_deref()
}

/// The unstripped link of the same build, which still has its symbol table.
fn linked_bin() -> PathBuf {
    static_target_dir().join("x86_64-unknown-linux-gnu/dist/portcullis")
}

/// A chroot directory holding only the static binary at /portcullis; removed
/// on drop.
struct Chroot {
    dir: PathBuf,
}

impl Chroot {
    fn new(bin: &Path, tag: &str) -> Chroot {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-chroot-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = Chroot { dir };
        c.copy(bin, "portcullis");
        c
    }

    /// Writes DIR/rel (mode 0644), creating directories.
    fn file(&self, rel: &str, text: &str) {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Copies a host file to DIR/rel keeping its mode.
    fn copy(&self, from: &Path, rel: &str) {
        let p = self.dir.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(from, &p).unwrap_or_else(|e| panic!("copy {from:?}: {e}"));
    }

    fn symlink(&self, target: &str, rel: &str) {
        let p = self.dir.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).unwrap();
    }

    /// Every path in the chroot, relative, sorted (for failure messages and
    /// to prove it is empty but for what the test put there).
    fn listing(&self) -> Vec<String> {
        fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.dir, &self.dir, &mut v);
        v.sort();
        v
    }

    /// `chroot DIR args...` (optionally in namespace `ns`).
    fn cmd(&self, ns: Option<&str>, args: &[&str]) -> Cmd {
        let mut c = Cmd::new("chroot").arg(&self.dir).args(args);
        if let Some(ns) = ns {
            c = c.ns(ns);
        }
        c
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        if std::env::var_os("PORTCULLIS_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn readelf(args: &[&str], bin: &Path) -> String {
    let out = Cmd::new("readelf").args(args).arg(bin).run();
    assert!(out.success(), "{out:?}");
    out.stdout
}

// ---------------------------------------------------------------- the binary

#[test]
fn static_stripped_and_free_of_nss() {
    let Some(bin) = static_bin() else { return };
    // No program interpreter and no shared library: nothing to load at start.
    let headers = readelf(&["-lW"], bin);
    assert!(!headers.contains("INTERP"), "{headers}");
    let dynamic = readelf(&["-dW"], bin);
    assert!(!dynamic.contains("NEEDED"), "{dynamic}");
    // Stripped: no symbol table, no debug info.
    let sections = readelf(&["-SW"], bin);
    assert!(!sections.contains(".symtab"), "not stripped: {sections}");
    assert!(!sections.contains(".debug_"), "debug info left: {sections}");
    let size = std::fs::metadata(bin).unwrap().len();
    eprintln!("static binary: {size} bytes");

    // The unstripped link still has its symbols: none of glibc's NSS entry
    // points may be linked in (in a static binary they dlopen libnss_*.so,
    // which is not there, or is another glibc's).
    let linked = linked_bin();
    if linked.is_file() {
        let syms = Cmd::new("nm").arg(&linked).run();
        assert!(syms.success(), "{syms:?}");
        // (type, name); type n is glibc's link-warning note, left behind
        // for functions --gc-sections removed: not code.
        let code: Vec<(&str, &str)> = syms
            .stdout
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3).then(|| (f[1], f[2]))
            })
            .filter(|(t, _)| *t != "n")
            .collect();
        assert!(code.len() > 1000, "no symbol table in {linked:?}");
        for nss in [
            "getaddrinfo",
            "getnameinfo",
            "gethostbyname",
            "gethostbyname2",
            "gethostbyname_r",
            "gethostbyname2_r",
            "gethostbyaddr",
            "gethostbyaddr_r",
            "getservbyname",
            "getservbyname_r",
            "getpwnam",
            "getpwnam_r",
            "getpwuid",
            "getpwuid_r",
            "getgrnam",
            "getgrnam_r",
            "getgrgid",
            "getgrgid_r",
            "getgrouplist",
            "initgroups",
        ] {
            let hit: Vec<_> = code
                .iter()
                .filter(|(_, n)| n.trim_start_matches('_') == nss)
                .collect();
            assert!(
                hit.is_empty(),
                "{nss} is linked into the static binary: {hit:?}"
            );
        }
    } else {
        eprintln!("{linked:?} absent (PORTCULLIS_STATIC_BIN given): symbol check skipped");
    }
}

// ---------------------------------------------------------------- empty chroot

const CONFIG: &str = r#"outbound_traffic_policy = "REGISTRY_ONLY"

[proxy]
listen = ["127.0.0.1:15001", "[::1]:15001"]
# health: the default, both families
drain_min = "0s"
drain_timeout = "2s"

[redirect]
proxy_uid = 1337
proxy_gid = 1337

[[service_entry]]
name = "api"
hosts = ["api.example.com"]
ports = [{ number = 443, protocol = "TLS" }]

[[service_entry]]
name = "echo"
hosts = ["echo.internal"]
addresses = ["192.0.2.10/32"]
ports = [{ number = 7000, protocol = "TCP" }]
"#;

#[test]
fn check_and_explain_in_an_empty_chroot() {
    let Some(bin) = static_bin() else { return };
    let c = Chroot::new(bin, "check");
    c.file("config.toml", CONFIG);
    assert_eq!(c.listing(), ["config.toml", "portcullis"]);

    // The same answers as the ordinary build gives outside any chroot.
    let host_cfg = c.dir.join("config.toml");
    let host_cfg = host_cfg.to_str().unwrap();
    let check = c
        .cmd(None, &["/portcullis", "check", "-c", "/config.toml"])
        .run();
    assert!(check.success(), "{check:?}");
    let want = Cmd::new(portcullis_bin())
        .args(["check", "-c", host_cfg])
        .run();
    assert_eq!(
        check.stdout,
        want.stdout.replace(host_cfg, "/config.toml"),
        "{check:?}"
    );
    assert!(check.stdout.contains("api"), "{check:?}");

    for (dst, sni, decision) in [
        ("192.0.2.10:443", "api.example.com", "decision: allow"),
        ("192.0.2.10:443", "evil.example.com", "decision: deny"),
    ] {
        let args = ["explain", "-c", "/config.toml", "--dst", dst, "--sni", sni];
        let got = c.cmd(None, &[&["/portcullis"][..], &args].concat()).run();
        assert!(got.success(), "{got:?}");
        assert!(got.stdout.contains(decision), "{got:?}");
        let mut host_args = args;
        host_args[2] = host_cfg;
        let want = Cmd::new(portcullis_bin()).args(host_args).run();
        assert_eq!(got.stdout, want.stdout.replace(host_cfg, "/config.toml"));
    }
    // exit codes survive too: an invalid file is 1, a usage error 2
    c.file("bad.toml", "[proxy]\nlisten = 1\n");
    let bad = c
        .cmd(None, &["/portcullis", "check", "-c", "/bad.toml"])
        .run();
    assert_eq!(bad.status, Some(1), "{bad:?}");
    assert!(bad.stderr.contains("/bad.toml"), "{bad:?}");
    let usage = c.cmd(None, &["/portcullis", "explain"]).run();
    assert_eq!(usage.status, Some(2), "{usage:?}");
}

#[test]
fn run_in_an_empty_chroot_in_a_namespace() {
    let Some(bin) = static_bin() else { return };
    let w = World::start();
    let c = Chroot::new(bin, "run");
    c.file("config.toml", CONFIG);
    assert_eq!(c.listing(), ["config.toml", "portcullis"]);
    // the app's TCP to the documentation ranges goes to :15001, except the
    // proxy's own (uid 1337)
    w.redirect(15001, Some(PROXY_UID));

    // `ip netns exec POD chroot --userspec=1337:1337 DIR /portcullis run`:
    // ip and chroot exec, so the pid is the proxy's own.
    let mut proxy = w.spawn_in(
        &w.pod,
        Cmd::new("chroot")
            .arg(format!("--userspec={PROXY_UID}:{PROXY_UID}"))
            .arg(&c.dir)
            .args(["/portcullis", "run", "-c", "/config.toml"])
            .label("static-proxy"),
    );
    // The default health listens on both families: kubelet probes the pod
    // IP of its own family, from outside the pod (here: from inet).
    for url in [
        "http://192.0.2.2:15021/ready",
        "http://[2001:db8::2]:15021/ready",
    ] {
        let ok = poll_until(Duration::from_secs(20), || {
            let out = w.run_in(
                &w.inet,
                Cmd::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]),
            );
            out.stdout == "200"
        });
        assert!(ok, "{url} never answered 200: {}", proxy.logs(4000));
    }
    // `wait` from the same static binary in the pod: `localhost` is
    // 127.0.0.1 then ::1, without a lookup (no /etc/hosts in the chroot)
    let wait = w.run_in(
        &w.pod,
        c.cmd(
            None,
            &[
                "/portcullis",
                "wait",
                "--url",
                "http://localhost:15021/ready",
                "--timeout",
                "5s",
            ],
        ),
    );
    assert!(wait.success(), "{wait:?}");

    // A flow through it: redirected, matched by address, relayed.
    let mut s = w
        .pod_connect(sa(addr::API_V4, port::ECHO))
        .expect("connect through the proxy");
    use std::io::{Read, Write};
    s.write_all(b"through the static proxy\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "through the static proxy\n", "{}", proxy.logs(4000));
    assert!(
        proxy.wait_output("\"decision\":\"allow\"", Duration::from_secs(5)),
        "{}",
        proxy.logs(4000)
    );

    // SIGTERM by pid: drains and exits 0.
    let st = proxy.terminate(Duration::from_secs(10));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", proxy.logs(4000));
}

// ---------------------------------------------------------------- init

/// The Debian iptables tools and everything they load: the two multi-call
/// binaries, the libraries ldd names for them and for their extensions, and
/// the extensions directory (dlopen'ed, so ldd cannot see it).
fn iptables_files() -> Vec<PathBuf> {
    let which = |tool: &str| -> PathBuf {
        for d in ["/usr/sbin", "/sbin", "/usr/bin"] {
            let p = Path::new(d).join(tool);
            if p.exists() {
                return std::fs::canonicalize(p).unwrap();
            }
        }
        panic!("{tool} not found (scripts/install-test-deps.sh installs iptables)");
    };
    let mut files = vec![which("xtables-nft-multi"), which("xtables-legacy-multi")];
    let ext = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    assert!(ext.is_dir(), "{ext:?}");
    let mut exts: Vec<PathBuf> = std::fs::read_dir(ext)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    exts.sort();
    assert!(exts.len() > 20, "{exts:?}");
    let mut objects = files.clone();
    objects.extend(exts.iter().cloned());
    for obj in &objects {
        let out = Cmd::new("ldd").arg(obj).run();
        assert!(out.success(), "{out:?}");
        for line in out.stdout.lines() {
            // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next().unwrap_or(""),
                None => line.split_whitespace().next().unwrap_or(""),
            };
            if path.starts_with('/') {
                files.push(PathBuf::from(path));
            }
        }
    }
    files.extend(exts);
    files.sort();
    files.dedup();
    files
}

/// A chroot holding the static binary and the iptables tools, laid out as in
/// the image: /usr/sbin/<tool> links to the multi-call binaries.
fn init_chroot(bin: &Path) -> (Chroot, Vec<PathBuf>) {
    let c = Chroot::new(bin, "init");
    let files = iptables_files();
    for f in &files {
        c.copy(f, &f.to_string_lossy());
        // the loader and libraries are found by the names ldd printed, which
        // may be symlinks (/lib64/ld-linux-x86-64.so.2)
    }
    for (multi, variant) in [
        ("xtables-nft-multi", "nft"),
        ("xtables-legacy-multi", "legacy"),
    ] {
        let real = files
            .iter()
            .find(|f| f.file_name().unwrap() == multi)
            .unwrap();
        for fam in ["iptables", "ip6tables"] {
            for suffix in ["", "-save", "-restore"] {
                c.symlink(
                    &real.to_string_lossy(),
                    &format!("/usr/sbin/{fam}-{variant}{suffix}"),
                );
            }
        }
    }
    // what a container runtime gives every container: /proc, /dev/null
    // (mounted by the test, see below), /run, resolv.conf (init exempts the
    // resolvers' TCP port 53)
    std::fs::create_dir_all(c.dir.join("proc")).unwrap();
    std::fs::create_dir_all(c.dir.join("run")).unwrap();
    c.file("dev/null", "");
    c.file("etc/resolv.conf", "nameserver 192.0.2.53\n");
    c.file("etc/portcullis/config.toml", CONFIG);
    (c, files)
}

/// `-A` lines and chain declarations of a save, without counters.
fn normalized(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(':') || l.starts_with('*'))
        .map(|l| match l.split_once(" [") {
            Some((head, _)) if l.starts_with(':') => head.to_string(),
            _ => l.to_string(),
        })
        .collect()
}

#[test]
fn init_in_a_chroot_with_the_iptables_tools() {
    let Some(bin) = static_bin() else { return };
    let (c, files) = init_chroot(bin);
    for backend in ["nft", "legacy"] {
        let w = World::builder().upstreams(false).start();
        // The chroot gets /proc and /dev/null (init's children read it as
        // stdin) the way a container runtime gives them, in a private mount
        // namespace that dies with the command.
        let script = format!(
            "mount -t proc proc {dir}/proc && mount --bind /dev/null {dir}/dev/null && exec chroot {dir} /portcullis init -c /etc/portcullis/config.toml --backend {backend}",
            dir = c.dir.display()
        );
        let out = w.run_in(
            &w.pod,
            Cmd::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        );
        assert!(out.success(), "init ({backend}) in the chroot: {out:?}");

        // The rules are there, seen from outside the chroot ...
        for tool in ["iptables", "ip6tables"] {
            let check = w.run_in(
                &w.pod,
                Cmd::new(format!("{tool}-{backend}")).args([
                    "-w",
                    "-t",
                    "nat",
                    "-C",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-m",
                    "comment",
                    "--comment",
                    "portcullis: redirect outbound TCP",
                    "-j",
                    "PORTCULLIS_OUTPUT",
                ]),
            );
            assert!(check.success(), "{tool}-{backend} -C: {check:?}");
        }
        // ... and are exactly what the ordinary build installs (in the
        // world's other namespace, which has no rules of its own).
        let host_cfg = c.dir.join("etc/portcullis/config.toml");
        let direct = Cmd::new(portcullis_bin())
            .ns(&w.inet)
            .env("PORTCULLIS_RESOLV_CONF", c.dir.join("etc/resolv.conf"))
            .args([
                "init",
                "-c",
                &host_cfg.to_string_lossy(),
                "--backend",
                backend,
            ])
            .run();
        assert!(direct.success(), "{direct:?}");
        for tool in ["iptables", "ip6tables"] {
            let save = |ns: &str| {
                let out = w.run_in(ns, Cmd::new(format!("{tool}-{backend}-save")));
                assert!(out.success(), "{out:?}");
                normalized(&out.stdout)
            };
            let (got, want) = (save(&w.pod), save(&w.inet));
            assert!(got.iter().any(|l| l.contains("REDIRECT")), "{got:#?}");
            assert_eq!(got, want, "{tool}-{backend}");
        }
    }

    // The Dockerfile's runtime stage installs every Debian package those
    // files belong to (libc6 is in every Debian image).
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .expect("a multi-stage Dockerfile")
        .1;
    assert!(runtime.starts_with("debian:"), "runtime stage: {runtime}");
    assert!(runtime.contains("COPY --from=builder"), "{runtime}");
    let listed: Vec<&str> = runtime
        .split_once("apt-get install")
        .expect("apt-get install in the runtime stage")
        .1
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .collect();
    // One dpkg -S for all files (it reads its whole database each time);
    // dpkg knows some files by their /usr-merged twin, so ask for both.
    let twin = |f: &Path| -> String {
        let f = f.to_string_lossy();
        match f.strip_prefix("/usr") {
            Some(rest) => rest.to_string(),
            None => format!("/usr{f}"),
        }
    };
    let mut query: Vec<String> = Vec::new();
    for f in &files {
        query.push(f.to_string_lossy().into_owned());
        query.push(twin(f));
    }
    let owners = Cmd::new("dpkg").arg("-S").args(&query).run();
    let owner_of: std::collections::HashMap<&str, &str> = owners
        .stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(pkgs, path)| (path.trim(), pkgs.split(',').next().unwrap().trim()))
        .collect();
    let mut packages = Vec::new();
    for f in &files {
        let pkg = owner_of
            .get(f.to_string_lossy().as_ref())
            .or_else(|| owner_of.get(twin(f).as_str()))
            .unwrap_or_else(|| panic!("which package holds {f:?}? {owners:?}"));
        // "libc6:amd64" -> "libc6"
        packages.push(pkg.split(':').next().unwrap().to_string());
    }
    packages.sort();
    packages.dedup();
    for p in &packages {
        assert!(
            p == "libc6" || listed.contains(&p.as_str()),
            "the Dockerfile's runtime stage does not install {p} (needed by init in the chroot; it lists {listed:?})"
        );
    }
    eprintln!("init in the chroot needed: {packages:?}");
}

// ---------------------------------------------------------------- Kubernetes

/// The pod's /etc/portcullis as kubelet lays it out: portcullis-config's keys
/// at the top, portcullis-serviceentries' under istio/.
fn pod_etc_portcullis() -> Vec<(String, String)> {
    let mut docs = Vec::new();
    for f in [
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/serviceentries.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        for d in serde_norway::Deserializer::from_str(&text) {
            let v: serde_norway::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{f} is not valid YAML: {e}"));
            docs.push(v);
        }
    }
    let mut files = Vec::new();
    for (name, dir) in [
        ("portcullis-config", ""),
        ("portcullis-serviceentries", "istio/"),
    ] {
        let cm = docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some("ConfigMap")
                    && d["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap_or_else(|| panic!("no ConfigMap {name}"));
        let data = cm["data"].as_mapping().expect("data");
        for (k, v) in data {
            files.push((
                format!("{dir}{}", k.as_str().unwrap()),
                v.as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(files.iter().any(|(f, _)| f == "config.toml"));
    assert!(
        files
            .iter()
            .filter(|(f, _)| f.starts_with("istio/"))
            .count()
            >= 2
    );
    files
}

/// Needs `include` (importer branch) and `[proxy] resolv_conf`/`hosts_file`
/// (resolver branch): the example uses them.
#[test]
fn kubernetes_example_config_passes_check() {
    let Some(bin) = static_bin() else { return };
    let c = Chroot::new(bin, "k8s");
    for (rel, text) in pod_etc_portcullis() {
        c.file(&format!("etc/portcullis/{rel}"), &text);
    }
    let check = c
        .cmd(
            None,
            &["/portcullis", "check", "-c", "/etc/portcullis/config.toml"],
        )
        .run();
    assert!(
        check.success(),
        "the Kubernetes example's config: {check:?}"
    );
    // the included ServiceEntries are in the registry, named namespace/name
    for name in [
        "example/payments-api",
        "example/object-storage",
        "example/buckets",
    ] {
        assert!(check.stdout.contains(name), "{name} not in {check:?}");
    }
    // and init renders its rules from it (what the init container runs)
    let dry = c
        .cmd(
            None,
            &[
                "/portcullis",
                "init",
                "--dry-run",
                "-c",
                "/etc/portcullis/config.toml",
            ],
        )
        .env("PORTCULLIS_RESOLV_CONF", "/etc/portcullis/resolv.conf")
        .run();
    assert!(dry.success(), "{dry:?}");
    assert!(
        dry.stdout.contains("-j REDIRECT --to-ports 15001"),
        "{dry:?}"
    );
    assert!(
        dry.stdout
            .contains("-d 10.96.0.10/32 -p tcp -m tcp --dport 53"),
        "the cluster DNS is exempt: {dry:?}"
    );
}

// ---------------------------------------------------------------- health default

/// Where IPv6 is off, an IPv6 health address that cannot be bound is a
/// warning (as for `listen`), and the IPv4 one still answers kubelet. (The
/// ordinary build: this is the listener's behaviour, not the packaging's.)
#[test]
fn health_without_ipv6_warns_and_serves_ipv4() {
    let w = World::builder().upstreams(false).start();
    let off = w.run_in(
        &w.pod,
        Cmd::new("sysctl").args(["-w", "net.ipv6.conf.all.disable_ipv6=1"]),
    );
    assert!(off.success(), "{off:?}");
    let cfg = w.write_file(
        "health.toml",
        &CONFIG.replace(
            "# health: the default, both families",
            r#"health = ["0.0.0.0:15021", "[::1]:15021"]"#,
        ),
    );
    let mut proxy = w.spawn_proxy(&["run", "-c", &cfg.to_string_lossy()]);
    assert!(
        proxy.wait_output(
            "health endpoint addr=0.0.0.0:15021",
            Duration::from_secs(20)
        ),
        "{}",
        proxy.logs(4000)
    );
    assert!(
        proxy.wait_output("IPv6 health listener not bound", Duration::from_secs(5)),
        "{}",
        proxy.logs(4000)
    );
    let out = w.run_in(
        &w.inet,
        Cmd::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://192.0.2.2:15021/ready",
        ]),
    );
    assert_eq!(out.stdout, "200", "{out:?} {}", proxy.logs(4000));
    assert!(proxy.is_running());
    let st = proxy.terminate(Duration::from_secs(10));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", proxy.logs(4000));
}
