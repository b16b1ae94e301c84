//! `UdpServiceListener`: one per registered UDP service, on its public port.
//!
//! Owns the UDP socket, the service's [`FlowTable`] and its replicas (the
//! control channels of the agents that registered its name: `JoinUdpReplica`).
//! Each visitor address is a flow, given to one replica for its life (the one
//! with the fewest flows, or each in turn) and announced to that replica's
//! channel (`Opened`, which becomes a `Connect`); each datagram from it goes
//! up as an encoded `Datagram` frame. Replies come back as `SendToVisitor` and
//! leave with `try_send_to`: datagram semantics, no queue. Whatever is over a
//! limit (size, rate, flows, the channel's byte budget, a full socket) is
//! dropped and counted. Idle flows expire. A replica leaves with its tunnel or
//! on `LeaveUdpReplica`, and its flows are forgotten (a visitor's next
//! datagram opens a flow on another replica); the listener stops with the
//! last replica.

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
use crate::log_limit::LogGate;
use crate::protocol::Message;
use crate::replicas::{LoadBalance, ReplicaSet};
use crate::udp::{FlowLimits, FlowTable, Verdict};

mod refusals;
mod replicas;
mod socket;

pub(crate) use replicas::{JoinUdpReplica, LeaveUdpReplica, UdpReplica};

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
        /// The address it sent to (the listener's, if known).
        public: Option<SocketAddr>,
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

/// A datagram from the agent of tunnel `tunnel_id` for the visitor of flow
/// `id` (its length was taken from that tunnel's budget).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct SendToVisitor {
    pub(crate) tunnel_id: Uuid,
    pub(crate) id: Uuid,
    pub(crate) data: Bytes,
}

/// The agent refused or closed flow `id`: forget it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) struct ForgetFlow(pub(crate) Uuid);

/// What a UDP listener needs of the server.
pub(crate) struct UdpSettings {
    pub(crate) port: u16,
    pub(crate) limits: FlowLimits,
    pub(crate) policy: LoadBalance,
}

/// The UDP listener actor.
pub(crate) struct UdpServiceListener {
    settings: UdpSettings,
    socket: Rc<UdpSocket>,
    flows: FlowTable,
    /// The service's replicas, by tunnel id.
    replicas: ReplicaSet<Uuid, UdpReplica>,
    /// Which replica (tunnel) each flow is on.
    owners: std::collections::HashMap<Uuid, Uuid>,
    /// The logs of datagrams dropped and refused, each a line a second at
    /// most (every one is counted, by reason, on the service).
    drop_log: LogGate,
    refusal_log: LogGate,
    /// The address visitors send to (for PROXY protocol headers).
    public: Option<SocketAddr>,
    /// New flows per visitor address (the first replica's `visitor_rate`).
    rate: Option<crate::visitor_rate::VisitorRate>,
}

impl Actor for UdpServiceListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(port = self.settings.port, "public UDP port listening");
        let sweep = (self.settings.limits.idle_timeout / 4).max(Duration::from_millis(50));
        ctx.run_interval(sweep, |act, _| act.expire_idle());
        ctx.run_interval(Duration::from_millis(500), |act, _| act.publish());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for id in self.flows.drain() {
            if let Some(replica) = self.owner(id) {
                replica.counters.connection_closed();
            }
        }
        tracing::info!(port = self.settings.port, "public UDP port closed");
    }
}

impl StreamHandler<io::Result<(Bytes, SocketAddr)>> for UdpServiceListener {
    fn handle(&mut self, item: io::Result<(Bytes, SocketAddr)>, ctx: &mut Self::Context) {
        match item {
            Ok((data, visitor)) => self.on_visitor_datagram(data, visitor, ctx),
            // ICMP errors from earlier sends surface here; the socket stays usable
            Err(e) => tracing::debug!(port = self.settings.port, error = %e, "udp receive failed"),
        }
    }
}

impl Handler<SendToVisitor> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: SendToVisitor, _: &mut Self::Context) {
        let len = msg.data.len();
        let Some(replica) = self.replicas.get(&msg.tunnel_id) else {
            return; // the replica left: its budget and counters went with it
        };
        replica.budget.give(len);
        replica.counters.touch(super::now_ms());
        let Some(visitor) = self.flows.on_reply(msg.id, len, Instant::now()) else {
            return replica.counters.add_drop(DropKind::NoFlow);
        };
        match super::udp_flow::send_now(&self.socket, &msg.data, Some(visitor)) {
            Ok(_) => replica.counters.add_datagram(Direction::Out, len as u64),
            Err(_) => replica.counters.add_drop(DropKind::SocketFull),
        }
    }
}

impl Handler<ForgetFlow> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: ForgetFlow, _: &mut Self::Context) {
        self.forget(msg.0);
    }
}

