//! Relay stage: moves the bytes of an allowed flow between client and upstream, with splice(2).
//!
//! Each direction is a pump. A burst (bytes that arrive while the pump waits) starts with one read
//! into a small buffer on the stack, written out at once: most bursts of short flows (a TLS
//! answer, an HTTP request) are that small, and a copy costs a third of what splicing them through
//! a pipe does. Only when that read fills the buffer (more is likely waiting) does the burst go on
//! through a pipe, and the pump keeps splicing bursts until one stays under the buffer's size
//! (HAProxy's `splice-auto` works the same way). Splicing: socket -> pipe, then drain the pipe
//! completely pipe -> socket before splicing from the socket again. Because the pipe is always empty when we splice into it,
//! `EAGAIN` from that splice can only mean "socket not readable", and `EAGAIN` while draining can
//! only mean "socket not writable"; both go back to tokio readiness through `try_io`, which clears
//! the readiness flag, so nothing ever spins.
//!
//! Pipes come from a [`PipePool`] shared by all flows. A pump holds one only while bytes are in
//! flight in its direction (from the first splice of a burst until the socket has nothing more to
//! give and the pipe is empty), so thousands of idle flows hold no pipe file descriptors. When the
//! pool is exhausted (or the process is out of file descriptors) the chunk is copied through a
//! small userspace buffer instead.
//!
//! Flow semantics, shared with the [`relay_copy`] alternative:
//! - EOF from one side shuts down the write side of the other; the other direction keeps going
//!   (half-close is preserved). The flow ends [`RelayEnd::Done`] when both directions saw EOF.
//! - An error on one side (an RST shows as `ECONNRESET`/`EPIPE`) resets the other side
//!   (`SO_LINGER` 0, then close) and ends the flow, naming the side. Errors are also watched for
//!   while a socket is not being read (for example after its direction finished), so an RST is
//!   never left waiting for the other side to speak.
//! - Bytes are counted after each successful write to the destination, so the counts are exact
//!   even when the flow ends in an error.
//! - `idle_timeout`: no bytes moved in either direction for that long ends the flow
//!   [`RelayEnd::Idle`]. Bytes moving in one direction keep the whole flow alive.
//!
//! `splice` to a socket whose peer is gone raises `SIGPIPE` like `write` does; Rust programs
//! ignore `SIGPIPE` by default, so it surfaces as `EPIPE`.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(crate) mod machine;

/// Size of the userspace buffer used when no pipe is available.
pub const FALLBACK_CHUNK: usize = 16 * 1024;
/// A burst's first read goes through a stack buffer of this size; a burst that fills it goes on
/// through a pipe.
pub const SMALL_COPY: usize = 8 * 1024;
/// Pipe size the proxy asks for by default (the unprivileged `fs.pipe-max-size`).
pub const DEFAULT_PIPE_SIZE: usize = 1024 * 1024;
/// Idle pipes kept open by default; the rest are closed when returned.
pub const DEFAULT_MAX_IDLE_PIPES: usize = 16;
/// Buffer size of [`RelayMode::Copy`] when none is given (tokio's own default).
pub const DEFAULT_COPY_BUF: usize = 8 * 1024;

/// Which way bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// client -> upstream
    Up,
    /// upstream -> client
    Down,
}

impl Direction {
    /// Label for metrics and logs, matching `bytes_up` / `bytes_down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// One end of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live byte counters of one flow, updated as bytes move.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to the upstream (client -> upstream).
    pub up: AtomicU64,
    /// Bytes written to the client (upstream -> client).
    pub down: AtomicU64,
}

impl Counters {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    fn add(&self, dir: Direction, n: u64) {
        let c = match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// An error together with the side of the flow it came from. [`RelayEnd::Error`] holds an
/// `io::Error` (of the original kind) wrapping one of these; see [`RelayEnd::side`].
#[derive(Debug)]
pub struct SideError {
    pub side: Side,
    pub source: io::Error,
}

impl fmt::Display for SideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.side, self.source)
    }
}

