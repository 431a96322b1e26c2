//! Reload stage: SIGHUP or a change of the config file (polled once a
//! second by path, so a Kubernetes ConfigMap's `..data` symlink swap, which
//! changes the file's inode, is seen too) validates the new file and swaps
//! it in for new flows. A bad file is logged and counted; the running config
//! stays.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::metrics::ResultLabel;
use crate::proxy::{Generation, Shared};

pub enum Trigger {
    Signal,
    FileChanged,
}

/// What `/config` reports about reloads.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadStatus {
    pub last_reload: Option<String>,
    pub last_result: Option<&'static str>,
    pub last_error: Option<String>,
    /// Keys changed in the file that take effect only after a restart.
    pub restart_required: Vec<String>,
    /// The policy or audit changed: the non-TCP filter is init's, re-run it.
    pub rerun_init: bool,
}

/// Entries removed by a reload, whose flows are closed after `drain_timeout`
/// when `revoke_on_reload` is set.
#[derive(Clone, Debug, Default)]
pub struct Revocation {
    pub removed: Arc<HashSet<String>>,
    pub at: Option<tokio::time::Instant>,
}

fn fingerprint(path: &std::path::Path) -> Option<(u64, u64, i64, u64)> {
    // metadata() follows symlinks: the inode of whatever the path names now.
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
        m.len(),
    ))
}

/// Starts the reload task; returns the sender SIGHUP uses.
pub fn spawn_watcher(shared: Arc<Shared>, path: PathBuf) -> mpsc::Sender<Trigger> {
    let (tx, mut rx) = mpsc::channel::<Trigger>(8);
    let poll_tx = tx.clone();
    let poll_path = path.clone();
    tokio::spawn(async move {
        let mut last = fingerprint(&poll_path);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = fingerprint(&poll_path);
            if now != last && now.is_some() {
                last = now;
                if poll_tx.send(Trigger::FileChanged).await.is_err() {
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(t) = rx.recv().await {
            let why = match t {
                Trigger::Signal => "SIGHUP",
                Trigger::FileChanged => "file changed",
            };
            reload(&shared, &path, why);
        }
    });
    tx
}

/// One reload attempt.
pub fn reload(shared: &Arc<Shared>, path: &std::path::Path, why: &str) {
    let now = crate::access_log::timestamp(SystemTime::now());
    let new = match Config::load(path) {
        Ok(c) => Arc::new(c),
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
    let mut restart = Vec::new();
    let (a, b) = (&started.proxy, &new.proxy);
    if a.listen != b.listen {
        restart.push("proxy.listen".to_string());
    }
    if a.health != b.health {
        restart.push("proxy.health".to_string());
    }
    if a.admin != b.admin {
        restart.push("proxy.admin".to_string());
    }
    if a.access_log != b.access_log {
        restart.push("proxy.access_log".to_string());
    }
    if a.max_connections != b.max_connections {
        restart.push("proxy.max_connections".to_string());
    }
    if started.redirect != new.redirect {
        restart.push("redirect".to_string());
    }
    let rerun_init = started.outbound_traffic_policy != new.outbound_traffic_policy
        || started.audit_mode() != new.audit_mode();
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "restart required: these keys changed but take effect only after a restart");
    }
    if rerun_init {
        tracing::warn!("re-run init: outbound_traffic_policy or audit changed; TCP follows at once, but the non-TCP filter installed by `portcullis init` still reflects the old policy");
    }
    shared
        .metrics
        .rules_match
        .set(if rerun_init { 0 } else { 1 });
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    let removed: HashSet<String> = {
        let kept: HashSet<&str> = new.entries.iter().map(|e| e.name.as_str()).collect();
        old.config()
            .entries
            .iter()
            .map(|e| e.name.clone())
            .filter(|n| !kept.contains(n.as_str()))
            .collect()
    };
    let revoke = new.proxy.revoke_on_reload && !removed.is_empty();
    let drain = new.proxy.drain_timeout;
    let entries = new.entries.len();
    shared.install(Arc::new(Generation::new(new)));
    if revoke {
        tracing::info!(entries = ?removed, after = ?drain, "revoke_on_reload: flows of removed entries will be closed");
        shared.revoke(Revocation {
            removed: Arc::new(removed),
            at: Some(tokio::time::Instant::now() + drain),
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
        s.restart_required = restart;
        s.rerun_init = rerun_init;
    });
    tracing::info!(trigger = why, entries, "config reloaded");
}
