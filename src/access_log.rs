//! Logging stage: one JSON object per flow, written when it ends, through a
//! bounded queue drained by a dedicated thread. A blocked stdout, pipe or FIFO
//! never stalls relaying: when the queue is full the line is dropped and
//! counted (`portcullis_access_log_dropped_total`), and so are lines whose
//! write failed. Nothing on the flows' path ever blocks on the log: not the
//! write, and not the open either (a FIFO nobody reads blocks in open(2), so
//! that open happens on the writer thread).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::AccessLog;
use crate::relay::Side;
use crate::vocab::{Decision, Mode, Protocol, Reason};

/// The access log record of docs/DESIGN.md §4.
#[derive(Debug, Clone, Serialize)]
pub struct FlowRecord {
    pub ts: String,
    pub client: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub upstream: Option<SocketAddr>,
    pub protocol: Protocol,
    pub name: Option<String>,
    pub decision: Decision,
    pub entry: Option<String>,
    pub reason: Option<Reason>,
    pub ech: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// How an allowed flow ended badly (README, "Access log"); null when it did not.
    pub error: Option<String>,
    /// `transparent` (redirected) or `explicit` (CONNECT / absolute-form).
    pub mode: Mode,
    /// Explicit proxy: the `host:port` the client asked for.
    pub authority: Option<String>,
    /// `"client"`: the client closed with an RST after both sides had sent data, which is how
    /// curl and browsers end a TLS connection whose last bytes (session tickets, close_notify)
    /// they did not read: not a failure, so `error` stays null. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_by: Option<Side>,
}

impl FlowRecord {
    /// A record for a flow from `client` arriving in `mode` (`transparent` or
    /// `explicit`), with nothing known yet: opaque TCP, denied until a
    /// verdict says otherwise, no bytes, no error. Every path starts from
    /// here and sets what it learns.
    pub fn new(client: SocketAddr, mode: Mode) -> FlowRecord {
        FlowRecord {
            ts: String::new(),
            client: crate::net::canonical_addr(client),
            dst: None,
            upstream: None,
            protocol: Protocol::Tcp,
            name: None,
            decision: Decision::Deny,
            entry: None,
            reason: None,
            ech: false,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            error: None,
            mode,
            authority: None,
            reset_by: None,
        }
    }
}

/// Queue capacity: enough for bursts of short flows while the reader is slow
/// (at most a few MB of memory).
pub const QUEUE: usize = 8192;

/// The writer thread gathers queued lines into writes of about this size.
const BATCH: usize = 64 * 1024;

enum Msg {
    Line(String),
    /// Wakes the writer to look at the reopen flag (it may not fit in a full queue: the flag
    /// is what counts, and the writer checks it after every batch anyway).
    Reopen,
}

/// Lines the writer thread is done with (written, or failed and counted).
#[derive(Default)]
struct Done {
    lines: Mutex<u64>,
    cv: Condvar,
}

#[derive(Clone)]
pub struct AccessLogger {
    tx: Option<SyncSender<Msg>>,
    dropped: Counter,
    /// Lines accepted into the queue.
    queued: Arc<AtomicU64>,
    done: Arc<Done>,
    /// A reopen was asked for (SIGHUP): set by [`AccessLogger::reopen`], taken by the writer.
    reopen: Arc<AtomicBool>,
}

/// Where the writer thread writes.
enum Sink {
    /// stdout, or a writer given by a test.
    Stream(Box<dyn Write + Send>),
    /// A file path, reopened on SIGHUP; `None` until opened (a FIFO without
    /// a reader is opened by the writer thread, where blocking is harmless).
    File { path: PathBuf, file: Option<File> },
}

