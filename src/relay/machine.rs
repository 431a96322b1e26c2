//! The splice relay as one poll-driven state machine.
//!
//! Every allowed flow spends most of its life here, usually waiting, so what this future holds is
//! most of an idle flow's memory. Written as nested `async fn`s in a `select!` (two pumps, two
//! error watchers, an idle timer) the future was ~1.4 KiB: each `.await` point keeps the state of
//! every future it waits on, each readiness future carries its own waiter node, and rustc does not
//! overlap the slots of futures moved between layers. Here a flow's relay is one struct: the two
//! directions' states (a few words each, a pipe or buffer only while a burst is in flight), a
//! boxed timer, and error watchers made only once a direction has ended. Waiting for a socket is
//! `poll_read_ready` / `poll_write_ready`, whose wakers live in tokio's per-socket state, not here.
//!
//! The pump logic is the one [`super`] describes: the first read of a burst through a small
//! stack buffer ([`super::copy_first`]), bursts that fill it through a pool pipe, the pipe always
//! drained completely before the socket is read again.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::{
    copy_first, eof, sides, watch_error, Direction, Fault, First, Meter, PipeLease, PipePool,
    RelayEnd, Side, FALLBACK_CHUNK, SMALL_COPY,
};

/// Hot-burst steps (a full pipe moved) before the pump yields to other tasks.
const BURST_STEPS: u32 = 64;

/// Where one direction is.
enum State<'p> {
    /// Waiting for src to become readable.
    Wait,
    /// Bytes of a first read that dst did not take at once: `rest[at..]` still to write.
    Left { rest: Box<[u8]>, at: usize },
    /// A burst through a pool pipe (`filled` bytes in it are still to drain to dst).
    Pipe(PipeLease<'p>),
    /// A burst through the fallback buffer (no pipe was free): `buf[at..len]` still to write.
    Buf {
        buf: Box<[u8]>,
        len: usize,
        at: usize,
    },
}

/// One direction: src -> dst until EOF (then shuts down dst's write side) or an error.
struct Pump<'p> {
    dir: Direction,
    state: State<'p>,
    /// The last burst filled the small buffer: the next one goes straight to a pipe.
    bulky: bool,
    /// Bytes moved in the current spliced burst.
    burst: usize,
    done: bool,
}

impl<'p> Pump<'p> {
    fn new(dir: Direction) -> Self {
        Pump {
            dir,
            state: State::Wait,
            bulky: false,
            burst: 0,
            done: false,
        }
    }

    /// Nobody is reading this direction's source: it ended, or waits to write to dst.
    fn source_unread(&self) -> bool {
        self.done || !matches!(self.state, State::Wait)
    }

