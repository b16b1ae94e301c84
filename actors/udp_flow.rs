//! `UdpFlow`: one per UDP flow on the agent, with its own UDP socket
//! connected to the local service, so that the service's replies come back to
//! this flow (and so to the right visitor).
//!
//! Datagrams from the tunnel are sent with `try_send` (dropped and counted when
//! the socket is full: datagram semantics, no queue); replies go up as encoded
//! `Datagram` frames. Stops after `idle_timeout` without traffic either way,
//! when its tunnel ends, or on `CloseFlow`; tells its connection when it stops.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::accounting::{CounterSet, Direction, DropKind};
use crate::protocol::Message;
use crate::udp::MAX_DATAGRAM;

/// A datagram from the visitor, for the local service.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct ToService(pub(crate) Bytes);

/// The server closed the flow.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct CloseFlow;

/// What a flow tells its connection.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum FlowEvent {
    /// A reply from the service, as an encoded `Datagram` frame.
    Reply {
        /// The flow.
        id: Uuid,
        /// The encoded frame.
        frame: Bytes,
    },
    /// A forwarded visitor's datagram (a cluster's UDP forward), as an
    /// encoded `Datagram` frame whose length was taken from `budget`: given
    /// back once queued.
    Forwarded {
        /// The flow.
        id: Uuid,
        /// The encoded frame.
        frame: Bytes,
        /// The forward's budget of datagrams in flight.
        budget: crate::budget::Budget,
    },
    /// The flow stopped (idle, closed, or its socket failed).
    Ended {
        /// The flow.
        id: Uuid,
    },
}

/// How a flow is wired to its tunnel.
pub(crate) struct FlowWiring {
    pub(crate) id: Uuid,
    pub(crate) connection: Recipient<FlowEvent>,
    pub(crate) counters: CounterSet,
    pub(crate) idle_timeout: Duration,
    pub(crate) cancel: CancellationToken,
    /// The PROXY protocol header put before each datagram, if any.
    pub(crate) proxy_header: Option<Bytes>,
}

/// The flow actor.
pub(crate) struct UdpFlow {
    wiring: FlowWiring,
    socket: Rc<UdpSocket>,
    last_active: Instant,
}

impl Actor for UdpFlow {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let cancel = self.wiring.cancel.clone();
        ctx.spawn(
            async move { cancel.cancelled_owned().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        );
        let sweep = (self.wiring.idle_timeout / 4).max(Duration::from_millis(50));
        ctx.run_interval(sweep, |act, ctx| {
            if act.last_active.elapsed() >= act.wiring.idle_timeout {
                tracing::debug!(flow = %act.wiring.id, "udp flow idle; closing");
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.wiring.counters.connection_closed();
        let id = self.wiring.id;
        self.wiring.connection.do_send(FlowEvent::Ended { id });
    }
}

impl Handler<ToService> for UdpFlow {
    type Result = ();

    fn handle(&mut self, msg: ToService, _: &mut Self::Context) {
        self.last_active = Instant::now();
        self.wiring.counters.touch(super::now_ms());
        let sent = match &self.wiring.proxy_header {
            None => send_now(&self.socket, &msg.0, None),
            // one datagram from two slices: the header, then the visitor's bytes
            Some(header) => socket2::SockRef::from(&*self.socket)
                .send_vectored(&[io::IoSlice::new(header), io::IoSlice::new(&msg.0)]),
        };
        match sent {
            Ok(_) => self
                .wiring
                .counters
                .add_datagram(Direction::In, msg.0.len() as u64),
            Err(e) => {
                tracing::debug!(flow = %self.wiring.id, error = %e, "datagram to the service dropped");
                self.wiring.counters.add_drop(DropKind::SocketFull)
            }
        }
    }
}

impl Handler<CloseFlow> for UdpFlow {
    type Result = ();

    fn handle(&mut self, _: CloseFlow, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl StreamHandler<io::Result<Bytes>> for UdpFlow {
    fn handle(&mut self, item: io::Result<Bytes>, _: &mut Self::Context) {
        let data = match item {
            Ok(data) => data,
            // e.g. ICMP port unreachable: the service is not there (yet); keep the flow
            Err(e) => {
                return tracing::debug!(flow = %self.wiring.id, error = %e, "udp receive failed");
            }
        };
        self.last_active = Instant::now();
        self.wiring.counters.touch(super::now_ms());
        let frame = (data.len() <= MAX_DATAGRAM)
            .then(|| Message::datagram_frame(self.wiring.id, &data))
            .flatten();
        let Some(frame) = frame else {
            return self.wiring.counters.add_drop(DropKind::Oversized);
        };
        self.wiring
            .counters
            .add_datagram(Direction::Out, data.len() as u64);
        let id = self.wiring.id;
        self.wiring
            .connection
            .do_send(FlowEvent::Reply { id, frame });
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl UdpFlow {
    /// Opens a socket connected to `service` and starts the flow.
    pub(crate) fn start(service: SocketAddr, wiring: FlowWiring) -> io::Result<Addr<Self>> {
        let local: SocketAddr = if service.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local)?;
        let tuned = socket2::SockRef::from(&socket);
        let _ = tuned.set_recv_buffer_size(4 << 20);
        let _ = tuned.set_send_buffer_size(4 << 20);
        socket.connect(service)?;
        socket.set_nonblocking(true)?;
        let socket = Rc::new(UdpSocket::from_std(socket)?);
        wiring.counters.connection_opened();
        Ok(Self::create(|ctx| {
            ctx.add_stream(replies(socket.clone()));
            Self {
                wiring,
                socket,
                last_active: Instant::now(),
            }
        }))
    }
}

/// Sends one datagram now, or fails (a full socket: the caller drops it).
/// A plain non-blocking `send`, not tokio's `try_send`, which refuses until
/// the reactor has once reported the socket writable, so a new flow's first
/// datagram would be dropped.
pub(crate) fn send_now(
    socket: &UdpSocket,
    data: &[u8],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let raw = socket2::SockRef::from(socket);
    match to {
        Some(to) => raw.send_to(data, &to.into()),
        None => raw.send(data),
    }
}

/// Replies from the service, each whole (see `udp_listener::receive`).
fn replies(socket: Rc<UdpSocket>) -> impl Stream<Item = io::Result<Bytes>> {
    let arena = BytesMut::new();
    futures::stream::unfold((socket, arena), |(socket, mut arena)| async move {
        arena.reserve((MAX_DATAGRAM + 1).max(256 * 1024));
        let item = socket.recv_buf(&mut arena).await;
        let item = item.map(|n| arena.split_to(n).freeze());
        Some((item, (socket, arena)))
    })
}
