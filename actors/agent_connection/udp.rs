//! The agent's UDP flows: one `UdpFlow` per visitor address, replies queued
//! for the WebSocket within the link's bound.

use super::*;
use crate::actors::udp_forward::ToVisitor;
use crate::log_limit::RemoteEvent;

impl Handler<FlowEvent> for AgentConnection {
    type Result = ();

    fn handle(&mut self, event: FlowEvent, ctx: &mut Self::Context) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        match event {
            FlowEvent::Reply { id, frame } => {
                if link.flows.queue(frame) {
                    self.write_next(ctx);
                } else {
                    self.reply_dropped(id);
                }
            }
            FlowEvent::Forwarded { id, frame, budget } => {
                budget.give(frame.len());
                if !link.flows.contains(id) {
                    self.shared.counters.add_drop(DropKind::NoFlow); // refused, or not yet linked
                } else if link.flows.queue(frame) {
                    self.write_next(ctx);
                } else {
                    self.shared.counters.add_drop(DropKind::OverBudget);
                }
            }
            FlowEvent::Ended { id } => {
                link.flows.ended(id);
                link.session.flow_ended(id);
                self.execute(ctx);
            }
        }
    }
}

/// Opens a flow for a forwarded visitor at `visitor` to UDP service
/// `service` through the peer (a cluster's UDP forward); its datagrams come
/// back to `to`, which is told when the flow closes, or could not open.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct OpenFlow {
    pub(crate) id: Uuid,
    pub(crate) service: String,
    pub(crate) visitor: std::net::SocketAddr,
    /// The public address it sent to, if known.
    pub(crate) public: Option<std::net::SocketAddr>,
    pub(crate) to: Recipient<ToVisitor>,
}

impl Handler<OpenFlow> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: OpenFlow, ctx: &mut Self::Context) {
        let visitor = msg.visitor.to_string();
        let public = msg.public.map(|a| a.to_string()).unwrap_or_default();
        let opened = match self.link.as_mut() {
            Some(link) => link
                .session
                .open_access_flow(msg.id, &msg.service, (visitor, public)),
            None => Err("the peer link is not up yet".to_owned()),
        };
        if let Err(error) = opened {
            // the forward forgets the flow: the visitor's next datagram tries again
            msg.to.do_send(ToVisitor::Closed { id: msg.id });
            return tracing::debug!(service = %msg.service, %error, "forwarded flow not opened");
        }
        if let Some(link) = self.link.as_mut() {
            link.flows.insert(msg.id, FlowEnd::Visitor(msg.to));
        }
        self.execute(ctx);
    }
}

impl AgentConnection {
    /// A visitor address opened a flow of a UDP service: a socket toward the service for it.
    pub(super) fn open_flow(
        &mut self,
        (service_id, id): (Uuid, Uuid),
        service: &ServiceConfig,
        (client_addr, proxy_header): (&str, Option<Bytes>),
        ctx: &mut Context<Self>,
    ) {
        let started = self.start_flow((service_id, id), service, (client_addr, proxy_header), ctx);
        let Some(link) = self.link.as_mut() else {
            return;
        };
        match started {
            Ok(()) => link.session.flow_started(id),
            Err(reason) => {
                if let Some(held_back) = self.shared.remote_event(RemoteEvent::VisitorRefused) {
                    tracing::info!(flow = %id, visitor = %client_addr, %reason, held_back, "udp flow refused");
                }
                link.session.refuse(id, &reason);
            }
        }
    }

    /// A service's reply found `udp_waiting` full: counted on its service
    /// (and the agent), and logged at most once a second.
    fn reply_dropped(&mut self, id: Uuid) {
        let counters = self.link.as_ref().and_then(|l| l.flows.counters(id));
        match counters {
            Some(counters) => counters.add_drop(DropKind::OverBudget),
            None => self.shared.counters.add_drop(DropKind::OverBudget),
        }
        if let Some(held_back) = self.drop_log.admit(Instant::now()) {
            let limit = self.shared.config.udp_waiting;
            tracing::info!(flow = %id, udp_waiting = limit, held_back, "datagram to the server dropped: the WebSocket is behind (raise udp_waiting for longer bursts)");
        }
    }

    pub(super) fn start_flow(
        &mut self,
        (service_id, id): (Uuid, Uuid),
        service: &ServiceConfig,
        (client_addr, proxy_header): (&str, Option<Bytes>),
        ctx: &mut Context<Self>,
    ) -> Result<(), String> {
        let link = self.link.as_mut().ok_or("no link")?;
        if !self.shared.admits(service_id, id, client_addr) {
            return Err("connection rejected by client".to_owned());
        }
        let local = service.local_addr();
        let target = std::net::ToSocketAddrs::to_socket_addrs(&local)
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| format!("local service {local} has no address"))?;
        let wiring = FlowWiring {
            id,
            connection: ctx.address().recipient(),
            counters: CounterSet::new(
                std::iter::once(self.shared.counters.clone())
                    .chain(self.shared.view.counters(&service.name))
                    .collect(),
            ),
            idle_timeout: self.shared.config.udp_idle_timeout,
            cancel: link.cancel.child_token(),
            proxy_header,
        };
        let counters = wiring.counters.clone();
        let flow = UdpFlow::start(target, wiring)
            .map_err(|e| format!("cannot open a socket toward {local}: {e}"))?;
        link.flows.insert(id, FlowEnd::Service(flow, counters));
        tracing::debug!(flow = %id, visitor = %client_addr, %target, "udp flow opened");
        Ok(())
    }
}
