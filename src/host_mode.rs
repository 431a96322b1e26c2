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

use crate::config::Config;
use crate::init::{self, BackendChoice};

/// Runs host mode to the end; returns the exit status to use.
pub fn run(path: &Path) -> Result<u8, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("portcullis run --redirect: must run as root (it installs iptables rules and then drops to proxy_uid)".into());
    }
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    let installed = init::install(&cfg, BackendChoice::Auto)
        .map_err(|e| format!("portcullis run --redirect: {e}"))?;
    for n in &installed.notes {
        eprintln!("portcullis init: {n}");
    }
    eprintln!("portcullis: redirect rules installed; they are removed when the proxy exits");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("portcullis: cannot start the runtime: {e}"))?;
    let status = rt.block_on(supervise(path, &cfg));
    match init::cleanup(BackendChoice::Auto, false) {
        Ok(_) => eprintln!("portcullis: redirect rules removed"),
        Err(e) => eprintln!(
            "portcullis: removing the redirect rules failed: {e} (run `portcullis init --cleanup`)"
        ),
    }
    status
}

async fn supervise(path: &Path, cfg: &Config) -> Result<u8, String> {
    let exe = std::env::current_exe().map_err(|e| format!("portcullis: {e}"))?;
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
        .map_err(|e| format!("portcullis: cannot start the proxy as uid {uid}: {e}"))?;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        let sig = tokio::select! {
            st = child.wait() => {
                let st = st.map_err(|e| e.to_string())?;
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