impl UdpServiceListener {
    /// Starts serving `socket` for the service, whose first replica is `first`.
    pub(crate) fn start(
        socket: UdpSocket,
        settings: UdpSettings,
        first: JoinUdpReplica,
    ) -> Addr<Self> {
        let socket = Rc::new(socket);
        let public = socket.local_addr().ok();
        let max = settings.limits.max_datagram;
        Self::create(|ctx| {
            ctx.add_stream(receive(socket.clone(), max));
            let mut listener = Self {
                flows: FlowTable::new(settings.limits),
                settings,
                socket,
                replicas: ReplicaSet::default(),
                owners: std::collections::HashMap::new(),
                drop_log: LogGate::default(),
                refusal_log: LogGate::default(),
                public,
                rate: None,
            };
            listener.join(first, ctx);
            listener
        })
    }

    fn on_visitor_datagram(&mut self, data: Bytes, visitor: SocketAddr, ctx: &mut Context<Self>) {
        if let Some(why) = self.refusal(visitor) {
            // before the flow table: a refused address takes no flow's place
            return self.refused(why, visitor);
        }
        if self.rate.is_some() && self.flows.flow_of(visitor).is_none() {
            let admitted =
                (self.rate.as_mut()).is_none_or(|r| r.admit(visitor.ip(), Instant::now()));
            if !admitted {
                return self.refused(crate::visitor_rules::Refusal::RateLimited, visitor);
            }
        }
        let verdict = self
            .flows
            .on_visitor(visitor, data.len(), Instant::now(), Uuid::new_v4());
        let (id, opened) = match verdict {
            Verdict::Forward { id, opened } => (id, opened),
            Verdict::ForwardReplacing { id, evicted } => {
                tracing::debug!(port = self.settings.port, flow = %evicted, "udp flow evicted for a new visitor");
                self.ended(evicted);
                (id, true)
            }
            Verdict::Drop(reason) => {
                let flow = self.flows.flow_of(visitor);
                return self.dropped(reason.into(), flow, visitor, &reason.to_string());
            }
        };
        if opened && !self.assign(id, visitor, ctx) {
            self.flows.remove(id);
            return;
        }
        let Some(replica) = self.owner(id) else {
            return;
        };
        let Some(frame) = Message::datagram_frame(id, &data) else {
            return replica.counters.add_drop(DropKind::Oversized);
        };
        if !replica.budget.take(frame.len()) {
            return self.dropped(
                DropKind::OverBudget,
                Some(id),
                visitor,
                "the channel is behind",
            );
        }
        replica
            .counters
            .add_datagram(Direction::In, data.len() as u64);
        replica.counters.touch(super::now_ms());
        let service_id = replica.service_id;
        (replica.channel).do_send(UdpEvent::Datagram {
            service_id,
            id,
            frame,
        });
    }

    /// Gives new flow `id` to a replica and announces it there; false if
    /// there is none.
    fn assign(&mut self, id: Uuid, visitor: SocketAddr, ctx: &mut Context<Self>) -> bool {
        let flows = |r: &UdpReplica| r.counters.open_connections();
        let ip = visitor.ip();
        let healthy = |r: &UdpReplica| r.healthy && r.visitors.check(ip).is_ok();
        let Some(replica) = self.replicas.pick(self.settings.policy, healthy, flows) else {
            return false;
        };
        tracing::debug!(port = self.settings.port, %visitor, flow = %id, "udp flow opened");
        replica.counters.connection_opened();
        replica.channel.do_send(UdpEvent::Opened {
            service_id: replica.service_id,
            id,
            visitor,
            public: self.public,
            listener: ctx.address(),
        });
        let tunnel_id = replica.tunnel_id;
        self.owners.insert(id, tunnel_id);
        true
    }

    /// The replica flow `id` is on.
    fn owner(&self, id: Uuid) -> Option<&UdpReplica> {
        self.owners.get(&id).and_then(|t| self.replicas.get(t))
    }

    /// Flow `id` was forgotten by the table: its replica's channel is told.
    fn ended(&mut self, id: Uuid) {
        if let Some(replica) = self.owner(id) {
            replica.counters.connection_closed();
            replica.channel.do_send(UdpEvent::Closed { id });
        }
        self.owners.remove(&id);
    }

    /// The agent refused or closed flow `id`: forgotten, quietly.
    fn forget(&mut self, id: Uuid) {
        if self.flows.remove(id).is_some()
            && let Some(replica) = self.owner(id)
        {
            replica.counters.connection_closed();
        }
        self.owners.remove(&id);
    }

    /// Publishes each replica's flows' traffic for status pages.
    fn publish(&self) {
        for replica in self.replicas.iter() {
            let mine = |id: &Uuid| self.owners.get(id) == Some(&replica.tunnel_id);
            if let Ok(mut view) = replica.view.lock() {
                *view = self.flows.traffic_where(mine);
            }
        }
    }

    fn expire_idle(&mut self) {
        for id in self.flows.expire(Instant::now()) {
            self.ended(id);
        }
    }
}

/// Datagrams from `socket`, each whole: a buffer one byte larger than `max`
/// tells an oversized datagram (the kernel truncates to the buffer) from one
/// of exactly `max` bytes, so it can be dropped, never forwarded truncated.
pub(crate) fn receive(
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
