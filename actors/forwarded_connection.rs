//! `ForwardedConnection`: one per forwarded TCP connection, on either side of
//! the tunnel (the visitor's socket on the server, the local service's socket
//! on the agent).
//!
//! Owns the socket, its read credit and its write queue. Reads only while the
//! peer has granted credit (a chunk at most [`MAX_DATA_PAYLOAD`]), into a
//! per-thread scratch buffer, so an idle connection keeps no buffer. Keeps one
//! coalesced write in flight; the queue never holds more than the window the
//! owning channel granted. Receives `StreamCommand`s; reports `StreamEvent`s
//! to its channel. Stops when both directions are done, on reset (its stream
//! hub resets every connection when the tunnel ends), or when its tunnel's
//! cancellation token, if it has one, fires.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use actix::prelude::*;
use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::io::read_gate::ReadGate;
use crate::accounting::{CounterSet, Direction};
use crate::protocol::{DATA_FRAME_OVERHEAD, MAX_DATA_PAYLOAD, Message};

/// What the owning channel tells a connection.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum StreamCommand {
    /// Write these bytes to the socket.
    Deliver(Bytes),
    /// The peer granted this much more read credit.
    Credit(u32),
    /// The peer half-closed: shut the write side once the queue is written.
    ShutdownWrite,
    /// The stream is gone: reset the socket now.
    Reset,
}

/// What a connection tells its channel.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum StreamEvent {
    /// Bytes read from the socket, within the credit, already framed as `Data`.
    Read {
        /// The stream.
        id: Uuid,
        /// The encoded `Data` frame; it holds its ticket at the tunnel's read
        /// gate until the WebSocket's encoder has copied it.
        frame: Bytes,
        /// Payload bytes in it.
        len: usize,
    },
    /// The socket's read side ended (FIN).
    ReadEof {
        /// The stream.
        id: Uuid,
    },
    /// Bytes written to the socket: credit may go back to the peer.
    Delivered {
        /// The stream.
        id: Uuid,
        /// How many.
        len: usize,
    },
    /// The socket failed or was reset.
    Failed {
        /// The stream.
        id: Uuid,
    },
    /// The actor stopped.
    Finished {
        /// The stream.
        id: Uuid,
    },
}

/// How a connection is wired to its tunnel.
pub(crate) struct StreamWiring {
    pub(crate) id: Uuid,
    pub(crate) channel: Recipient<StreamEvent>,
    pub(crate) initial_credit: u32,
    pub(crate) counters: CounterSet,
    /// Direction of the bytes this side reads from its socket.
    pub(crate) read_direction: Direction,
    /// Resets the connection when cancelled, whatever its channel is doing:
    /// the server's connections (the registry fires the tunnel's token when it
    /// drops a tunnel whose WebSocket actor is frozen) and an access
    /// session's. The agent's tunnel connections carry none: the agent's
    /// channel never freezes (its writes are futures of their own) and resets
    /// them itself when its link ends (`StreamHub::close_all`), and a token's
    /// future is polled on every wake-up of its actor.
    pub(crate) cancel: Option<CancellationToken>,
    /// The tunnel side's read gate, shared by all its connections.
    pub(crate) gate: Arc<ReadGate>,
    /// The socket already has `TCP_NODELAY` and `TCP_NOTSENT_LOWAT` (accepted
    /// sockets inherit them from a listener that has them, on Linux): two
    /// system calls fewer per connection.
    pub(crate) tuned: bool,
}

impl StreamWiring {
    /// Counts `len` bytes just read and holds their ticket at the read gate:
    /// the `Read` event for the channel.
    fn read_event(&self, frame: Bytes, len: usize) -> StreamEvent {
        self.counters.add_bytes(self.read_direction, len as u64);
        self.counters.touch(super::now_ms());
        let frame = self.gate.hold(frame.len()).attach(frame);
        StreamEvent::Read {
            id: self.id,
            frame,
            len,
        }
    }
}

/// The connection actor.
pub(crate) struct ForwardedConnection {
    wiring: StreamWiring,
    credit: Rc<Credit>,
    socket: Rc<TcpStream>,
    queue: VecDeque<Bytes>,
    writing: bool,
    shutdown_pending: bool,
    read_done: bool,
    write_done: bool,
    reset: bool,
}