impl std::error::Error for SideError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// How a relayed flow ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached EOF and everything was delivered.
    Done,
    /// No bytes moved either way for `idle_timeout`; both sides were closed.
    Idle,
    /// The client reset the connection (or vanished); the upstream was reset in turn.
    ClientReset,
    /// The upstream reset the connection (or vanished); the client was reset in turn.
    UpstreamReset,
    /// Any other error; its inner error is a [`SideError`]. Both sides were reset.
    Error(io::Error),
    /// Closed from outside (a revocation, the end of a drain), saying why. Both sides were
    /// reset: a FIN would tell the client that a cut stream ended.
    Closed(&'static str),
}

impl RelayEnd {
    /// False only for [`RelayEnd::Done`]: the access log's `error` field is null then.
    pub fn is_error(&self) -> bool {
        !matches!(self, RelayEnd::Done)
    }

    /// The side at fault, where there is one.
    pub fn side(&self) -> Option<Side> {
        match self {
            RelayEnd::Done | RelayEnd::Idle | RelayEnd::Closed(_) => None,
            RelayEnd::ClientReset => Some(Side::Client),
            RelayEnd::UpstreamReset => Some(Side::Upstream),
            RelayEnd::Error(e) => e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<SideError>())
                .map(|se| se.side),
        }
    }
}

impl fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayEnd::Done => f.write_str("done"),
            RelayEnd::Idle => f.write_str("idle_timeout"),
            RelayEnd::ClientReset => f.write_str("client_reset"),
            RelayEnd::UpstreamReset => f.write_str("upstream_reset"),
            RelayEnd::Error(e) => write!(f, "{e}"),
            RelayEnd::Closed(why) => f.write_str(why),
        }
    }
}

/// Which relay implementation to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// splice(2) through pooled pipes ([`relay`]).
    #[default]
    Splice,
    /// `tokio::io::copy_bidirectional` with buffers of this size ([`relay_copy`]).
    Copy { buf_size: usize },
}

impl FromStr for RelayMode {
    type Err = String;

    /// `splice`, `copy` or `copy:BYTES`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "splice" => Ok(RelayMode::Splice),
            "copy" => Ok(RelayMode::Copy {
                buf_size: DEFAULT_COPY_BUF,
            }),
            _ => match s.strip_prefix("copy:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(RelayMode::Copy { buf_size: n }),
                _ => Err(format!(
                    "relay mode {s:?}: expected \"splice\", \"copy\" or \"copy:BYTES\""
                )),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pipes and the pool

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let mut pipe = Pipe {
            read,
            write,
            capacity: 0,
        };
        pipe.capacity = pipe.grow(size);
        Ok(pipe)
    }

    /// Asks for `size` bytes of buffer and returns the capacity the pipe ended up with. Past
    /// the unprivileged pipe quota `F_SETPIPE_SZ` fails with EPERM: the smaller pipe still works,
    /// so any failure just keeps the current size.
    fn grow(&self, size: usize) -> usize {
        if size > 0 {
            if let Ok(n) = fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(clamp_c_int(size))) {
                return n as usize;
            }
        }
        match fcntl(&self.write, FcntlArg::F_GETPIPE_SZ) {
            Ok(n) if n > 0 => n as usize,
            // A pipe always holds at least one page.
            _ => 4096,
        }
    }
}

fn clamp_c_int(n: usize) -> libc::c_int {
    libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX)
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Pipe>,
    in_use: usize,
}

/// A bounded, shrinking pool of pipe pairs, shared (in an `Arc`) by all flows.
///
/// At most `max_pipes` pipes exist at once (leased plus idle); at most `max_idle` empty pipes are
/// kept open for reuse, the others are closed as they come back, so the fds held track the number
/// of flows with bytes in flight, not the number of flows.
pub struct PipePool {
    max_pipes: usize,
    max_idle: usize,
    pipe_size: usize,
    state: Mutex<PoolState>,
    created: AtomicU64,
    undersized: AtomicU64,
}

impl fmt::Debug for PipePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipePool")
            .field("max_pipes", &self.max_pipes)
            .field("max_idle", &self.max_idle)
            .field("pipe_size", &self.pipe_size)
            .field("in_use", &self.in_use())
            .field("idle", &self.idle())
            .finish()
    }
}

