//! `portcullis run`: starts the listeners, the background resolution, the
//! health and admin endpoints, and handles signals (reload, drain).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::config::Config;
use crate::proxy::{accept_loop, bind_worker_listeners};
use crate::state::{spawn_tcp_resolution, Shared};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    SelfExclusion(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A tokio runtime (the control runtime or a worker's) could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
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

/// `portcullis run`: builds the control runtime on this thread and runs the proxy on it until
/// SIGTERM/SIGINT and the drain that follows (see [`run`]).
pub fn start(path: &Path) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    rt.block_on(run(path))
}

/// How many worker runtimes carry the transparent flows: the CPUs this process may use
/// (`available_parallelism` honours the affinity mask and the cgroup CPU quota), at least one.
pub fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Starts one worker thread per listener set, each running a single-threaded runtime that
/// accepts on its own listeners and runs the flows it accepted to their end (docs/DESIGN.md,
/// "Threads"). The workers live as long as the process.
fn spawn_workers(
    shared: &Arc<Shared>,
    sets: Vec<Vec<std::net::TcpListener>>,
) -> Result<(), RunError> {
    for (i, set) in sets.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RunError::Runtime)?;
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("portcullis-w{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(heartbeat());
                    for l in set {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => {
                                tokio::spawn(accept_loop(shared.clone(), l));
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "worker cannot register a listener")
                            }
                        }
                    }
                    std::future::pending::<()>().await
                })
            })?;
    }
    Ok(())
}

/// A timer that is always due within [`HEARTBEAT`] on a worker runtime. tokio's timer wakes its
/// own thread (an eventfd write, and one more turn of epoll_wait) whenever a timer is set to fire
/// before every other one it holds; on a single-threaded runtime that happens to most flows when
/// few are open (each sets a `first_byte_timeout`, 200 ms by default, and longer ones). With this
/// timer there, a flow's timers are seldom the earliest (measured with `strace -c` on the bench's
/// churn at concurrency 1: 1.7 eventfd writes per flow without it, bench/README.md). Idle, it
/// costs a worker ten wake-ups a second.
async fn heartbeat() {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

const HEARTBEAT: Duration = Duration::from_millis(100);

/// Runs the proxy until SIGTERM/SIGINT and the drain that follows. The caller's runtime is the
/// control side (signals, reload, admin, resolution, the explicit proxy); the transparent
/// listeners get worker threads of their own ([`worker_count`]).
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
        let workers = worker_count();
        let sets = bind_worker_listeners(&config.proxy.listen, workers)?;
        for l in sets.first().into_iter().flatten() {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, workers, "listening");
            }
        }
        spawn_workers(&shared, sets)?;
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