impl Actor for ForwardedConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(cancel) = self.wiring.cancel.clone() else {
            return;
        };
        ctx.spawn(
            async move { cancel.cancelled_owned().await }
                .into_actor(self)
                .map(|(), act, ctx| {
                    act.reset_now(ctx);
                }),
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.wiring.counters.connection_closed();
        self.wiring
            .channel
            .do_send(StreamEvent::Finished { id: self.wiring.id });
    }
}

impl Handler<StreamCommand> for ForwardedConnection {
    type Result = ();

    fn handle(&mut self, command: StreamCommand, ctx: &mut Self::Context) {
        match command {
            StreamCommand::Deliver(data) => self.deliver(data, ctx),
            StreamCommand::Credit(n) => self.credit.grant(n),
            StreamCommand::ShutdownWrite => {
                self.shutdown_pending = true;
                self.write_next(ctx);
            }
            StreamCommand::Reset => self.reset_now(ctx),
        }
    }
}

impl StreamHandler<io::Result<(Bytes, usize)>> for ForwardedConnection {
    fn handle(&mut self, item: io::Result<(Bytes, usize)>, ctx: &mut Self::Context) {
        let id = self.wiring.id;
        match item {
            Ok((frame, len)) => {
                let read = self.wiring.read_event(frame, len);
                self.wiring.channel.do_send(read);
            }
            Err(e) => {
                tracing::debug!(stream = %id, error = %e, "socket read failed; aborting the stream");
                self.wiring.channel.do_send(StreamEvent::Failed { id });
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.reset {
            return;
        }
        self.read_done = true;
        self.wiring
            .channel
            .do_send(StreamEvent::ReadEof { id: self.wiring.id });
        self.stop_when_done(ctx);
    }
}

impl ForwardedConnection {
    /// Starts the actor on `socket` on the current arbiter.
    pub(crate) fn start(socket: TcpStream, wiring: StreamWiring) -> Addr<Self> {
        let credit = wiring.initial_credit as usize;
        Self::start_with_credit(socket, wiring, credit)
    }

    /// Starts the actor on a visitor's socket that may already hold the
    /// visitor's first bytes, and reads them now (within the peer's window and
    /// the read gate): the caller sends them right behind the stream's opening
    /// frame, in the same WebSocket write, so the agent wakes once for both.
    /// The event to hand the channel, if anything was read.
    pub(crate) fn start_reading(
        socket: TcpStream,
        wiring: StreamWiring,
    ) -> (Addr<Self>, Option<StreamEvent>) {
        let (id, credit) = (wiring.id, wiring.initial_credit as usize);
        let want = credit.min(MAX_DATA_PAYLOAD);
        if want == 0 || !wiring.gate.has_room() {
            return (Self::start_with_credit(socket, wiring, credit), None);
        }
        match read_now(&socket, id, want) {
            Ok((frame, len)) if len > 0 => {
                let read = wiring.read_event(frame, len);
                (
                    Self::start_with_credit(socket, wiring, credit - len),
                    Some(read),
                )
            }
            // nothing yet, or end of stream (which the reader sees again)
            Ok(_) => (Self::start_with_credit(socket, wiring, credit), None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                (Self::start_with_credit(socket, wiring, credit), None)
            }
            Err(e) => {
                tracing::debug!(stream = %id, error = %e, "visitor socket failed at once; aborting the stream");
                let addr = Self::start_with_credit(socket, wiring, credit);
                addr.do_send(StreamCommand::Reset);
                (addr, Some(StreamEvent::Failed { id }))
            }
        }
    }

    fn start_with_credit(socket: TcpStream, wiring: StreamWiring, credit: usize) -> Addr<Self> {
        if !wiring.tuned {
            let _ = socket.set_nodelay(true);
            if let Err(error) = limit_unsent(&socket) {
                tracing::debug!(%error, "cannot set TCP_NOTSENT_LOWAT");
            }
        }
        wiring.counters.connection_opened();
        let socket = Rc::new(socket);
        let credit = Rc::new(Credit::new(credit));
        Self::create(|ctx| {
            ctx.add_stream(CreditedReader {
                id: wiring.id,
                socket: socket.clone(),
                credit: credit.clone(),
                gate: wiring.gate.clone(),
            });
            Self {
                wiring,
                credit,
                socket,
                queue: VecDeque::new(),
                writing: false,
                shutdown_pending: false,
                read_done: false,
                write_done: false,
                reset: false,
            }
        })
    }

    /// Writes `data` at once when the socket takes it (no copy, no spawned
    /// write); what must wait is copied out of the WebSocket read buffer it was
    /// sliced from, so that a stalled socket pins nothing larger than itself.
    /// The write goes straight to the (non-blocking) socket, not through
    /// tokio's readiness: a socket just dialed has none until the reactor's
    /// next turn, and the first bytes would wait for it.
    fn deliver(&mut self, data: Bytes, ctx: &mut Context<Self>) {
        let idle = !self.writing && !self.write_done && self.queue.is_empty();
        let written = if idle {
            match socket2::SockRef::from(&*self.socket).send(&data) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return self.write_failed(e, ctx),
            }
        } else {
            0
        };
        if written < data.len() {
            self.queue
                .push_back(Bytes::copy_from_slice(&data[written..]));
        }
        if written > 0 {
            self.report_written(written);
        }
        self.write_next(ctx);
    }

    /// Writes everything queued in one batch (vectored); at most one batch in flight.
    fn write_next(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.write_done {
            return;
        }
        if self.queue.is_empty() {
            return self.shutdown_if_asked(ctx);
        }
        let batch: Vec<Bytes> = self.queue.drain(..).collect();
        let len: usize = batch.iter().map(Bytes::len).sum();
        self.writing = true;
        let socket = self.socket.clone();
        ctx.spawn(
            write_all(socket, batch)
                .into_actor(self)
                .map(move |result, act, ctx| act.written(result, len, ctx)),
        );
    }

    fn written(&mut self, result: io::Result<()>, len: usize, ctx: &mut Context<Self>) {
        self.writing = false;
        match result {
            Ok(()) => {
                self.report_written(len);
                self.write_next(ctx);
            }
            Err(e) => self.write_failed(e, ctx),
        }
    }

    /// Bytes reached the socket: count them and let the channel return credit.
    fn report_written(&self, len: usize) {
        let id = self.wiring.id;
        let direction = opposite(self.wiring.read_direction);
        self.wiring.counters.add_bytes(direction, len as u64);
        self.wiring
            .channel
            .do_send(StreamEvent::Delivered { id, len });
    }

    fn write_failed(&mut self, error: io::Error, ctx: &mut Context<Self>) {
        tracing::debug!(stream = %self.wiring.id, %error, "socket write failed; aborting the stream");
        self.wiring
            .channel
            .do_send(StreamEvent::Failed { id: self.wiring.id });
        ctx.stop();
    }

    /// Sends FIN once everything queued is written (the peer's half-close).
    /// When the read side has ended too, closing the socket sends the FIN:
    /// no `shutdown` call first.
    fn shutdown_if_asked(&mut self, ctx: &mut Context<Self>) {
        if !self.shutdown_pending || self.write_done {
            return;
        }
        if !self.read_done {
            let _ = socket2::SockRef::from(&*self.socket).shutdown(std::net::Shutdown::Write);
        }
        self.write_done = true;
        self.stop_when_done(ctx);
    }

    fn stop_when_done(&mut self, ctx: &mut Context<Self>) {
        if self.read_done && self.write_done {
            ctx.stop();
        }
    }

    /// Closes with RST: SO_LINGER 0, and no FIN before it (never `shutdown`).
    fn reset_now(&mut self, ctx: &mut Context<Self>) {
        self.reset = true;
        self.queue.clear();
        // with a zero timeout SO_LINGER never blocks the thread
        #[allow(deprecated)]
        let _ = self.socket.set_linger(Some(Duration::ZERO));
        ctx.stop();
    }
}

/// Unsent bytes the kernel may hold for one forwarded socket before it stops
/// taking writes: enough to keep a fast peer busy between two wake-ups.
const UNSENT_LOW_WATER: u32 = 128 * 1024;

/// Caps what a socket whose peer stopped reading keeps in the kernel
/// (`TCP_NOTSENT_LOWAT`). Without it the kernel grows the send buffer to
/// megabytes per socket, and a thousand stalled visitors push the whole host
/// into TCP memory pressure, where every window, the tunnel's own included,
/// shrinks to a crawl.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn limit_unsent<S: std::os::fd::AsFd>(socket: &S) -> io::Result<()> {
    socket2::SockRef::from(socket).set_tcp_notsent_lowat(UNSENT_LOW_WATER)
}

