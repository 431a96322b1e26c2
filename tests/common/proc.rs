//! Commands run inside (or outside) a test namespace, and guards for the
//! processes a test starts: every process is ended by its pid (its process
//! group, in fact: each one leads its own) when its guard drops.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::netns::poll_until;

/// Environment variables that would send a client somewhere outside the test world.
const PROXY_ENV: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "ftp_proxy",
    "FTP_PROXY",
];

/// A command line plus how to run it: namespace, identity, stdin, timeout.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    ns: Option<String>,
    user: Option<(u32, u32)>,
    stdin: Option<Vec<u8>>,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
    label: Option<String>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            ns: None,
            user: None,
            stdin: None,
            env: Vec::new(),
            timeout: Duration::from_secs(60),
            label: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Run inside network namespace `ns` via `ip netns exec` (so that
    /// /etc/netns/NS/{resolv.conf,hosts,nsswitch.conf} apply).
    pub fn ns(mut self, ns: &str) -> Cmd {
        self.ns = Some(ns.to_string());
        self
    }

    /// Run as `uid`/`gid` with no supplementary groups (via setpriv, which
    /// execs: the pid of the guard is the program's own pid).
    pub fn user(mut self, uid: u32, gid: u32) -> Cmd {
        self.user = Some((uid, gid));
        self
    }

    /// Bytes written to the program's stdin (then closed). Without it stdin is /dev/null.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// `run` kills the program after this long (default 60 s). Unused by `spawn`.
    pub fn timeout(mut self, d: Duration) -> Cmd {
        self.timeout = d;
        self
    }

    /// Name used for the log files of a spawned process (default: program name).
    pub fn label(mut self, l: &str) -> Cmd {
        self.label = Some(l.to_string());
        self
    }

    pub fn get_label(&self) -> String {
        self.label.clone().unwrap_or_else(|| {
            Path::new(&self.program)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "proc".into())
        })
    }

    fn command(&self) -> Command {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.ns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(OsString::from));
        }
        if let Some((uid, gid)) = self.user {
            argv.push("setpriv".into());
            argv.push(format!("--reuid={uid}").into());
            argv.push(format!("--regid={gid}").into());
            argv.push("--clear-groups".into());
            argv.push("--".into());
        }
        argv.push(self.program.clone());
        argv.extend(self.args.iter().cloned());
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        for k in PROXY_ENV {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        // own process group: the guard can end the program and anything it forks
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c
    }

    /// Runs to completion (or `timeout`), capturing stdout and stderr.
    pub fn run(&self) -> Output {
        let mut c = self.command();
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => panic!("cannot start {:?}: {e}", self.program),
        };
        let pid = child.id() as i32;
        let writer = child.stdin.take().map(|mut w| {
            let data = self.stdin.clone().unwrap_or_default();
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            })
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let mut timed_out = false;
        let res = match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(_) => {
                timed_out = true;
                kill_group(pid, libc::SIGKILL);
                rx.recv().expect("waiter thread")
            }
        };
        if let Some(w) = writer {
            let _ = w.join();
        }
        let out = res.unwrap_or_else(|e| panic!("waiting for {:?}: {e}", self.program));
        Output {
            command: self.describe(),
            status: out.status.code(),
            timed_out,
            stdout_bytes: out.stdout.clone(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts in the background; stdout and stderr go to `dir/<label>.<n>.{out,err}`.
    pub fn spawn_logged(&self, dir: &Path, n: usize) -> Proc {
        let label = self.get_label();
        let out_path = dir.join(format!("{label}.{n}.out"));
        let err_path = dir.join(format!("{label}.{n}.err"));
        let out = File::create(&out_path).expect("create stdout log");
        let err = File::create(&err_path).expect("create stderr log");
        let mut c = self.command();
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(out)
        .stderr(err);
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.program));
        if let (Some(mut w), Some(data)) = (child.stdin.take(), self.stdin.clone()) {
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        Proc {
            label,
            command: self.describe(),
            child,
            status: None,
            out_path,
            err_path,
        }
    }

    pub fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(ns) = &self.ns {
            s.push_str(&format!("[netns {ns}] "));
        }
        if let Some((u, g)) = self.user {
            s.push_str(&format!("[uid {u} gid {g}] "));
        }
        s.push_str(&self.program.to_string_lossy());
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// What a finished command did.
#[derive(Clone)]
pub struct Output {
    pub command: String,
    /// exit code; None when killed by a signal (or by `timeout`)
    pub status: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stdout_bytes: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Panics (showing everything) unless the command exited 0; returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.success(), "command failed: {self:?}");
        &self.stdout
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> status {:?}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            if self.timed_out { " (TIMED OUT)" } else { "" },
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

pub(crate) fn file_tail(p: &Path, max: usize) -> String {
    let s = std::fs::read(p).unwrap_or_default();
    let s = String::from_utf8_lossy(&s);
    tail(&s, max).to_string()
}

fn kill_group(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: sending a signal to a process group this code created.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// A background process. Dropping it kills its process group (SIGKILL) and reaps it.
pub struct Proc {
    pub label: String,
    pub command: String,
    child: Child,
    status: Option<ExitStatus>,
    out_path: PathBuf,
    err_path: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`) to the process itself. False if it already exited.
    pub fn signal(&mut self, sig: i32) -> bool {
        if self.try_wait().is_some() {
            return false;
        }
        // SAFETY: the pid belongs to our unreaped child.
        unsafe { libc::kill(self.child.id() as i32, sig) == 0 }
    }

    /// The exit status, if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_wait().is_some());
        self.status
    }

    /// SIGTERM, then waits up to `grace`; SIGKILL to the group after that.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.signal(libc::SIGTERM) {
            if let Some(st) = self.wait_timeout(grace) {
                return Some(st);
            }
        }
        self.kill();
        self.status
    }

    /// SIGKILL to the whole process group, then reap.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            kill_group(self.child.id() as i32, libc::SIGKILL);
            self.status = self.child.wait().ok();
        }
    }

    pub fn stdout_path(&self) -> &Path {
        &self.out_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.err_path
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out_path).unwrap_or_default()).into_owned()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.err_path).unwrap_or_default()).into_owned()
    }

    /// Waits until stdout or stderr contains `needle`. False after `timeout`
    /// or as soon as the process exited without writing it.
    pub fn wait_output(&mut self, needle: &str, timeout: Duration) -> bool {
        let mut exited = false;
        poll_until(timeout, || {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return true;
            }
            if exited {
                return true; // one last look was taken after the exit
            }
            exited = self.try_wait().is_some();
            false
        }) && (self.stdout().contains(needle) || self.stderr().contains(needle))
    }

    /// Waits until stdout holds at least `n` complete lines; returns them (maybe more).
    pub fn wait_stdout_lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        poll_until(timeout, || {
            let s = self.stdout();
            lines = s.lines().map(str::to_string).collect();
            if !s.ends_with('\n') {
                lines.pop();
            }
            lines.len() >= n
        });
        lines
    }

    /// Last `max` bytes of stdout and stderr, for failure messages.
    pub fn logs(&self, max: usize) -> String {
        format!(
            "=== {} (pid {}) `{}`\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.label,
            self.child.id(),
            self.command,
            file_tail(&self.out_path, max),
            file_tail(&self.err_path, max)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.logs(4000))
    }
}
