//! `portcullis run`: starts the listeners, the background resolution, the
//! health and admin endpoints, and handles signals (reload, drain).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::proxy::{accept_loop, bind_listeners, spawn_tcp_resolution, Shared};

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
/// redirected back to it (DESIGN §2, last rule).
pub fn check_self_exclusion(cfg: &Config) -> Result<(), RunError> {
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let mark_works = cfg
        .redirect
        .mark
        .is_some_and(crate::proxy::upstream::mark_works);
    crate::config::check_self_exclusion(&cfg.redirect, euid, egid, mark_works)
        .map_err(RunError::SelfExclusion)
}

/// Runs the proxy until SIGTERM/SIGINT and the drain that follows.
pub async fn run(path: &Path) -> Result<(), RunError> {
    let config = Arc::new(Config::load(path)?);
    check_self_exclusion(&config)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let shared = Shared::new(config.clone())?;
    let listeners = bind_listeners(&config.proxy.listen)?;
    for l in listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "listening");
        }
        tokio::spawn(accept_loop(shared.clone(), l));
    }
    spawn_tcp_resolution(shared.clone(), shared.generation());
    crate::admin::spawn(shared.clone(), &config).await?;
    shared.listening.store(true, Ordering::Release);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let reloads = crate::reload::spawn_watcher(shared.clone(), path.to_path_buf());
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = reloads.send(crate::reload::Trigger::Signal).await;
            }
        }
    }
    drain(&shared).await;
    Ok(())
}

/// DESIGN §4 shutdown: /ready turns 503 while the proxy keeps accepting and
/// serving for at least `drain_min`, then until no flows remain or
/// `drain_timeout` passes.
async fn drain(shared: &Arc<Shared>) {
    shared.draining.store(true, Ordering::Release);
    let cfg = shared.generation();
    let cfg = cfg.config();
    tracing::info!(
        drain_min = ?cfg.proxy.drain_min,
        drain_timeout = ?cfg.proxy.drain_timeout,
        active = shared.active.load(Ordering::Acquire),
        "SIGTERM: draining"
    );
    tokio::time::sleep(cfg.proxy.drain_min).await;
    let deadline =
        tokio::time::Instant::now() + cfg.proxy.drain_timeout.saturating_sub(cfg.proxy.drain_min);
    while shared.active.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(
        active = shared.active.load(Ordering::Acquire),
        "drained: exiting"
    );
}