/// Elsewhere the kernel has no such option.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn limit_unsent<S>(_: &S) -> io::Result<()> {
    let _ = UNSENT_LOW_WATER;
    Ok(())
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::In => Direction::Out,
        Direction::Out => Direction::In,
    }
}

/// Read credit shared between the actor and its reader stream.
struct Credit {
    bytes: Cell<usize>,
    waker: RefCell<Option<Waker>>,
}

impl Credit {
    fn new(initial: usize) -> Self {
        Self {
            bytes: Cell::new(initial),
            waker: RefCell::new(None),
        }
    }

    fn grant(&self, n: u32) {
        self.bytes.set(self.bytes.get() + n as usize);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// Capacity of a thread's first read arena block: a few full frames, or many
/// small ones.
const ARENA_CAPACITY: usize = 256 * 1024;

/// The least room a read takes from what is left of the arena's block; below
/// it, the block is reclaimed (its frames all gone) or a new one started.
const ARENA_MIN_READ: usize = 16 * 1024;

thread_local! {
    /// One read arena per thread, shared by every connection on it: frames are
    /// read straight into it behind their header and split off, so an idle
    /// connection keeps no buffer and a frame costs no copy. Its memory is
    /// reused once the frames cut from it have been written out.
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(ARENA_CAPACITY));
}

/// Makes room in `arena` for a `Data` frame of up to `want` payload bytes and
/// says how many a read may take. A read takes what is left of the block,
/// even less than `want`, rather than a block of its own: reserving `want`
/// (up to 64 KiB) for every 64-byte message started a new 64 KiB block per
/// read while earlier frames were in flight (measured: 8-11 % of the server's
/// CPU in malloc, heap trims and page faults under 64-connection ping-pong).
fn make_room(arena: &mut BytesMut, want: usize) -> usize {
    arena.clear();
    let needed = DATA_FRAME_OVERHEAD + want;
    if arena.capacity() >= needed || arena.try_reclaim(needed) {
        return want;
    }
    if arena.capacity() >= DATA_FRAME_OVERHEAD + ARENA_MIN_READ {
        return arena.capacity() - DATA_FRAME_OVERHEAD;
    }
    // a block of one full frame, as `reserve` would allocate: larger ones
    // (256 KiB) cost a single upload a page fault per 4 KiB again
    *arena = BytesMut::with_capacity(needed);
    want
}

/// Reads at most `want` bytes (at most a frame's payload) from `socket`
/// straight behind a `Data` header in `arena`: the frame, its payload length
/// (`(empty, 0)` at end of stream), and how many bytes the read could take.
fn read_frame(
    socket: &TcpStream,
    arena: &mut BytesMut,
    id: Uuid,
    want: usize,
) -> io::Result<(Bytes, usize, usize)> {
    let room = make_room(arena, want);
    arena.put_bytes(0, DATA_FRAME_OVERHEAD);
    let read = socket.try_read_buf(&mut (&mut *arena).limit(room));
    let header = match read {
        Ok(0) => None,
        Ok(n) => Message::data_frame_header(id, n),
        Err(e) => {
            arena.clear();
            return Err(e);
        }
    };
    match header {
        Some(header) => {
            arena[..DATA_FRAME_OVERHEAD].copy_from_slice(&header);
            let n = arena.len() - DATA_FRAME_OVERHEAD;
            Ok((arena.split().freeze(), n, room))
        }
        None => {
            arena.clear();
            Ok((Bytes::new(), 0, room))
        }
    }
}

/// Reads at most `want` bytes as a `Data` frame, as [`read_frame`] does, into
/// this thread's arena. A short read means the socket is drained for now: its
/// read readiness is cleared then (as tokio's own `AsyncRead` does), which
/// spares the `EAGAIN` read that would follow every small message.
fn read_now(socket: &TcpStream, id: Uuid, want: usize) -> io::Result<(Bytes, usize)> {
    let mut read = None;
    let outcome = socket.try_io(Interest::READABLE, || {
        let (frame, n, room) =
            ARENA.with(|arena| read_frame(socket, &mut arena.borrow_mut(), id, want))?;
        let drained = n > 0 && n < room;
        read = Some((frame, n));
        if drained {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (read, outcome) {
        (Some(read), _) => Ok(read),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Writes every chunk, vectored, waiting for writability as needed.
async fn write_all(socket: Rc<TcpStream>, batch: Vec<Bytes>) -> io::Result<()> {
    let (mut index, mut offset) = (0, 0);
    while index < batch.len() {
        socket.writable().await?;
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&batch[index][offset..])
            .chain(batch[index + 1..].iter().map(|b| &b[..]))
            .take(64)
            .map(io::IoSlice::new)
            .collect();
        let mut written = match socket.try_write_vectored(&slices) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while index < batch.len() && written >= batch[index].len() - offset {
            written -= batch[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

/// The socket's read side, gated by credit and by the tunnel's read gate:
/// returns `Pending` at zero credit or while the gate is closed.
struct CreditedReader {
    id: Uuid,
    socket: Rc<TcpStream>,
    credit: Rc<Credit>,
    gate: Arc<ReadGate>,
}

impl Stream for CreditedReader {
    /// A `Data` frame and the payload bytes in it.
    type Item = io::Result<(Bytes, usize)>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let credit = self.credit.bytes.get();
        if credit == 0 {
            *self.credit.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if !self.gate.is_open(self.id, cx) {
            return Poll::Pending;
        }
        loop {
            if let Err(e) = futures::ready!(self.socket.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            // invariant: `want` is at most MAX_DATA_PAYLOAD, so a header is always built
            let want = credit.min(MAX_DATA_PAYLOAD);
            match read_now(&self.socket, self.id, want) {
                Ok((_, 0)) => return Poll::Ready(None),
                Ok((frame, n)) => {
                    self.credit.bytes.set(credit - n);
                    return Poll::Ready(Some(Ok((frame, n))));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small reads while their frames are still in flight share blocks: a
    /// new block only every few hundred reads, not one per read.
    #[test]
    fn small_reads_share_the_arena_blocks_while_their_frames_live() {
        let mut arena = BytesMut::with_capacity(ARENA_CAPACITY);
        let mut in_flight = Vec::new();
        let mut blocks = 0;
        for _ in 0..5000 {
            let before = arena.as_ptr() as usize + arena.len();
            let room = make_room(&mut arena, MAX_DATA_PAYLOAD);
            assert!((ARENA_MIN_READ..=MAX_DATA_PAYLOAD).contains(&room));
            assert!(arena.capacity() >= DATA_FRAME_OVERHEAD + room);
            if arena.as_ptr() as usize != before {
                blocks += 1;
            }
            arena.put_bytes(7, DATA_FRAME_OVERHEAD + 64);
            in_flight.push(arena.split().freeze());
        }
        assert!(blocks < 20, "{blocks} blocks for 5000 small reads");
    }

    /// Once its frames are gone, a block is reused from its start.
    #[test]
    fn a_block_whose_frames_are_gone_is_reclaimed() {
        let mut arena = BytesMut::with_capacity(DATA_FRAME_OVERHEAD + MAX_DATA_PAYLOAD);
        let start = arena.as_ptr();
        let room = make_room(&mut arena, MAX_DATA_PAYLOAD);
        arena.put_bytes(7, DATA_FRAME_OVERHEAD + room);
        drop(arena.split());
        assert_eq!(make_room(&mut arena, MAX_DATA_PAYLOAD), MAX_DATA_PAYLOAD);
        assert_eq!(arena.as_ptr(), start);
    }
}
