//! `portcullis run`: starts the listeners, the background resolution, the
//! health and admin endpoints, and handles signals (reload, drain).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::config::Config;
use crate::proxy::{accept_loop, bind_listeners};
use crate::state::{spawn_tcp_resolution, Shared};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    SelfExclusion(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Refuses to start when the proxy's own upstream traffic would be
/// redirected back to it (docs/DESIGN.md §2, last rule).
pub fn check_self_exclusion(cfg: &Config) -> Result<(), RunError> {
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let mark_works = cfg.redirect.mark.is_some_and(crate::upstream::mark_works);
    crate::config::check_self_exclusion(&cfg.redirect, euid, egid, mark_works)
        .map_err(RunError::SelfExclusion)
}

/// Runs the proxy until SIGTERM/SIGINT and the drain that follows.
pub async fn run(path: &Path) -> Result<(), RunError> {
    // Taken before reading, so an edit racing the start is seen as a change.
    let loaded = crate::reload::watch_state(path);
    let config = Arc::new(Config::load(path)?);
    if config.proxy.listen.is_empty() {
        // Explicit proxy only: no redirect rules exist, so nothing of ours
        // can loop back and the proxy need not be excluded from them.
        tracing::info!("listen = []: explicit proxy only, no self-exclusion check");
    } else {
        check_self_exclusion(&config)?;
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Handlers first: from here on SIGTERM drains instead of killing.
    let mut signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    let shared = Shared::new(config.clone(), crate::endpoint::reserved_fds(&config.proxy))?;
    if !config.proxy.listen.is_empty() {
        let listeners = bind_listeners(&config.proxy.listen)?;
        for l in listeners {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "listening");
            }
            tokio::spawn(accept_loop(shared.clone(), l));
        }
    }
    if !config.proxy.explicit_listen.is_empty() {
        crate::proxy::explicit::start(shared.clone(), &config.proxy.explicit_listen)?;
    }
    spawn_tcp_resolution(shared.clone(), shared.generation());
    crate::admin::spawn(shared.clone(), &config).await?;
    shared.listening.store(true, Ordering::Release);

    let reloads = crate::reload::spawn_watcher(shared.clone(), path.to_path_buf(), loaded);
    let why = loop {
        tokio::select! {
            _ = signals.term.recv() => break "SIGTERM",
            _ = signals.int.recv() => break "SIGINT",
            _ = signals.hup.recv() => crate::reload::sighup(&shared, &reloads),
        }
    };
    drain(&shared, why, &mut signals, &reloads).await;
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// docs/DESIGN.md §4 shutdown: /ready turns 503 while the proxy keeps accepting and
/// serving for at least `drain_min`, then until no flows remain or
/// `drain_timeout` (counted from the signal) passes. Flows still open then
/// are closed and logged; the access log is flushed; the caller exits 0.
/// SIGHUP still reloads meanwhile; a second SIGINT (Ctrl-C) ends the drain.
async fn drain(
    shared: &Arc<Shared>,
    why: &str,
    signals: &mut Signals,
    reloads: &tokio::sync::mpsc::Sender<crate::reload::Trigger>,
) {
    shared.draining.store(true, Ordering::Release);
    let start = Instant::now();
    let (drain_min, drain_timeout) = {
        let g = shared.generation();
        (g.config().proxy.drain_min, g.config().proxy.drain_timeout)
    };
    let min_until = start + drain_min;
    let hard = start + drain_timeout.max(drain_min);
    let active = || shared.active.load(Ordering::Acquire);
    tracing::info!(
        signal = why,
        drain_min = ?drain_min,
        drain_timeout = ?drain_timeout,
        active = active(),
        "draining: /ready says 503, flows are still accepted and served"
    );
    loop {
        let now = Instant::now();
        if now >= hard || (now >= min_until && active() == 0) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = signals.int.recv() => {
                tracing::warn!("second SIGINT: ending the drain now");
                break;
            }
            _ = signals.term.recv() => {
                tracing::info!("SIGTERM again: already draining");
            }
            _ = signals.hup.recv() => crate::reload::sighup(shared, reloads),
        }
    }
    if active() > 0 {
        tracing::warn!(
            active = active(),
            "drain over: closing the flows still open"
        );
        crate::drain::close_all(shared, Instant::now());
        // Each closed flow writes its access-log line as it ends.
        let until = Instant::now() + Duration::from_secs(1);
        while active() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tracing::info!(
        active = active(),
        elapsed = ?start.elapsed(),
        "drained: exiting"
    );
    let log = shared.access_log.clone();
    let flushed = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2)))
        .await
        .unwrap_or(false);
    if !flushed {
        tracing::warn!("access log: lines still queued at exit are lost (is its reader blocked?)");
    }
}
