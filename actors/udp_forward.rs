//! `UdpForward`: one per UDP service a server of a cluster forwards to its
//! peers (registered on a peer, not here), on the service's public port.
//!
//! Each visitor address is a flow (the same [`FlowTable`] limits as a
//! service's own port: size, rate, flows, idle), given for its life to one
//! peer link (`OpenFlow`, an `Open` of a UDP flow through the peer; the peer
//! relays it to the agent of the service as a visitor's flow). The visitor's
//! datagrams go up that link as encoded `Datagram` frames within a budget of
//! bytes in flight; the replies come back as `ToVisitor` and leave with
//! `try_send_to`. Whatever is over a limit is dropped and counted. A flow
//! whose link ended is forgotten (the visitor's next datagram opens another).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::agent_connection::{AgentConnection, OpenFlow};
use super::udp_flow::FlowEvent;
use crate::accounting::{CounterSet, Counters, Direction, DropKind};
use crate::budget::Budget;
use crate::log_limit::{LogLimiter, RemoteEvent};
use crate::protocol::Message;
use crate::udp::{FlowLimits, FlowTable, Verdict};
use crate::visitor_rules::Refusal;

/// Bytes of visitors' datagrams that may be on their way to the peer links.
const IN_FLIGHT: usize = 1 << 20;

/// What a peer link says of a forwarded flow.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum ToVisitor {
    /// A datagram for the visitor of flow `id`.
    Datagram { id: Uuid, data: Bytes },
    /// Flow `id` is over (refused, closed by the peer, or its link ended).
    Closed { id: Uuid },
}

/// A peer link for a new flow: its connection, the counters its flows
/// count in, and the service's name there.
pub(crate) type PeerChoice = (Addr<AgentConnection>, Arc<Counters>, String);

/// The peers a forward sends its visitors to.
pub(crate) trait Peers {
    /// Whether some peer's address lists admit a visitor from `ip`.
    fn check(&self, ip: IpAddr) -> Result<(), Refusal>;
    /// Whether a new flow from `ip` is within the service's visitor rate.
    fn admit_flow(&self, ip: IpAddr) -> bool;

    /// A peer link for a new flow from `ip` (among those that admit it).
    fn pick(&self, ip: IpAddr) -> Option<PeerChoice>;
}

/// A forwarded flow: its link and the counters it counts in.
struct Forwarded {
    link: Addr<AgentConnection>,
    counters: CounterSet,
}

/// The forward actor.
pub(crate) struct UdpForward {
    port: u16,
    socket: Rc<UdpSocket>,
    flows: FlowTable,
    forwarded: HashMap<Uuid, Forwarded>,
    peers: Box<dyn Peers>,
    /// The forward's own traffic (for `/status`).
    counters: Arc<Counters>,
    budget: Budget,
    logs: LogLimiter,
    idle: Duration,
    /// The address visitors send to (for the agent's PROXY header).
    public: Option<SocketAddr>,
    /// Fires when the forward closes (the service registered here, or no
    /// peer routes it any more).
    close: CancellationToken,
}

impl Actor for UdpForward {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let close = self.close.clone();
        ctx.spawn(
            async move { close.cancelled_owned().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        );
        let sweep = (self.idle / 4).max(Duration::from_millis(50));
        ctx.run_interval(sweep, |act, _| act.expire_idle());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for id in self.flows.drain() {
            self.ended(id);
        }
    }
}

impl StreamHandler<io::Result<(Bytes, SocketAddr)>> for UdpForward {
    fn handle(&mut self, item: io::Result<(Bytes, SocketAddr)>, ctx: &mut Self::Context) {
        if let Ok((data, visitor)) = item {
            self.on_visitor_datagram(data, visitor, ctx);
        }
    }
}

impl Handler<ToVisitor> for UdpForward {
    type Result = ();

    fn handle(&mut self, msg: ToVisitor, _: &mut Self::Context) {
        match msg {
            ToVisitor::Datagram { id, data } => {
                let Some(visitor) = self.flows.on_reply(id, data.len(), Instant::now()) else {
                    return self.counters.add_drop(DropKind::NoFlow);
                };
                let Some(flow) = self.forwarded.get(&id) else {
                    return;
                };
                match super::udp_flow::send_now(&self.socket, &data, Some(visitor)) {
                    Ok(_) => flow
                        .counters
                        .add_datagram(Direction::Out, data.len() as u64),
                    Err(_) => flow.counters.add_drop(DropKind::SocketFull),
                }
            }
            ToVisitor::Closed { id } => {
                self.flows.remove(id);
                if let Some(flow) = self.forwarded.remove(&id) {
                    flow.counters.connection_closed();
                }
            }
        }
    }
}

