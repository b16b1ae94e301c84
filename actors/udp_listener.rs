//! `UdpServiceListener`: one per registered UDP service, on its public port.
//!
//! Owns the UDP socket and the service's [`FlowTable`]: each visitor address
//! is a flow, announced to the control channel (`FlowOpened`, which becomes a
//! `Connect`), and each datagram from it goes up as an encoded `Datagram`
//! frame. Replies come back as `SendToVisitor` and leave with `try_send_to`:
//! datagram semantics, no queue. Whatever is over a limit (size, rate, flows,
//! the channel's byte budget, a full socket) is dropped and counted. Idle
//! flows expire. Stops with its tunnel or on `StopListener`.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::registry::FlowView;
use crate::accounting::{Counters, Direction, DropKind};
use crate::budget::Budget;
use crate::log_limit::{LogLimiter, RemoteEvent};
use crate::protocol::Message;
use crate::udp::{FlowLimits, FlowTable, Verdict};

/// What a UDP listener tells its control channel.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum UdpEvent {
    /// A new visitor address: announce flow `id` to the agent.
    Opened {
        /// The service.
        service_id: Uuid,
        /// The flow.
        id: Uuid,
        /// The visitor.
        visitor: SocketAddr,
        /// Who to send the flow's replies to.
        listener: Addr<UdpServiceListener>,
    },
    /// A datagram from the visitor, as an encoded `Datagram` frame (its
    /// length is taken from the channel budget; give it back when written).
    Datagram {
        /// The service (whose budget the frame's length was taken from).
        service_id: Uuid,
        /// The flow.
        id: Uuid,
        /// The encoded frame.
        frame: Bytes,
    },
    /// The flow ended (idle): tell the agent.
    Closed {
        /// The flow.
        id: Uuid,
    },
}

/// A datagram from the agent for the visitor of flow `id`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct SendToVisitor {
    pub(crate) id: Uuid,
    pub(crate) data: Bytes,
}

/// The agent refused or closed flow `id`: forget it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct ForgetFlow(pub(crate) Uuid);

/// How a UDP listener is wired to its tunnel.
pub(crate) struct UdpWiring {
    pub(crate) service_id: Uuid,
    pub(crate) port: u16,
    pub(crate) limits: FlowLimits,
    pub(crate) channel: Recipient<UdpEvent>,
    /// Bytes of datagrams on their way between this listener and its control
    /// channel (both on one thread), against the server's `udp_in_flight`.
    /// Over it, datagrams are dropped: a control channel frozen by a slow
    /// agent WebSocket cannot make them pile up. Shared with the channel,
    /// which gives back what it wrote.
    pub(crate) budget: Budget,
    pub(crate) counters: Arc<Counters>,
    /// Where the flows' traffic is published for status pages.
    pub(crate) view: FlowView,
    pub(crate) cancel: CancellationToken,
}

/// The UDP listener actor.
pub(crate) struct UdpServiceListener {
    wiring: UdpWiring,
    socket: Rc<UdpSocket>,
    flows: FlowTable,
    /// Drops a visitor causes are logged at most once a second (each is
    /// counted by reason in the service's counters).
    logs: LogLimiter,
}

impl Actor for UdpServiceListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(port = self.wiring.port, "public UDP port listening");
        let cancel = self.wiring.cancel.clone();
        ctx.spawn(
            async move { cancel.cancelled_owned().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        );
        let sweep = (self.wiring.limits.idle_timeout / 4).max(Duration::from_millis(50));
        ctx.run_interval(sweep, |act, _| act.expire_idle());
        ctx.run_interval(Duration::from_millis(500), |act, _| act.publish());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for _ in self.flows.drain() {
            self.wiring.counters.connection_closed();
        }
        tracing::info!(port = self.wiring.port, "public UDP port closed");
    }
}

impl StreamHandler<io::Result<(Bytes, SocketAddr)>> for UdpServiceListener {
    fn handle(&mut self, item: io::Result<(Bytes, SocketAddr)>, ctx: &mut Self::Context) {
        match item {
            Ok((data, visitor)) => self.on_visitor_datagram(data, visitor, ctx),
            // ICMP errors from earlier sends surface here; the socket stays usable
            Err(e) => tracing::debug!(port = self.wiring.port, error = %e, "udp receive failed"),
        }
    }
}

impl Handler<SendToVisitor> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: SendToVisitor, _: &mut Self::Context) {
        let len = msg.data.len();
        self.wiring.budget.give(len);
        self.wiring.counters.touch(super::now_ms());
        let Some(visitor) = self.flows.on_reply(msg.id, len, Instant::now()) else {
            return self.wiring.counters.add_drop(DropKind::NoFlow);
        };
        match super::udp_flow::send_now(&self.socket, &msg.data, Some(visitor)) {
            Ok(_) => self
                .wiring
                .counters
                .add_datagram(Direction::Out, len as u64),
            Err(_) => self.wiring.counters.add_drop(DropKind::SocketFull),
        }
    }
}