    /// Moves what can be moved now; `Ready(Ok)` at src's EOF (passed on to dst).
    fn poll_move<F: Fn(Direction, u64)>(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        pool: &'p PipePool,
        flow: &Meter<'_, F>,
    ) -> Poll<Result<(), Fault>> {
        let dir = self.dir;
        let (src_side, dst_side) = sides(dir);
        let mut steps = 0;
        loop {
            match &mut self.state {
                State::Wait => {
                    ready!(src.poll_read_ready(cx)).map_err(Fault::on(src_side))?;
                    if !self.bulky {
                        self.burst = 0;
                        match copy_first(src, dst, dir, flow)? {
                            First::Eof => return Poll::Ready(eof(dst, dst_side, flow)),
                            First::Empty => {}
                            // A short burst is over; a full one goes on through a pipe.
                            First::Moved { filled } => self.bulky = filled,
                            First::Left { rest, filled } => {
                                self.bulky = filled;
                                self.state = State::Left { rest, at: 0 };
                            }
                        }
                        continue;
                    }
                    self.state = match pool.try_acquire() {
                        Some(lease) => State::Pipe(lease),
                        None => State::Buf {
                            buf: vec![0; FALLBACK_CHUNK].into_boxed_slice(),
                            len: 0,
                            at: 0,
                        },
                    };
                }
                State::Left { rest, at } => match write_some(cx, dst, &rest[*at..], dst_side)? {
                    Poll::Ready(m) => {
                        *at += m;
                        flow.moved(dir, m);
                        if *at == rest.len() {
                            self.state = State::Wait;
                        }
                    }
                    Poll::Pending => return Poll::Pending,
                },
                State::Pipe(lease) => {
                    if lease.filled > 0 {
                        match dst.try_io(Interest::WRITABLE, || lease.drain_to(dst.as_fd())) {
                            Ok(m) => flow.moved(dir, m),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                ready!(dst.poll_write_ready(cx)).map_err(Fault::on(dst_side))?;
                            }
                            Err(e) => return Poll::Ready(Err(Fault::on(dst_side)(e))),
                        }
                        continue;
                    }
                    if yield_now(cx, &mut steps) {
                        return Poll::Pending;
                    }
                    match src.try_io(Interest::READABLE, || lease.fill_from(src.as_fd())) {
                        Ok(0) => {
                            // Empty, so the pipe goes back to the pool.
                            self.state = State::Wait;
                            return Poll::Ready(eof(dst, dst_side, flow));
                        }
                        Ok(n) => self.burst = self.burst.saturating_add(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Nothing more for now: give the (empty) pipe back before waiting. A
                            // burst that stayed small sends the next one to the copy again.
                            self.bulky = self.burst >= SMALL_COPY;
                            self.burst = 0;
                            self.state = State::Wait;
                        }
                        Err(e) => return Poll::Ready(Err(Fault::on(src_side)(e))),
                    }
                }
                State::Buf { buf, len, at } => {
                    if *at < *len {
                        match write_some(cx, dst, &buf[*at..*len], dst_side)? {
                            Poll::Ready(m) => {
                                *at += m;
                                flow.moved(dir, m);
                            }
                            Poll::Pending => return Poll::Pending,
                        }
                        continue;
                    }
                    if yield_now(cx, &mut steps) {
                        return Poll::Pending;
                    }
                    match src.try_read(buf) {
                        Ok(0) => {
                            self.state = State::Wait;
                            return Poll::Ready(eof(dst, dst_side, flow));
                        }
                        Ok(n) => {
                            self.burst = self.burst.saturating_add(n);
                            (*len, *at) = (n, 0);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.bulky = self.burst >= SMALL_COPY;
                            self.burst = 0;
                            self.state = State::Wait;
                        }
                        Err(e) => return Poll::Ready(Err(Fault::on(src_side)(e))),
                    }
                }
            }
        }
    }
}

/// Writes part of `buf` to dst: `Ready(n)` with n > 0, or `Pending` once dst is not writable
/// (its waker registered).
fn write_some(
    cx: &mut Context<'_>,
    dst: &TcpStream,
    buf: &[u8],
    side: Side,
) -> Result<Poll<usize>, Fault> {
    loop {
        match dst.try_write(buf) {
            Ok(0) => return Err(Fault::on(side)(io::ErrorKind::WriteZero.into())),
            Ok(m) => return Ok(Poll::Ready(m)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match dst.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Err(Fault::on(side)(e)),
                Poll::Pending => return Ok(Poll::Pending),
            },
            Err(e) => return Err(Fault::on(side)(e)),
        }
    }
}

/// A hot burst never waits for readiness: after [`BURST_STEPS`] steps it gives other tasks
/// their turn (woken at once, so it goes on at its next poll).
fn yield_now(cx: &mut Context<'_>, steps: &mut u32) -> bool {
    *steps += 1;
    if *steps > BURST_STEPS {
        cx.waker().wake_by_ref();
        return true;
    }
    false
}

type Watch<'a> = Pin<Box<dyn Future<Output = Fault> + Send + 'a>>;

/// The relay of one flow: both pumps, the idle timer, and (once a direction has ended, so that
/// nobody reads that side any more) an error watcher for it.
pub(crate) struct Machine<'a, F> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    pool: &'a PipePool,
    flow: &'a Meter<'a, F>,
    up: Pump<'a>,
    down: Pump<'a>,
    idle_timeout: Duration,
    /// Armed for the last activity seen (`armed_for`, ms after the flow's epoch) plus the
    /// timeout; made at the first poll (none for an infinite timeout).
    timer: Option<Pin<Box<Sleep>>>,
    armed_for: u64,
    watch_client: Option<Watch<'a>>,
    watch_upstream: Option<Watch<'a>>,
    /// Resolves, saying why, when the flow must be closed from outside.
    closed: Option<Closed<'a>>,
}

/// What says a flow must be closed from outside its relay (boxed: it is made once per flow).
pub(crate) type Closed<'a> = Pin<Box<dyn Future<Output = &'static str> + Send + 'a>>;

