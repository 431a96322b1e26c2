//! Reload stage: SIGHUP or a change of the config file validates the new
//! file and swaps it in for new flows. A bad file is logged and counted; the
//! running config stays.
//!
//! The file is polled once a second by path, following symlinks: its device,
//! inode, mtime, ctime and size. A Kubernetes ConfigMap volume updates
//! `dir/config.toml -> ..data/config.toml` by renaming a new `..data` symlink
//! over the old one, which changes the inode the path leads to, so it is seen
//! like an edit in place. One task owns both triggers and the fingerprint of
//! the file as last read, so a SIGHUP after an edit does not reload twice.
//!
//! Included files (`include`) are watched the same way: each tick the
//! patterns are matched again in their directories and every match is
//! fingerprinted, so an included ConfigMap's `..data` swap, a file added or a
//! file removed triggers a reload like an edit of the config file.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;
use crate::metrics::ResultLabel;
use crate::state::{Generation, Revocation, Shared};

pub enum Trigger {
    Signal,
    FileChanged,
}

/// What identifies the file's current contents without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    size: u64,
}

/// The fingerprint of whatever `path` leads to now (symlinks followed).
pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        size: m.len(),
    })
}

/// Everything a reload reads: the config file and each file its `include`
/// patterns match now (patterns read leniently, so an invalid config file
/// still has its includes watched).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchState {
    config: Option<Fingerprint>,
    included: Vec<(PathBuf, Option<Fingerprint>)>,
}

pub fn watch_state(path: &Path) -> WatchState {
    let config = fingerprint(path);
    let mut included = Vec::new();
    for pattern in crate::config::include_patterns(path) {
        if let Ok(files) = crate::config::include_matches(path, &pattern) {
            included.extend(files.into_iter().map(|f| {
                let fp = fingerprint(&f);
                (f, fp)
            }));
        }
    }
    WatchState { config, included }
}

/// [`watch_state`] off the runtime's workers: it reads the config file for its
/// `include` patterns, and a read may block (a FIFO, a hung network
/// filesystem), which on a worker would stall every flow and signal.
async fn watch_state_blocking(path: &Path) -> WatchState {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || watch_state(&p))
        .await
        .unwrap_or_default()
}

const POLL: Duration = Duration::from_secs(1);
/// A changed file must stay unchanged this long before it is read, so a
/// writer caught half-way is not reported as an invalid config.
const SETTLE: Duration = Duration::from_millis(200);

/// Starts the reload task; returns the sender SIGHUP uses. `loaded` is the
/// state taken before the running config was read.
pub fn spawn_watcher(
    shared: Arc<Shared>,
    path: PathBuf,
    loaded: WatchState,
) -> mpsc::Sender<Trigger> {
    let (tx, mut rx) = mpsc::channel::<Trigger>(8);
    tokio::spawn(async move {
        let mut last = loaded;
        let mut tick = tokio::time::interval_at(Instant::now() + POLL, POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                t = rx.recv() => match t {
                    None => return,
                    Some(Trigger::Signal) => "SIGHUP",
                    Some(Trigger::FileChanged) => "file changed",
                },
                _ = tick.tick() => {
                    let now = watch_state_blocking(&path).await;
                    if now.config.is_none() || now == last {
                        continue;
                    }
                    tokio::time::sleep(SETTLE).await;
                    if watch_state_blocking(&path).await != now {
                        continue; // still being written: look again next tick
                    }
                    "file changed"
                }
            };
            // Taken before reading: a change made after it is seen next tick.
            let now = watch_state_blocking(&path).await;
            if now.config.is_some() {
                last = now;
            }
            // Reading the file may block (a FIFO, a hung network filesystem): never on a
            // runtime worker, where it could stall the I/O driver and with it every flow and
            // signal.
            let (s, p) = (shared.clone(), path.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || reload(&s, &p, why)).await {
                tracing::error!(error = %e, "reload task failed");
            }
        }
    });
    tx
}

