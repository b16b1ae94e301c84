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

use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::io::read_gate::ReadGate;
use super::io::socket_options::limit_unsent;
use super::io::turns::Turns;
use super::service_listener::SecondChance;
use crate::accounting::{CounterSet, Direction};
use crate::protocol::MAX_DATA_PAYLOAD;
use crate::session::SocketEvent;
use reader::{Credit, CreditedReader, Pace, Unpaced, payload_read, read_now};
use retry::Retry;

mod reader;
mod retry;
mod writer;

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
    /// The agent refused the stream (its local dial failed): the visitor
    /// goes back to its listener for another replica if it has a second
    /// chance, and is reset otherwise.
    Refused,
}

/// What a connection tells its channel: an event of its socket, for the
/// channel's session.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct StreamEvent(pub(crate) SocketEvent);

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
    /// A visitor's way to another replica if this one refuses it (a
    /// service with more than one healthy replica); `None` elsewhere.
    pub(crate) second_chance: Option<SecondChance>,
    /// The service's bandwidth limit on this side, shared by its streams:
    /// reads take at most what it allows. `None`: no limit.
    pub(crate) bandwidth: Option<SharedBandwidth>,
}

/// A service's bandwidth bucket, shared by its streams on one side.
pub(crate) type SharedBandwidth = Arc<std::sync::Mutex<crate::bandwidth::Bandwidth>>;

impl StreamWiring {
    /// Counts `len` bytes just read and holds their ticket at the read gate:
    /// the `Read` event for the channel.
    fn read_event(&self, frame: Bytes, len: usize) -> StreamEvent {
        self.counters.add_bytes(self.read_direction, len as u64);
        self.counters.touch(super::now_ms());
        let frame = self.gate.hold(frame.len()).attach(frame);
        StreamEvent(SocketEvent::Read {
            id: self.id,
            frame,
            len,
        })
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
    /// What the visitor sent while its agent has not yet answered, to offer
    /// it to another replica if the agent refuses it.
    retry: Option<Retry>,
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
            .do_send(StreamEvent(SocketEvent::Finished { id: self.wiring.id }));
    }
}

impl Handler<StreamCommand> for ForwardedConnection {
    type Result = ();

    fn handle(&mut self, command: StreamCommand, ctx: &mut Self::Context) {
        match command {
            StreamCommand::Deliver(data) => {
                self.retry = None; // the agent answered: it took the stream
                self.deliver(data, ctx);
            }
            StreamCommand::Credit(n) => {
                self.retry = None;
                self.credit.grant(n);
            }
            StreamCommand::ShutdownWrite => {
                self.shutdown_pending = true;
                self.write_next(ctx);
            }
            StreamCommand::Reset => self.reset_now(ctx),
            StreamCommand::Refused => self.refused(ctx),
        }
    }
}

impl StreamHandler<io::Result<(Bytes, usize)>> for ForwardedConnection {
    fn handle(&mut self, item: io::Result<(Bytes, usize)>, ctx: &mut Self::Context) {
        let id = self.wiring.id;
        match item {
            Ok((frame, len)) => {
                Retry::keep(&mut self.retry, &frame);
                let read = self.wiring.read_event(frame, len);
                self.wiring.channel.do_send(read);
            }
            Err(e) => {
                tracing::debug!(stream = %id, error = %e, "socket read failed; aborting the stream");
                self.wiring
                    .channel
                    .do_send(StreamEvent(SocketEvent::Failed { id }));
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
            .do_send(StreamEvent(SocketEvent::ReadEof { id: self.wiring.id }));
        self.stop_when_done(ctx);
    }
}

impl ForwardedConnection {
    /// Starts the actor on `socket` on the current arbiter.
    pub(crate) fn start(socket: TcpStream, wiring: StreamWiring) -> Addr<Self> {
        let credit = wiring.initial_credit as usize;
        Self::start_with_credit(socket, wiring, credit, None)
    }

    /// Starts the actor on a visitor's socket that may already hold the
    /// visitor's first bytes, and reads them now (within the peer's window and
    /// the read gate): the caller sends them right behind the stream's opening
    /// frame, in the same WebSocket write, so the agent wakes once for both.
    /// A visitor another replica refused comes with what it had sent
    /// (`sent`), which goes first instead. The event to hand the channel, if
    /// anything was read.
    pub(crate) fn start_reading(
        socket: TcpStream,
        wiring: StreamWiring,
        sent: Bytes,
    ) -> (Addr<Self>, Option<StreamEvent>) {
        let (id, credit) = (wiring.id, wiring.initial_credit as usize);
        if !sent.is_empty() {
            return Self::start_replaying(socket, wiring, sent);
        }
        let want = credit.min(MAX_DATA_PAYLOAD);
        if want == 0 || !wiring.gate.has_room() {
            return (Self::start_with_credit(socket, wiring, credit, None), None);
        }
        match read_now(&socket, id, want) {
            Ok((frame, len)) if len > 0 => {
                let kept = wiring.second_chance.is_some().then(|| frame.clone());
                let read = wiring.read_event(frame, len);
                (
                    Self::start_with_credit(socket, wiring, credit - len, kept),
                    Some(read),
                )
            }
            // nothing yet, or end of stream (which the reader sees again)
            Ok(_) => (Self::start_with_credit(socket, wiring, credit, None), None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                (Self::start_with_credit(socket, wiring, credit, None), None)
            }
            Err(e) => {
                tracing::debug!(stream = %id, error = %e, "visitor socket failed at once; aborting the stream");
                let addr = Self::start_with_credit(socket, wiring, credit, None);
                addr.do_send(StreamCommand::Reset);
                (addr, Some(StreamEvent(SocketEvent::Failed { id })))
            }
        }
    }

    /// Starts the actor with `credit` to read; `first` is the `Data` frame
    /// already read from the socket, if any (kept for a second chance).
    fn start_with_credit(
        socket: TcpStream,
        mut wiring: StreamWiring,
        credit: usize,
        first: Option<Bytes>,
    ) -> Addr<Self> {
        if !wiring.tuned {
            let _ = socket.set_nodelay(true);
            if let Err(error) = limit_unsent(&socket) {
                tracing::debug!(%error, "cannot set TCP_NOTSENT_LOWAT");
            }
        }
        wiring.counters.connection_opened();
        let mut retry = wiring.second_chance.take().map(Retry::new);
        if let Some(frame) = first {
            Retry::keep(&mut retry, &frame);
        }
        let socket = Rc::new(socket);
        let credit = Rc::new(Credit::new(credit));
        Self::create(|ctx| {
            let (id, gate) = (wiring.id, wiring.gate.clone());
            let (read_socket, read_credit) = (socket.clone(), credit.clone());
            // a limited service's streams pace their reads; the others'
            // readers have no pacing to test
            match wiring.bandwidth.clone() {
                Some(bucket) => ctx.add_stream(Turns::new(
                    CreditedReader {
                        id,
                        socket: read_socket,
                        credit: read_credit,
                        gate,
                        pace: Pace::new(bucket),
                    },
                    payload_read,
                )),
                None => ctx.add_stream(Turns::new(
                    CreditedReader {
                        id,
                        socket: read_socket,
                        credit: read_credit,
                        gate,
                        pace: Unpaced,
                    },
                    payload_read,
                )),
            };
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
                retry,
            }
        })
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