impl Handler<ForgetFlow> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: ForgetFlow, _: &mut Self::Context) {
        if self.flows.remove(msg.0).is_some() {
            self.wiring.counters.connection_closed();
        }
    }
}

/// Stops listening (service unregistered).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopListener;

impl Handler<StopListener> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, _: StopListener, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl UdpServiceListener {
    /// Binds `host:port` for UDP, with a receive buffer for bursts.
    pub(crate) fn bind(host: &str, port: u16) -> io::Result<UdpSocket> {
        let addr = super::service_listener::ServiceListener::resolve(host, port)?;
        let domain = socket2::Domain::for_address(addr);
        let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
        socket.set_reuse_address(true)?;
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(4 << 20);
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        UdpSocket::from_std(socket.into())
    }

    /// Starts serving `socket` for the service.
    pub(crate) fn start(socket: UdpSocket, wiring: UdpWiring) -> Addr<Self> {
        let socket = Rc::new(socket);
        let max = wiring.limits.max_datagram;
        Self::create(|ctx| {
            ctx.add_stream(receive(socket.clone(), max));
            Self {
                flows: FlowTable::new(wiring.limits),
                wiring,
                socket,
                logs: LogLimiter::new(),
            }
        })
    }

    /// Counts a visitor's datagram dropped, by why, and logs it at most once
    /// a second (a visitor decides how often).
    fn dropped(&mut self, kind: DropKind, visitor: SocketAddr, reason: &str) {
        self.wiring.counters.add_drop(kind);
        if let Some(held_back) = self.logs.admit(RemoteEvent::VisitorRefused, Instant::now()) {
            tracing::info!(port = self.wiring.port, %visitor, reason, drop = kind.name(), held_back, "datagram dropped");
        }
    }

    fn on_visitor_datagram(&mut self, data: Bytes, visitor: SocketAddr, ctx: &mut Context<Self>) {
        let (id, opened) = match self.flows.on_visitor(
            visitor,
            data.len(),
            Instant::now(),
            Uuid::new_v4(),
        ) {
            Verdict::Forward { id, opened } => (id, opened),
            Verdict::ForwardReplacing { id, evicted } => {
                tracing::debug!(port = self.wiring.port, flow = %evicted, "udp flow evicted for a new visitor");
                self.wiring.counters.connection_closed();
                self.wiring
                    .channel
                    .do_send(UdpEvent::Closed { id: evicted });
                (id, true)
            }
            Verdict::Drop(reason) => {
                return self.dropped(reason.into(), visitor, &reason.to_string());
            }
        };
        if opened {
            tracing::debug!(port = self.wiring.port, %visitor, flow = %id, "udp flow opened");
            self.wiring.counters.connection_opened();
            self.wiring.channel.do_send(UdpEvent::Opened {
                service_id: self.wiring.service_id,
                id,
                visitor,
                listener: ctx.address(),
            });
        }
        let Some(frame) = Message::datagram_frame(id, &data) else {
            return self.wiring.counters.add_drop(DropKind::Oversized);
        };
        if !self.wiring.budget.take(frame.len()) {
            return self.dropped(DropKind::OverBudget, visitor, "the channel is behind");
        }
        self.wiring
            .counters
            .add_datagram(Direction::In, data.len() as u64);
        self.wiring.counters.touch(super::now_ms());
        let service_id = self.wiring.service_id;
        (self.wiring.channel).do_send(UdpEvent::Datagram {
            service_id,
            id,
            frame,
        });
    }

    /// Publishes each flow's traffic for status pages.
    fn publish(&self) {
        if let Ok(mut view) = self.wiring.view.lock() {
            *view = self.flows.traffic();
        }
    }

    fn expire_idle(&mut self) {
        for id in self.flows.expire(Instant::now()) {
            self.wiring.counters.connection_closed();
            self.wiring.channel.do_send(UdpEvent::Closed { id });
        }
    }
}

/// Datagrams from `socket`, each whole: a buffer one byte larger than `max`
/// tells an oversized datagram (the kernel truncates to the buffer) from one
/// of exactly `max` bytes, so it can be dropped, never forwarded truncated.
fn receive(
    socket: Rc<UdpSocket>,
    max: usize,
) -> impl Stream<Item = io::Result<(Bytes, SocketAddr)>> {
    let arena = BytesMut::new();
    futures::stream::unfold((socket, arena), move |(socket, mut arena)| async move {
        // one arena for many datagrams, split off without zeroing or copying
        arena.reserve((max + 1).max(256 * 1024));
        let item = socket.recv_buf_from(&mut arena).await;
        let item = item.map(|(n, from)| (arena.split_to(n).freeze(), from));
        Some((item, (socket, arena)))
    })
}