/// What SIGHUP does, from the signal loop, which must never wait (SIGTERM must always be
/// seen): reopen a file access log (logrotate), and queue a reload unless one is queued
/// already. A reload still in the queue reads the file when it runs, so nothing is lost by
/// not queueing a second one.
pub fn sighup(shared: &Shared, reloads: &mpsc::Sender<Trigger>) {
    shared.access_log.reopen();
    if let Err(mpsc::error::TrySendError::Full(_)) = reloads.try_send(Trigger::Signal) {
        tracing::info!("SIGHUP: a reload is already queued");
    }
}

/// The outcome of comparing a new file with the running config, pure.
#[derive(Debug)]
pub struct Plan {
    /// The new config with the restart-required keys pinned to their
    /// running values: what is in force after the reload.
    pub effective: Config,
    pub restart_required: Vec<String>,
    pub rerun_init: bool,
    /// Entries of the previous generation that the new one lacks.
    pub removed: HashSet<String>,
}

/// Compares `new` with the config the process started with (`started`: what
/// the listeners and `init` were set up from) and the one in force (`old`).
pub fn plan(started: &Config, old: &Config, mut new: Config) -> Plan {
    let mut restart = Vec::new();
    let (a, b) = (&started.proxy, &mut new.proxy);
    if a.listen != b.listen {
        restart.push("proxy.listen".to_string());
        b.listen = a.listen.clone();
    }
    if a.explicit_listen != b.explicit_listen {
        restart.push("proxy.explicit_listen".to_string());
        b.explicit_listen = a.explicit_listen.clone();
    }
    if a.health != b.health {
        restart.push("proxy.health".to_string());
        b.health = a.health.clone();
    }
    if a.admin != b.admin {
        restart.push("proxy.admin".to_string());
        b.admin = a.admin;
    }
    if a.access_log != b.access_log {
        restart.push("proxy.access_log".to_string());
        b.access_log = a.access_log.clone();
    }
    if a.max_connections != b.max_connections {
        restart.push("proxy.max_connections".to_string());
        b.max_connections = a.max_connections;
    }
    // Read once at start (docs/DESIGN.md §3 step 7), never on reload.
    if a.resolv_conf != b.resolv_conf {
        restart.push("proxy.resolv_conf".to_string());
        b.resolv_conf = a.resolv_conf.clone();
    }
    if a.hosts_file != b.hosts_file {
        restart.push("proxy.hosts_file".to_string());
        b.hosts_file = a.hosts_file.clone();
    }
    let redirect_changed = started.redirect != new.redirect;
    if redirect_changed {
        restart.push("redirect".to_string());
        new.redirect = started.redirect.clone();
    }
    // The non-TCP filter is init's: TCP follows the new policy at once, the
    // installed filter does not.
    let filter = crate::init::render::filter_active;
    let rerun_init = filter(started) != filter(&new) || redirect_changed;
    let kept: HashSet<&str> = new.entries.iter().map(|e| e.name.as_str()).collect();
    let removed = old
        .entries
        .iter()
        .map(|e| e.name.clone())
        .filter(|n| !kept.contains(n.as_str()))
        .collect();
    Plan {
        effective: new,
        restart_required: restart,
        rerun_init,
        removed,
    }
}