impl PipePool {
    /// A pool of at most `max_pipes` pipes of `pipe_size` bytes each (0: the kernel default),
    /// keeping [`DEFAULT_MAX_IDLE_PIPES`] idle ones. `max_pipes == 0` disables splicing: every
    /// chunk is copied.
    pub fn new(max_pipes: usize, pipe_size: usize) -> Arc<Self> {
        Self::with_max_idle(max_pipes, pipe_size, DEFAULT_MAX_IDLE_PIPES)
    }

    /// Like [`PipePool::new`], keeping at most `max_idle` empty pipes open.
    ///
    /// `pipe_size` is capped at `fs.pipe-max-size`: past it `F_SETPIPE_SZ` fails without
    /// CAP_SYS_RESOURCE (which even root lacks in containers), and every pipe would stay small.
    pub fn with_max_idle(max_pipes: usize, pipe_size: usize, max_idle: usize) -> Arc<Self> {
        let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        let pipe_size = match pipe_max {
            Some(max) if pipe_size > max => max,
            _ => pipe_size,
        };
        Arc::new(PipePool {
            max_pipes,
            max_idle: max_idle.min(max_pipes),
            pipe_size,
            state: Mutex::new(PoolState::default()),
            created: AtomicU64::new(0),
            undersized: AtomicU64::new(0),
        })
    }

    /// Pipes currently leased to flows (holding bytes in flight).
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// Empty pipes kept open for reuse.
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    pub fn max_pipes(&self) -> usize {
        self.max_pipes
    }

    /// The pipe size asked for (after the `fs.pipe-max-size` cap).
    pub fn pipe_size(&self) -> usize {
        self.pipe_size
    }

    /// Pipes created since start.
    pub fn created_total(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// Pipes created smaller than asked (the pipe quota or `fs.pipe-max-size` was in the way).
    pub fn undersized_total(&self) -> u64 {
        self.undersized.load(Ordering::Relaxed)
    }

    /// Closes idle pipes beyond `keep` (for example when draining).
    pub fn trim(&self, keep: usize) {
        let closed: Vec<Pipe> = {
            let mut st = self.lock();
            let keep = keep.min(st.idle.len());
            st.idle.split_off(keep)
        };
        drop(closed);
    }

    /// Takes an empty pipe, or `None` when the pool is at `max_pipes` or a new pipe cannot be
    /// made (e.g. out of file descriptors): the caller then copies.
    pub fn try_acquire(&self) -> Option<PipeLease<'_>> {
        let mut st = self.lock();
        if let Some(mut pipe) = st.idle.pop() {
            st.in_use += 1;
            drop(st);
            if pipe.capacity < self.pipe_size {
                // Made while the pipe quota was exhausted: it may have room again.
                pipe.capacity = pipe.grow(self.pipe_size);
            }
            return Some(PipeLease::new(self, pipe));
        }
        if st.in_use + st.idle.len() >= self.max_pipes {
            return None;
        }
        // Reserve the slot, then make the pipe without holding the lock.
        st.in_use += 1;
        drop(st);
        match Pipe::new(self.pipe_size) {
            Ok(pipe) => {
                self.created.fetch_add(1, Ordering::Relaxed);
                if pipe.capacity < self.pipe_size {
                    self.undersized.fetch_add(1, Ordering::Relaxed);
                }
                Some(PipeLease::new(self, pipe))
            }
            Err(_) => {
                self.lock().in_use -= 1;
                None
            }
        }
    }

    fn release(&self, pipe: Pipe, empty: bool) {
        let mut st = self.lock();
        st.in_use -= 1;
        if empty && st.idle.len() < self.max_idle {
            st.idle.push(pipe);
            return;
        }
        drop(st);
        // A pipe with bytes left in it (the flow failed mid-chunk) is never reused.
        drop(pipe);
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pipe leased from a [`PipePool`]; goes back to the pool (or is closed) when dropped.
pub struct PipeLease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    /// Bytes spliced in and not yet spliced out.
    filled: usize,
}

impl<'a> PipeLease<'a> {
    fn new(pool: &'a PipePool, pipe: Pipe) -> Self {
        PipeLease {
            pool,
            pipe: Some(pipe),
            filled: 0,
        }
    }