impl UdpForward {
    /// Serves `socket` (the service's public port) until `close` fires.
    pub(crate) fn start(
        socket: UdpSocket,
        limits: FlowLimits,
        peers: Box<dyn Peers>,
        counters: Arc<Counters>,
        close: CancellationToken,
    ) -> Addr<Self> {
        let socket = Rc::new(socket);
        let public = socket.local_addr().ok();
        let port = public.map_or(0, |a| a.port());
        Self::create(|ctx| {
            ctx.add_stream(super::udp_listener::receive(
                socket.clone(),
                limits.max_datagram,
            ));
            tracing::info!(port, "public UDP port forwarded to the cluster's peers");
            Self {
                port,
                socket,
                flows: FlowTable::new(limits),
                forwarded: HashMap::new(),
                peers,
                counters,
                budget: Budget::new(IN_FLIGHT),
                logs: LogLimiter::new(),
                idle: limits.idle_timeout,
                public,
                close,
            }
        })
    }

    fn on_visitor_datagram(&mut self, data: Bytes, visitor: SocketAddr, ctx: &mut Context<Self>) {
        if let Err(why) = self.peers.check(visitor.ip()) {
            // before the flow table: a refused address takes no flow's place
            self.counters.add_refused(why);
            let reason = "refused by the service's address lists";
            return self.dropped(None, visitor, reason);
        }
        if self.flows.flow_of(visitor).is_none() && !self.peers.admit_flow(visitor.ip()) {
            self.counters.add_refused(Refusal::RateLimited);
            let reason = "a new flow over the service's visitor rate";
            return self.dropped(None, visitor, reason);
        }
        let now = Instant::now();
        let (id, opened) = match self
            .flows
            .on_visitor(visitor, data.len(), now, Uuid::new_v4())
        {
            Verdict::Forward { id, opened } => (id, opened),
            Verdict::ForwardReplacing { id, evicted } => {
                self.ended(evicted);
                (id, true)
            }
            Verdict::Drop(reason) => {
                return self.dropped(Some(reason.into()), visitor, &reason.to_string());
            }
        };
        let link_gone = (self.forwarded.get(&id)).is_some_and(|f| !f.link.connected());
        if link_gone {
            // its peer link ended: the visitor's flow starts again on another
            self.flows.remove(id);
            self.ended(id);
            return self.on_visitor_datagram(data, visitor, ctx);
        }
        if opened && !self.assign(id, visitor, ctx) {
            self.flows.remove(id);
            return self.dropped(
                Some(DropKind::NoFlow),
                visitor,
                "no peer link for the service",
            );
        }
        let Some(flow) = self.forwarded.get(&id) else {
            return;
        };
        let Some(frame) = Message::datagram_frame(id, &data) else {
            return flow.counters.add_drop(DropKind::Oversized);
        };
        if !self.budget.take(frame.len()) {
            return self.dropped(
                Some(DropKind::OverBudget),
                visitor,
                "the peer link is behind",
            );
        }
        flow.counters.add_datagram(Direction::In, data.len() as u64);
        flow.link.do_send(FlowEvent::Forwarded {
            id,
            frame,
            budget: self.budget.clone(),
        });
    }

    /// Gives new flow `id` to a peer link and opens it there; false if
    /// there is none.
    fn assign(&mut self, id: Uuid, visitor: SocketAddr, ctx: &mut Context<Self>) -> bool {
        let Some((link, peer, service)) = self.peers.pick(visitor.ip()) else {
            return false;
        };
        let counters = CounterSet::new(vec![self.counters.clone(), peer]);
        counters.connection_opened();
        link.do_send(OpenFlow {
            id,
            service,
            visitor,
            public: self.public,
            to: ctx.address().recipient(),
        });
        self.forwarded.insert(id, Forwarded { link, counters });
        tracing::debug!(port = self.port, %visitor, flow = %id, "udp flow forwarded");
        true
    }

    /// Flow `id` was forgotten here: its peer link is told.
    fn ended(&mut self, id: Uuid) {
        if let Some(flow) = self.forwarded.remove(&id) {
            flow.counters.connection_closed();
            flow.link.do_send(FlowEvent::Ended { id });
        }
    }

    fn expire_idle(&mut self) {
        for id in self.flows.expire(Instant::now()) {
            self.ended(id);
        }
    }

    /// Counts a visitor's datagram dropped, and logs it at most once a
    /// second (a visitor decides how often).
    fn dropped(&mut self, kind: Option<DropKind>, visitor: SocketAddr, reason: &str) {
        if let Some(kind) = kind {
            self.counters.add_drop(kind);
        }
        let drop = kind.map_or("refused", DropKind::name);
        if let Some(held_back) = self.logs.admit(RemoteEvent::VisitorRefused, Instant::now()) {
            tracing::info!(port = self.port, %visitor, reason, drop, held_back, "forwarded datagram dropped");
        }
    }
}