/// One reload attempt.
pub fn reload(shared: &Arc<Shared>, path: &Path, why: &str) {
    let now = crate::access_log::timestamp(SystemTime::now());
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(trigger = why, error = %e, "reload failed: the running config stays");
            shared
                .metrics
                .reloads
                .get_or_create(&ResultLabel { result: "failure" })
                .inc();
            shared.metrics.last_reload_ok.set(0);
            shared.set_reload_status(|s| {
                s.last_reload = Some(now);
                s.last_result = Some("failure");
                s.last_error = Some(e.to_string());
            });
            return;
        }
    };
    let old = shared.generation();
    let started = shared.started_config();
    let Plan {
        effective,
        restart_required,
        rerun_init,
        removed,
    } = plan(&started, old.config(), new);
    if !restart_required.is_empty() {
        tracing::warn!(keys = ?restart_required, "restart required: these keys changed but keep their running values until a restart");
    }
    if rerun_init {
        tracing::warn!("re-run init: the rules installed by `portcullis init` no longer match the config (outbound_traffic_policy/audit change the non-TCP filter; [redirect] changes the rules); TCP follows the new policy at once");
    }
    shared
        .metrics
        .rules_match
        .set(if rerun_init { 0 } else { 1 });
    for w in &effective.warnings {
        tracing::warn!("{w}");
    }
    let revoke = effective.proxy.revoke_on_reload;
    let drain = effective.proxy.drain_timeout;
    let kept: HashSet<String> = effective.entries.iter().map(|e| e.name.clone()).collect();
    let entries = effective.entries.len();
    shared.install(Arc::new(Generation::after(Arc::new(effective), &old)));

    // Revocations: earlier ones stand unless the entry came back; this
    // reload's removals are added when revoke_on_reload is set.
    let prev = shared.revocations().borrow().clone();
    let at = Instant::now() + drain;
    let mut deadlines: HashMap<String, Instant> = prev
        .deadlines
        .iter()
        .filter(|(name, when)| !kept.contains(*name) && when.elapsed() < Duration::from_secs(60))
        .map(|(n, w)| (n.clone(), *w))
        .collect();
    if revoke && !removed.is_empty() {
        tracing::info!(entries = ?removed, after = ?drain, "revoke_on_reload: flows of removed entries will be closed");
        for name in &removed {
            deadlines.entry(name.clone()).or_insert(at);
        }
    }
    if deadlines != *prev.deadlines {
        shared.revoke(Revocation {
            deadlines: Arc::new(deadlines),
            all: prev.all,
        });
    }

    shared
        .metrics
        .reloads
        .get_or_create(&ResultLabel { result: "success" })
        .inc();
    shared.metrics.last_reload_ok.set(1);
    shared.set_reload_status(|s| {
        s.last_reload = Some(now);
        s.last_result = Some("success");
        s.last_error = None;
        s.restart_required = restart_required;
        s.rerun_init = rerun_init;
    });
    tracing::info!(trigger = why, entries, "config reloaded");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("t.toml"), text).unwrap()
    }

    const BASE: &str = "[proxy]\nlisten = [\"127.0.0.1:15001\"]\n[redirect]\nproxy_uid = 1337\n";
    const API: &str = "[[service_entry]]\nname = \"api\"\nhosts = [\"api.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n";
    const FILES: &str = "[[service_entry]]\nname = \"files\"\nhosts = [\"files.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n";

    #[test]
    fn entries_only_change_nothing_else() {
        let a = cfg(&format!("{BASE}{API}{FILES}"));
        let p = plan(&a, &a, cfg(&format!("{BASE}{API}")));
        assert!(p.restart_required.is_empty());
        assert!(!p.rerun_init);
        assert_eq!(p.removed, HashSet::from(["files".to_string()]));
    }

    #[test]
    fn restart_required_keys_keep_their_running_values() {
        let a = cfg(&format!("{BASE}{API}"));
        let b = cfg(&format!(
            "[proxy]\nlisten = [\"127.0.0.1:15002\"]\nadmin = \"127.0.0.1:16000\"\nhealth = \"off\"\naccess_log = \"off\"\nmax_connections = 10\nidle_timeout = \"5s\"\n[redirect]\nproxy_uid = 1338\n{API}"
        ));
        let p = plan(&a, &a, b);
        assert_eq!(
            p.restart_required,
            [
                "proxy.listen",
                "proxy.health",
                "proxy.admin",
                "proxy.access_log",
                "proxy.max_connections",
                "redirect"
            ]
        );
        let e = &p.effective;
        assert_eq!(e.proxy.listen, a.proxy.listen);
        assert_eq!(e.proxy.admin, a.proxy.admin);
        assert_eq!(e.proxy.health, a.proxy.health);
        assert_eq!(e.proxy.access_log, a.proxy.access_log);
        assert_eq!(e.proxy.max_connections, a.proxy.max_connections);
        assert_eq!(e.redirect, a.redirect);
        // what may change, does
        assert_eq!(e.proxy.idle_timeout, Duration::from_secs(5));
        assert!(p.rerun_init, "[redirect] changed: the rules are stale");
    }

    #[test]
    fn resolver_files_are_read_once_a_change_needs_a_restart() {
        let a = cfg(&format!("{BASE}{API}"));
        let b = cfg(&format!(
            "[proxy]\nlisten = [\"127.0.0.1:15001\"]\nresolv_conf = \"/x/resolv.conf\"\nhosts_file = \"none\"\n[redirect]\nproxy_uid = 1337\n{API}"
        ));
        let p = plan(&a, &a, b);
        assert_eq!(
            p.restart_required,
            ["proxy.resolv_conf", "proxy.hosts_file"]
        );
        assert_eq!(
            p.effective.proxy.resolv_conf.as_deref(),
            Some(Path::new("/etc/resolv.conf"))
        );
        assert_eq!(
            p.effective.proxy.hosts_file.as_deref(),
            Some(Path::new("/etc/hosts"))
        );
    }

    #[test]
    fn a_reload_carries_resolved_addresses_of_unchanged_hosts_over() {
        use crate::registry::ResolvedAddrs;
        let tcp = |name: &str, host: &str| {
            format!("[[service_entry]]\nname = \"{name}\"\nhosts = [\"{host}\"]\nports = [{{ number = 5432, protocol = \"TCP\" }}]\nresolution = \"DNS\"\n")
        };
        let old = Generation::new(Arc::new(cfg(&format!(
            "{BASE}{}{}",
            tcp("db", "db.example.com"),
            tcp("cache", "cache.example.com")
        ))));
        let ip: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let ip2: std::net::IpAddr = "192.0.2.11".parse().unwrap();
        old.resolved.set(0, &[ip]);
        old.resolved.set(1, &[ip2]);
        // an entry added in front (indexes move), db renamed but its hosts
        // unchanged, cache pointed at another host
        let new = Generation::after(
            Arc::new(cfg(&format!(
                "{BASE}{API}{}{}",
                tcp("database", "db.example.com"),
                tcp("cache", "cache2.example.com")
            ))),
            &old,
        );
        assert!(new.resolved.contains(1, ip), "db's address carried over");
        assert!(
            !new.resolved.contains(2, ip2),
            "cache's hosts changed: re-resolved"
        );
        assert!(!new.resolved.contains(2, ip));
    }

    /// The replaced generation's background resolution stops at once, not
    /// after sleeping out its TTL (here the hosts file's 5 minutes).
    #[tokio::test]
    async fn a_replaced_generations_resolver_tasks_stop_at_once() {
        use crate::registry::ResolvedAddrs;
        let dir = std::env::temp_dir().join(format!("portcullis-retire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "192.0.2.10 db.example.com\n").unwrap();
        let text = format!(
            "[proxy]\nlisten = [\"127.0.0.1:15001\"]\naccess_log = \"off\"\nresolv_conf = \"none\"\nhosts_file = \"{}\"\n[redirect]\nproxy_uid = 1337\n[[service_entry]]\nname = \"db\"\nhosts = [\"db.example.com\"]\nports = [{{ number = 5432, protocol = \"TCP\" }}]\nresolution = \"DNS\"\n",
            hosts.display()
        );
        let config = Arc::new(cfg(&text));
        let shared = Shared::new(config.clone(), 0).unwrap();
        let old = shared.generation();
        crate::state::spawn_tcp_resolution(shared.clone(), old.clone());
        let ip: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let t0 = Instant::now();
        while !old.resolved.contains(0, ip) {
            assert!(t0.elapsed() < Duration::from_secs(5), "never resolved");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // the task holds the map while it runs
        assert!(Arc::strong_count(&old.resolved) > 1);
        shared.install(Arc::new(Generation::after(config, &old)));
        let t0 = Instant::now();
        while Arc::strong_count(&old.resolved) > 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "the old generation's resolver task is still running"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(shared.generation().resolved.contains(0, ip), "carried over");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rerun_init_follows_the_non_tcp_filter() {
        let strict = cfg(&format!("{BASE}{API}"));
        let audit = cfg(&format!("audit = true\n{BASE}{API}"));
        let any = cfg(&format!(
            "outbound_traffic_policy = \"ALLOW_ANY\"\n{BASE}{API}"
        ));
        let any_audit = cfg(&format!(
            "outbound_traffic_policy = \"ALLOW_ANY\"\naudit = true\n{BASE}{API}"
        ));
        assert!(plan(&strict, &strict, audit.clone()).rerun_init);
        assert!(plan(&strict, &strict, any.clone()).rerun_init);
        assert!(plan(&audit, &audit, strict.clone()).rerun_init);
        // no filter before, none after
        assert!(!plan(&audit, &audit, any.clone()).rerun_init);
        assert!(!plan(&any, &any, any_audit).rerun_init);
        // back to what init installed: the rules match again
        assert!(!plan(&strict, &audit, strict.clone()).rerun_init);
    }

    #[test]
    fn fingerprint_follows_a_configmap_symlink_swap() {
        let dir = std::env::temp_dir().join(format!("portcullis-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2026_01")).unwrap();
        std::fs::create_dir_all(dir.join("..2026_02")).unwrap();
        std::fs::write(dir.join("..2026_01/config.toml"), "a = 1\n").unwrap();
        std::fs::write(dir.join("..2026_02/config.toml"), "a = 2\n").unwrap();
        std::os::unix::fs::symlink("..2026_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.toml", dir.join("config.toml")).unwrap();
        let path = dir.join("config.toml");
        let before = fingerprint(&path).unwrap();
        assert_eq!(fingerprint(&path), Some(before));
        std::os::unix::fs::symlink("..2026_02", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let after = fingerprint(&path).unwrap();
        assert_ne!(
            before, after,
            "same size, maybe same mtime: the inode differs"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watch_state_follows_included_files_and_their_configmap_swap() {
        let dir = std::env::temp_dir().join(format!("portcullis-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let istio = dir.join("istio");
        std::fs::create_dir_all(istio.join("..2026_01")).unwrap();
        std::fs::write(istio.join("..2026_01/se.yaml"), "a: 1\n").unwrap();
        std::os::unix::fs::symlink("..2026_01", istio.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/se.yaml", istio.join("se.yaml")).unwrap();
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, "include = [\"istio/*.yaml\", \"entries/*.toml\"]\n").unwrap();
        let before = watch_state(&cfg);
        assert_eq!(before.included.len(), 1, "{before:?}: not ..data/ again");
        assert_eq!(watch_state(&cfg), before);
        // the ConfigMap swap
        std::fs::create_dir_all(istio.join("..2026_02")).unwrap();
        std::fs::write(istio.join("..2026_02/se.yaml"), "a: 2\n").unwrap();
        std::os::unix::fs::symlink("..2026_02", istio.join("..data_tmp")).unwrap();
        std::fs::rename(istio.join("..data_tmp"), istio.join("..data")).unwrap();
        let swapped = watch_state(&cfg);
        assert_ne!(swapped, before);
        // a file appearing under another pattern
        std::fs::create_dir_all(dir.join("entries")).unwrap();
        std::fs::write(dir.join("entries/a.toml"), "").unwrap();
        let added = watch_state(&cfg);
        assert_ne!(added, swapped);
        assert_eq!(added.included.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