/// Opens (creating) `path` for appending without ever blocking: a FIFO
/// without a reader gives `Ok(None)` (the writer thread opens it later).
fn open_now(path: &Path) -> std::io::Result<Option<File>> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => {
            // Blocking writes, on the writer thread only, are what we want.
            let flags = fcntl(&f, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
            let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
            fcntl(&f, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
            Ok(Some(f))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

fn open_blocking(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl Sink {
    fn write_batch(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stream(w) => w.write_all(buf).and_then(|_| w.flush()),
            Sink::File { path, file } => {
                if file.is_none() {
                    *file = Some(open_blocking(path)?);
                }
                match file.as_mut() {
                    Some(f) => f.write_all(buf),
                    None => Ok(()),
                }
            }
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, file } = self {
            match open_blocking(path) {
                Ok(f) => *file = Some(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "access log: cannot reopen, keeping the old file")
                }
            }
        }
    }
}

fn writer(
    mut sink: Sink,
    rx: Receiver<Msg>,
    dropped: Counter,
    done: Arc<Done>,
    reopen_asked: Arc<AtomicBool>,
) {
    let mut buf = Vec::with_capacity(BATCH + 4096);
    let mut last_warn: Option<Instant> = None;
    let mut failed_since_warn = 0u64;
    while let Ok(first) = rx.recv() {
        let mut lines = 0u64;
        let mut next = Some(first);
        // Gather whatever else is queued into one write; a reopen asked for meanwhile ends
        // the batch, so lines logged after the SIGHUP go to the new file.
        while let Some(m) = next.take() {
            if let Msg::Line(l) = m {
                buf.extend_from_slice(l.as_bytes());
                lines += 1;
            }
            if buf.len() < BATCH && !reopen_asked.load(Ordering::Acquire) {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            if let Err(e) = sink.write_batch(&buf) {
                dropped.inc_by(lines);
                failed_since_warn += lines;
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, lines = failed_since_warn, "access log write failed: lines dropped");
                    last_warn = Some(Instant::now());
                    failed_since_warn = 0;
                }
            }
            buf.clear();
        }
        if reopen_asked.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
        if let Ok(mut d) = done.lines.lock() {
            *d += lines;
            done.cv.notify_all();
        }
    }
}

impl AccessLogger {
    /// Starts the writer for `target`. Fails only for what the operator must
    /// fix (a path that cannot be opened); never blocks.
    pub fn new(target: &AccessLog, dropped: Counter) -> std::io::Result<AccessLogger> {
        let sink = match target {
            AccessLog::Off => {
                return Ok(AccessLogger {
                    tx: None,
                    dropped,
                    queued: Default::default(),
                    done: Default::default(),
                    reopen: Default::default(),
                })
            }
            // Our own descriptor for stdout: writes go straight to it, with
            // no process-wide lock or line buffering shared with anyone.
            AccessLog::Stdout => Sink::Stream(Box::new(File::from(
                std::io::stdout().as_fd().try_clone_to_owned()?,
            ))),
            AccessLog::File(p) => Sink::File {
                path: p.clone(),
                file: open_now(p).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot open access_log {}: {e}", p.display()),
                    )
                })?,
            },
        };
        AccessLogger::start(sink, QUEUE, dropped)
    }

    /// A logger writing to `w` through a queue of `capacity` lines.
    pub fn with_writer(
        w: Box<dyn Write + Send>,
        capacity: usize,
        dropped: Counter,
    ) -> std::io::Result<AccessLogger> {
        AccessLogger::start(Sink::Stream(w), capacity, dropped)
    }

    fn start(sink: Sink, capacity: usize, dropped: Counter) -> std::io::Result<AccessLogger> {
        let (tx, rx) = sync_channel::<Msg>(capacity);
        let done = Arc::new(Done::default());
        let reopen = Arc::new(AtomicBool::new(false));
        let (d, c, r) = (dropped.clone(), done.clone(), reopen.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(sink, rx, d, c, r))?;
        Ok(AccessLogger {
            tx: Some(tx),
            dropped,
            queued: Default::default(),
            done,
            reopen,
        })
    }

    /// Queues the line of a finished flow; never blocks. A full queue drops
    /// the line and counts it.
    /// False with `access_log = "off"`: callers skip building the line.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, rec: &FlowRecord) {
        let Some(tx) = &self.tx else { return };
        let mut line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push('\n');
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }

    /// Asks the writer to reopen a file target (SIGHUP, after logrotate). Never blocks and is
    /// never lost: the request is a flag the writer takes after its current batch; the queued
    /// message only wakes an idle writer (a full queue means the writer is busy anyway).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            self.reopen.store(true, Ordering::Release);
            let _ = tx.try_send(Msg::Reopen);
        }
    }

    /// Waits up to `timeout` until every line queued so far was written (or
    /// failed); true if so. For shutdown, where the last flows' lines matter.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = self.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        let Ok(mut d) = self.done.lines.lock() else {
            return false;
        };
        while *d < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            d = match self.done.cv.wait_timeout(d, left) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
        true
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without a date crate.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ms = d.subsec_millis();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::vocab::{Decision, Mode, Protocol, Reason};

    #[test]
    fn timestamps() {
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_001_784_123);
        assert_eq!(timestamp(t), "2026-11-30T01:23:04.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    fn record(i: u64) -> FlowRecord {
        FlowRecord {
            ts: timestamp(SystemTime::now()),
            dst: Some("192.0.2.10:443".parse().unwrap()),
            protocol: Protocol::Tls,
            name: Some("api.example.com".into()),
            decision: Decision::Allow,
            entry: Some("api".into()),
            bytes_up: i,
            ..FlowRecord::new("192.0.2.2:40000".parse().unwrap(), Mode::Transparent)
        }
    }

    /// A writer that blocks until the test opens its gate, and keeps what it got.
    struct Gated {
        gate: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.gate;
            let mut open = m.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_writer_never_blocks_logging_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let dropped = Counter::default();
        let w = Gated {
            gate: gate.clone(),
            got: got.clone(),
        };
        let log = AccessLogger::with_writer(Box::new(w), 16, dropped.clone()).unwrap();
        // The writer is stuck: every log() call still returns at once.
        for i in 0..10_000 {
            log.log(&record(i));
        }
        assert!(
            !log.flush(Duration::from_millis(50)),
            "nothing can be written yet"
        );
        let d = dropped.get();
        // at most one batch taken by the thread plus the queue got in
        assert!(d >= 10_000 - 16 - 1000, "dropped {d}");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert!(log.flush(Duration::from_secs(10)));
        let written = got.lock().unwrap().iter().filter(|&&b| b == b'\n').count() as u64;
        assert_eq!(
            written + dropped.get(),
            10_000,
            "every line written or counted"
        );
        // every written line is one JSON object
        for l in String::from_utf8(got.lock().unwrap().clone())
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["entry"], "api");
        }
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_writes_are_counted_as_dropped() {
        let dropped = Counter::default();
        let log = AccessLogger::with_writer(Box::new(Failing), 64, dropped.clone()).unwrap();
        for i in 0..10 {
            log.log(&record(i));
        }
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(dropped.get(), 10);
    }

    #[test]
    fn a_fifo_without_reader_does_not_block_start() {
        let dir = std::env::temp_dir().join(format!("portcullis-al-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let fifo = dir.join("log.fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let dropped = Counter::default();
        let t = Instant::now();
        let log = AccessLogger::new(&AccessLog::File(fifo.clone()), dropped.clone()).unwrap();
        log.log(&record(1));
        assert!(t.elapsed() < Duration::from_secs(5));
        // A reader arrives: the line queued meanwhile comes out.
        let mut r = std::fs::File::open(&fifo).unwrap();
        assert!(log.flush(Duration::from_secs(10)));
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut r, &mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("\"bytes_up\":1"));
        assert_eq!(dropped.get(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unopenable_path_is_an_error_at_start() {
        let e = AccessLogger::new(
            &AccessLog::File("/nonexistent-dir/portcullis.log".into()),
            Counter::default(),
        )
        .err()
        .expect("error");
        assert!(e.to_string().contains("access_log"), "{e}");
    }

    #[test]
    fn sighup_reopens_a_file_moved_away_by_logrotate() {
        let dir = std::env::temp_dir().join(format!("portcullis-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLogger::new(&AccessLog::File(path.clone()), Counter::default()).unwrap();
        log.log(&record(1));
        assert!(log.flush(Duration::from_secs(10)));
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.reopen();
        log.log(&record(2));
        assert!(log.flush(Duration::from_secs(10)));
        let old = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(
            old.contains("\"bytes_up\":1") && !old.contains("\"bytes_up\":2"),
            "{old}"
        );
        assert!(
            new.contains("\"bytes_up\":2") && !new.contains("\"bytes_up\":1"),
            "{new}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// SIGHUP after logrotate while the reader is slow and the queue full: the reopen is not
    /// lost, and lines logged after it go to the new file.
    #[test]
    fn a_reopen_asked_for_while_the_queue_is_full_is_not_lost() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("pc-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        // A FIFO whose reader does not read yet: the writer blocks once the pipe is full.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let dropped = Counter::default();
        let sink = Sink::File {
            path: path.clone(),
            file: open_now(&path).unwrap(),
        };
        let log = AccessLogger::start(sink, 4, dropped.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        while dropped.get() == 0 {
            assert!(Instant::now() < deadline, "the queue never filled");
            log.log(&record(i));
            i += 1;
        }
        // logrotate: move the file away, then SIGHUP (the queue is full now).
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.reopen();
        // The old file's reader catches up: the writer drains the queue, then reopens.
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match reader.read(&mut buf) {
                    Ok(0) => return, // the writer closed the old file: it reopened
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            panic!("the writer never closed the old file");
        });
        drain.join().unwrap();
        let mut after = record(0);
        after.name = Some("after.reopen.example".into());
        log.log(&after);
        assert!(log.flush(Duration::from_secs(10)));
        let new = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(new.contains("after.reopen.example"), "new file: {new:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