    fn pipe(&self) -> &Pipe {
        self.pipe
            .as_ref()
            .expect("a lease holds its pipe until dropped")
    }

    /// The pipe's buffer size in bytes.
    pub fn capacity(&self) -> usize {
        self.pipe().capacity
    }

    /// splice from a socket into the (empty) pipe; Ok(0) is EOF.
    fn fill_from(&mut self, src: BorrowedFd<'_>) -> io::Result<usize> {
        let pipe = self.pipe();
        let n = splice(
            src,
            None,
            &pipe.write,
            None,
            pipe.capacity,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        self.filled += n;
        Ok(n)
    }

    /// splice from the pipe to a socket.
    fn drain_to(&mut self, dst: BorrowedFd<'_>) -> io::Result<usize> {
        let n = splice(
            &self.pipe().read,
            None,
            dst,
            None,
            self.filled,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.filled -= n;
        Ok(n)
    }
}

impl Drop for PipeLease<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.release(pipe, self.filled == 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-flow bookkeeping

/// What both pumps of a flow share: counters, the caller's hook, and the last-activity clock.
pub(crate) struct Meter<'a, F> {
    counters: &'a Counters,
    on_bytes: &'a F,
    epoch: Instant,
    /// Milliseconds from `epoch` to the last time bytes moved.
    last_ms: AtomicU64,
    /// One direction has reached EOF (see [`Meter::last_eof`]).
    one_eof: AtomicBool,
}

impl<'a, F: Fn(Direction, u64)> Meter<'a, F> {
    pub(crate) fn new(counters: &'a Counters, on_bytes: &'a F) -> Self {
        Meter {
            counters,
            on_bytes,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            one_eof: AtomicBool::new(false),
        }
    }

    /// Called at a direction's EOF: true when the other direction had reached it already, so
    /// the flow ends now and its close(2) sends the FIN (both receive queues are empty: each was
    /// read to EOF), and a shutdown(2) first would only cost a system call.
    fn last_eof(&self) -> bool {
        self.one_eof.swap(true, Ordering::Relaxed)
    }

    /// Records `n` bytes written to the destination of `dir`.
    fn moved(&self, dir: Direction, n: usize) {
        let n = n as u64;
        self.counters.add(dir, n);
        (self.on_bytes)(dir, n);
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once no bytes moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            let deadline = (self.epoch + Duration::from_millis(last)).checked_add(timeout);
            let Some(deadline) = deadline else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(deadline).await;
            if self.last_ms.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
}

/// Why a pump or a watcher stopped the flow.
struct Fault {
    side: Side,
    err: io::Error,
}

impl Fault {
    fn on(side: Side) -> impl FnOnce(io::Error) -> Fault {
        move |err| Fault { side, err }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected
    )
}

impl From<Fault> for RelayEnd {
    fn from(f: Fault) -> Self {
        match (is_reset(&f.err), f.side) {
            (true, Side::Client) => RelayEnd::ClientReset,
            (true, Side::Upstream) => RelayEnd::UpstreamReset,
            (false, side) => RelayEnd::Error(io::Error::new(
                f.err.kind(),
                SideError {
                    side,
                    source: f.err,
                },
            )),
        }
    }
}

fn sides(dir: Direction) -> (Side, Side) {
    match dir {
        Direction::Up => (Side::Client, Side::Upstream),
        Direction::Down => (Side::Upstream, Side::Client),
    }
}

/// Resolves when `sock` reports a pending error (an RST arrives as `ECONNRESET`), even while
/// nobody reads or writes it.
async fn watch_error(sock: &TcpStream, side: Side) -> Fault {
    loop {
        if let Err(err) = sock.ready(Interest::ERROR).await {
            return Fault { side, err };
        }
        match sock.take_error() {
            Ok(Some(err)) | Err(err) => return Fault { side, err },
            // Someone else consumed the error: clear the readiness and wait for the next one.
            Ok(None) => {
                let _ = sock.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                });
            }
        }
    }
}

fn shutdown_write(sock: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(Shutdown::Write)
}

/// Applies the end: resets the surviving side(s) on a fault, then closes both.
pub(crate) fn close(client: TcpStream, upstream: TcpStream, end: &RelayEnd) {
    let (reset_client, reset_upstream) = match end {
        RelayEnd::Done | RelayEnd::Idle => (false, false),
        RelayEnd::ClientReset => (false, true),
        RelayEnd::UpstreamReset => (true, false),
        RelayEnd::Error(_) | RelayEnd::Closed(_) => (true, true),
    };
    // A socket that is already gone may refuse the option; closing it is all that is left.
    if reset_client {
        let _ = client.set_zero_linger();
    }
    if reset_upstream {
        let _ = upstream.set_zero_linger();
    }
    drop(client);
    drop(upstream);
}

// ---------------------------------------------------------------------------------------------
// The splice relay

/// What the first read of a burst did ([`copy_first`]).
enum First {
    /// src reached EOF.
    Eof,
    /// Nothing to read after all.
    Empty,
    /// Bytes were read and all written; `filled`: the read filled the buffer.
    Moved { filled: bool },
    /// dst took only part: the rest, to write once dst is writable.
    Left { rest: Box<[u8]>, filled: bool },
}

/// The first read of a burst: through a buffer on this function's stack (so that the pump's
/// future, which lives as long as the flow, does not carry it), written to dst at once. Only what
/// dst does not take now is moved to the heap.
fn copy_first<F: Fn(Direction, u64)>(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Direction,
    flow: &Meter<'_, F>,
) -> Result<First, Fault> {
    let (src_side, dst_side) = sides(dir);
    let mut buf = [0u8; SMALL_COPY];
    let mut n = 0;
    let read = src.try_io(Interest::READABLE, || {
        n = nix::sys::socket::recv(
            src.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        if n > 0 && n < SMALL_COPY {
            // A short read of a stream socket drained it (tokio's own reads rely on this too):
            // clear the readiness now rather than pay a read that finds nothing. A FIN or an
            // error that came with the bytes keeps the socket ready (closed states are never
            // cleared).
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        Ok(())
    });
    match read {
        Ok(()) if n == 0 => return Ok(First::Eof),
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(First::Empty),
        Err(e) => return Err(Fault::on(src_side)(e)),
    }
    let filled = n == SMALL_COPY;
    let mut done = 0;
    while done < n {
        match dst.try_write(&buf[done..n]) {
            Ok(0) => return Err(Fault::on(dst_side)(io::ErrorKind::WriteZero.into())),
            Ok(m) => {
                done += m;
                flow.moved(dir, m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let rest = buf[done..n].into();
                return Ok(First::Left { rest, filled });
            }
            Err(e) => return Err(Fault::on(dst_side)(e)),
        }
    }
    Ok(First::Moved { filled })
}

/// src reached EOF: passes it on to dst (shutdown of its write side), unless the flow ends here.
fn eof<F: Fn(Direction, u64)>(
    dst: &TcpStream,
    dst_side: Side,
    flow: &Meter<'_, F>,
) -> Result<(), Fault> {
    if flow.last_eof() {
        return Ok(());
    }
    shutdown_write(dst).map_err(Fault::on(dst_side))
}

/// Relays between `client` and `upstream` with splice(2) until both directions end, one side
/// fails, or nothing moves for `idle_timeout`; then closes both (resetting on a fault).
///
/// `counters` and `on_bytes` are updated after every write to a destination; `on_bytes` is the
/// cheap hook for a Prometheus counter (pass `|_, _| {}` when the counters are enough).
pub async fn relay<F>(
    client: TcpStream,
    upstream: TcpStream,
    pool: &Arc<PipePool>,
    counters: &Counters,
    idle_timeout: Duration,
    on_bytes: F,
) -> RelayEnd
where
    F: Fn(Direction, u64) + Send + Sync,
{
    let flow = Meter::new(counters, &on_bytes);
    let end = machine::Machine::new(&client, &upstream, pool, &flow, idle_timeout).await;
    close(client, upstream, &end);
    end
}

/// [`relay`] or [`relay_copy`], as `mode` says (`pool` is unused for copying).
pub async fn relay_with<F>(
    mode: RelayMode,
    client: TcpStream,
    upstream: TcpStream,
    pool: &Arc<PipePool>,
    counters: &Counters,
    idle_timeout: Duration,
    on_bytes: F,
) -> RelayEnd
where
    F: Fn(Direction, u64) + Send + Sync,
{
    match mode {
        RelayMode::Splice => relay(client, upstream, pool, counters, idle_timeout, on_bytes).await,
        // Boxed: the copy relay's larger future would otherwise set the size of every flow's.
        RelayMode::Copy { buf_size } => {
            Box::pin(relay_copy(
                client,
                upstream,
                buf_size,
                counters,
                idle_timeout,
                on_bytes,
            ))
            .await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The copy relay (tokio::io::copy_bidirectional), for comparison

/// A socket seen by `copy_bidirectional`: counts what is written to it and remembers whether it
/// failed, so the error can be given a side.
struct Metered<'a, 'f, F> {
    io: &'a TcpStream,
    /// The direction of the bytes written to this socket.
    dir: Direction,
    flow: &'a Meter<'f, F>,
    failed: bool,
}

impl<F> Metered<'_, '_, F> {
    fn fail<T>(&mut self, e: io::Error) -> Poll<io::Result<T>> {
        self.failed = true;
        Poll::Ready(Err(e))
    }
}

impl<F: Fn(Direction, u64)> AsyncRead for Metered<'_, '_, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Err(e) = ready!(this.io.poll_read_ready(cx)) {
                return this.fail(e);
            }
            match this.io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return this.fail(e),
            }
        }
    }
}

impl<F: Fn(Direction, u64)> AsyncWrite for Metered<'_, '_, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if let Err(e) = ready!(this.io.poll_write_ready(cx)) {
                return this.fail(e);
            }
            match this.io.try_write(buf) {
                Ok(n) => {
                    if n == 0 && !buf.is_empty() {
                        return this.fail(io::ErrorKind::WriteZero.into());
                    }
                    this.flow.moved(this.dir, n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return this.fail(e),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match shutdown_write(this.io) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => this.fail(e),
        }
    }
}

/// The same flow semantics as [`relay`], copying through userspace buffers of `buf_size` bytes
/// per direction with `tokio::io::copy_bidirectional_with_sizes`.
pub async fn relay_copy<F>(
    client: TcpStream,
    upstream: TcpStream,
    buf_size: usize,
    counters: &Counters,
    idle_timeout: Duration,
    on_bytes: F,
) -> RelayEnd
where
    F: Fn(Direction, u64) + Send + Sync,
{
    let flow = Meter::new(counters, &on_bytes);
    let end = {
        let mut c = Metered {
            io: &client,
            dir: Direction::Down,
            flow: &flow,
            failed: false,
        };
        let mut u = Metered {
            io: &upstream,
            dir: Direction::Up,
            flow: &flow,
            failed: false,
        };
        let buf_size = buf_size.max(1);
        let copied = {
            let copy = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, buf_size, buf_size);
            with_watchers(copy, &client, &upstream, &flow, idle_timeout).await
        };
        match copied {
            Ok(Ok(_)) => RelayEnd::Done,
            Ok(Err(err)) => {
                // The copy reports no side; the wrapper that saw the error does.
                let side = if u.failed && !c.failed {
                    Side::Upstream
                } else {
                    Side::Client
                };
                RelayEnd::from(Fault { side, err })
            }
            Err(end) => end,
        }
    };
    close(client, upstream, &end);
    end
}

/// Runs `fut` unless a socket reports an error or the flow goes idle first.
async fn with_watchers<T, F: Fn(Direction, u64)>(
    fut: impl Future<Output = T>,
    client: &TcpStream,
    upstream: &TcpStream,
    flow: &Meter<'_, F>,
    idle_timeout: Duration,
) -> Result<T, RelayEnd> {
    tokio::select! {
        r = fut => Ok(r),
        f = watch_error(client, Side::Client) => Err(RelayEnd::from(f)),
        f = watch_error(upstream, Side::Upstream) => Err(RelayEnd::from(f)),
        () = flow.idle(idle_timeout) => Err(RelayEnd::Idle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_shrinks() {
        let pool = PipePool::with_max_idle(4, 64 * 1024, 2);
        let leases: Vec<_> = (0..4).map(|_| pool.try_acquire().unwrap()).collect();
        assert_eq!(pool.in_use(), 4);
        assert!(pool.try_acquire().is_none(), "bounded at max_pipes");
        assert!(leases.iter().all(|l| l.capacity() >= 4096));
        drop(leases);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.idle(), 2, "idle pipes beyond max_idle are closed");
        let again = pool.try_acquire().unwrap();
        assert_eq!(pool.idle(), 1);
        assert_eq!(pool.created_total(), 4, "an idle pipe is reused");
        drop(again);
        pool.trim(0);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_pipe_with_bytes_left_is_closed_not_pooled() {
        let pool = PipePool::new(2, 0);
        let mut lease = pool.try_acquire().unwrap();
        lease.filled = 10;
        drop(lease);
        assert_eq!((pool.in_use(), pool.idle()), (0, 0));
    }

    #[test]
    fn pipe_size_capped_at_the_system_maximum() {
        let pool = PipePool::new(1, 1 << 30);
        assert!(pool.pipe_size() < 1 << 30);
        let lease = pool.try_acquire().unwrap();
        assert_eq!(lease.capacity(), pool.pipe_size());
    }

    #[test]
    fn empty_pool_gives_nothing() {
        let pool = PipePool::new(0, DEFAULT_PIPE_SIZE);
        assert!(pool.try_acquire().is_none());
        assert_eq!(pool.created_total(), 0);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("splice".parse(), Ok(RelayMode::Splice));
        assert_eq!(
            "copy".parse(),
            Ok(RelayMode::Copy {
                buf_size: DEFAULT_COPY_BUF
            })
        );
        assert_eq!(
            "copy:262144".parse(),
            Ok(RelayMode::Copy { buf_size: 262144 })
        );
        assert!("copy:0".parse::<RelayMode>().is_err());
        assert!("sendfile".parse::<RelayMode>().is_err());
    }

    #[test]
    fn ends_display_and_sides() {
        assert_eq!(RelayEnd::Idle.to_string(), "idle_timeout");
        assert_eq!(RelayEnd::ClientReset.side(), Some(Side::Client));
        let end = RelayEnd::from(Fault {
            side: Side::Upstream,
            err: io::Error::from_raw_os_error(libc::ETIMEDOUT),
        });
        assert_eq!(end.side(), Some(Side::Upstream));
        assert!(end.to_string().starts_with("upstream error: "), "{end}");
        let end = RelayEnd::from(Fault {
            side: Side::Client,
            err: io::Error::from_raw_os_error(libc::EPIPE),
        });
        assert!(matches!(end, RelayEnd::ClientReset));
        assert!(!RelayEnd::Done.is_error());
    }

    // Real, short times (tokio's paused clock needs the test-util feature): only "never early"
    // and "eventually" are asserted.
    #[tokio::test]
    async fn idle_clock_restarts_when_bytes_move() {
        let counters = Counters::new();
        let hook = |_: Direction, _: u64| {};
        let flow = Meter::new(&counters, &hook);
        let timeout = Duration::from_millis(150);
        let idle = flow.idle(timeout);
        tokio::pin!(idle);
        // Bytes move every 20 ms for ten timeouts: never idle.
        for _ in 0..75 {
            tokio::select! {
                () = &mut idle => panic!("idle while bytes move"),
                () = tokio::time::sleep(Duration::from_millis(20)) => flow.moved(Direction::Down, 1),
            }
        }
        let quiet_from = Instant::now();
        tokio::time::timeout(Duration::from_secs(20), idle)
            .await
            .expect("idle eventually");
        assert!(quiet_from.elapsed() >= timeout - Duration::from_millis(2));
        assert_eq!(counters.down(), 75);
    }

    #[tokio::test]
    async fn no_timeout_is_forever() {
        let counters = Counters::new();
        let hook = |_: Direction, _: u64| {};
        let flow = Meter::new(&counters, &hook);
        let r = tokio::time::timeout(Duration::from_millis(50), flow.idle(Duration::MAX)).await;
        assert!(r.is_err());
    }
}
