//! `portcullis run --redirect`: the try-out host mode. As root it installs
//! the `[redirect]` rules, runs the proxy in a child process as
//! `proxy_uid`/`proxy_gid`, forwards signals to it, and removes the rules
//! when the child exits. (If this parent is killed outright, the rules stay:
//! `portcullis init --cleanup` removes them.) Production hosts use the
//! systemd unit in deploy/, which leaves the rules in place (fail closed).

use std::path::Path;
use std::process::Stdio;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, ConfigError};
use crate::init::{self, BackendChoice, InitError};

/// Why host mode could not run the proxy (the proxy's own failures are its
/// exit status, not an error here).
#[derive(Debug, thiserror::Error)]
pub enum HostModeError {
    #[error("portcullis run --redirect: must run as root (it installs iptables rules and then drops to proxy_uid)")]
    NotRoot,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("portcullis run --redirect: {0}")]
    Install(#[source] InitError),
    #[error("portcullis: cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("portcullis: cannot find its own executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error("portcullis: cannot start the proxy as uid {uid}: {source}")]
    Spawn { uid: u32, source: std::io::Error },
    #[error("portcullis: cannot handle signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("portcullis: waiting for the proxy failed: {0}")]
    Child(#[source] std::io::Error),
}

/// Runs host mode to the end; returns the exit status to use.
pub fn run(path: &Path) -> Result<u8, HostModeError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(HostModeError::NotRoot);
    }
    let cfg = Config::load(path)?;
    let installed = init::install(&cfg, BackendChoice::Auto).map_err(HostModeError::Install)?;
    for n in &installed.notes {
        eprintln!("portcullis init: {n}");
    }
    eprintln!("portcullis: redirect rules installed; they are removed when the proxy exits");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HostModeError::Runtime)?;
    let status = rt.block_on(supervise(path, &cfg));
    match init::cleanup(BackendChoice::Auto, false) {
        Ok(_) => eprintln!("portcullis: redirect rules removed"),
        Err(e) => eprintln!(
            "portcullis: removing the redirect rules failed: {e} (run `portcullis init --cleanup`)"
        ),
    }
    status
}

async fn supervise(path: &Path, cfg: &Config) -> Result<u8, HostModeError> {
    let exe = std::env::current_exe().map_err(HostModeError::CurrentExe)?;
    let uid = cfg.redirect.proxy_uid;
    let gid = cfg.redirect.proxy_gid.unwrap_or(uid);
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run")
        .arg("-c")
        .arg(path)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null());
    // std drops root's supplementary groups when it sets the uid, so the
    // child is exactly proxy_uid/proxy_gid.
    let mut child = cmd
        .spawn()
        .map_err(|source| HostModeError::Spawn { uid, source })?;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let handler = |kind| signal(kind).map_err(HostModeError::Signals);
    let mut term = handler(SignalKind::terminate())?;
    let mut int = handler(SignalKind::interrupt())?;
    let mut hup = handler(SignalKind::hangup())?;
    loop {
        let sig = tokio::select! {
            st = child.wait() => {
                let st = st.map_err(HostModeError::Child)?;
                return Ok(st.code().map(|c| c.clamp(0, 255) as u8).unwrap_or(1));
            }
            _ = term.recv() => Signal::SIGTERM,
            _ = int.recv() => Signal::SIGTERM,
            _ = hup.recv() => Signal::SIGHUP,
        };
        if let Some(p) = pid {
            let _ = kill(p, sig);
        }
    }
}