impl<'a, F: Fn(Direction, u64)> Machine<'a, F> {
    pub(crate) fn new(
        client: &'a TcpStream,
        upstream: &'a TcpStream,
        pool: &'a PipePool,
        flow: &'a Meter<'a, F>,
        idle_timeout: Duration,
    ) -> Self {
        Machine {
            client,
            upstream,
            pool,
            flow,
            up: Pump::new(Direction::Up),
            down: Pump::new(Direction::Down),
            idle_timeout,
            timer: None,
            armed_for: 0,
            watch_client: None,
            watch_upstream: None,
            closed: None,
        }
    }

    /// Ends the relay with [`RelayEnd::Closed`] when `closed` resolves.
    pub(crate) fn closed_by(mut self, closed: Closed<'a>) -> Self {
        self.closed = Some(closed);
        self
    }

    /// `Ready` once nothing moved for the idle timeout. The timer is armed once and, like
    /// [`Meter::idle`], moved on only when it fires after bytes moved: a busy flow costs no
    /// timer work per poll.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(t) = &mut self.timer else {
                let last = self.flow.last_ms.load(Ordering::Relaxed);
                let Some(deadline) = self.idle_deadline(last) else {
                    return Poll::Pending;
                };
                self.timer = Some(Box::pin(tokio::time::sleep_until(deadline)));
                self.armed_for = last;
                continue;
            };
            ready!(t.as_mut().poll(cx));
            let last = self.flow.last_ms.load(Ordering::Relaxed);
            if last == self.armed_for {
                return Poll::Ready(());
            }
            let Some(deadline) = self.idle_deadline(last) else {
                return Poll::Pending;
            };
            if let Some(t) = &mut self.timer {
                t.as_mut().reset(deadline);
            }
            self.armed_for = last;
        }
    }

    /// When the flow is idle if nothing moves after `last` (ms after the epoch); `None` for a
    /// timeout too large to reach.
    fn idle_deadline(&self, last: u64) -> Option<tokio::time::Instant> {
        (self.flow.epoch + Duration::from_millis(last)).checked_add(self.idle_timeout)
    }
}

/// Polls the error watcher of a side once it is `needed` (made then, kept after).
fn poll_watch<'a>(
    slot: &mut Option<Watch<'a>>,
    needed: bool,
    sock: &'a TcpStream,
    side: Side,
    cx: &mut Context<'_>,
) -> Poll<Fault> {
    if !needed && slot.is_none() {
        return Poll::Pending;
    }
    slot.get_or_insert_with(|| Box::pin(watch_error(sock, side)))
        .as_mut()
        .poll(cx)
}

impl<F: Fn(Direction, u64) + Sync> Future for Machine<'_, F> {
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.get_mut();
        let (client, upstream, pool, flow) = (this.client, this.upstream, this.pool, this.flow);
        for (pump, src, dst) in [
            (&mut this.up, client, upstream),
            (&mut this.down, upstream, client),
        ] {
            if pump.done {
                continue;
            }
            if let Poll::Ready(r) = pump.poll_move(cx, src, dst, pool, flow) {
                match r {
                    Ok(()) => pump.done = true,
                    Err(f) => return Poll::Ready(RelayEnd::from(f)),
                }
            }
        }
        if this.up.done && this.down.done {
            return Poll::Ready(RelayEnd::Done);
        }
        // A side that no pump is reading (its direction ended, or is waiting to write to the
        // other side) would see an RST only at the next write to it: it is watched for errors
        // from then on (a watcher is made once, so an idle flow never has one).
        for (slot, needed, sock, side) in [
            (
                &mut this.watch_client,
                this.up.source_unread(),
                client,
                Side::Client,
            ),
            (
                &mut this.watch_upstream,
                this.down.source_unread(),
                upstream,
                Side::Upstream,
            ),
        ] {
            if let Poll::Ready(f) = poll_watch(slot, needed, sock, side, cx) {
                return Poll::Ready(RelayEnd::from(f));
            }
        }
        if let Some(c) = &mut this.closed {
            if let Poll::Ready(why) = c.as_mut().poll(cx) {
                return Poll::Ready(RelayEnd::Closed(why));
            }
        }
        match this.poll_idle(cx) {
            Poll::Ready(()) => Poll::Ready(RelayEnd::Idle),
            Poll::Pending => Poll::Pending,
        }
    }
}
