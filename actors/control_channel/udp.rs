//! The control channel's UDP side: flows announced by its listeners, datagrams
//! both ways within each service's budget.

use super::*;

impl Handler<UdpEvent> for ControlChannel {
    type Result = ();

    fn handle(&mut self, event: UdpEvent, ctx: &mut Self::Context) {
        let Some(session) = self.link.as_mut() else {
            return;
        };
        match event {
            UdpEvent::Opened {
                service_id,
                id,
                visitor,
                public,
                listener,
            } => {
                let Some(budget) = session.udp_budget(service_id) else {
                    return;
                };
                let Some(service) = session.services.get(&service_id) else {
                    return;
                };
                let counters = service.counters.clone();
                let public = public.map(|a| a.to_string()).unwrap_or_default();
                let addresses = (visitor.to_string(), public);
                if let Err(reason) =
                    (self.core).open_flow(id, service_id, (&addresses.0, &addresses.1))
                {
                    return tracing::debug!(flow = %id, reason, "flow not opened");
                }
                let flow = Flow {
                    listener,
                    budget,
                    counters,
                };
                session.flows.insert(id, flow);
            }
            UdpEvent::Datagram {
                service_id,
                id,
                frame,
            } => {
                if let Some(budget) = session.udp_budget(service_id) {
                    budget.give(frame.len());
                }
                if self.core.is_flow(id) {
                    self.write(Outbound::Datagram { id, frame }, ctx);
                }
            }
            UdpEvent::Closed { id } => {
                session.flows.remove(&id);
                self.core.flow_ended(id);
            }
        }
        self.execute(ctx);
    }
}

impl Link {
    /// The datagram budget of UDP service `service_id`.
    pub(super) fn udp_budget(&self, service_id: Uuid) -> Option<Budget> {
        match self.services.get(&service_id).map(|s| &s.listener) {
            Some(Listener::Udp(_, budget)) => Some(budget.clone()),
            _ => None,
        }
    }

    /// A datagram from the agent for flow `id`: to its listener, if within budget.
    pub(super) fn relay_to_visitor(&mut self, id: Uuid, data: Bytes) {
        let Some(flow) = self.flows.get(&id) else {
            // a race after the flow ended
            return self.counters.add_drop(DropKind::NoFlow);
        };
        if flow.budget.take(data.len()) {
            let tunnel_id = self.tunnel_id;
            flow.listener.do_send(SendToVisitor {
                tunnel_id,
                id,
                data,
            });
        } else {
            flow.counters.add_drop(DropKind::OverBudget);
        }
    }

    /// Flow `id` is over (the table forgot it): its listener forgets it too.
    pub(super) fn forget_flow(&mut self, id: Uuid) {
        if let Some(flow) = self.flows.remove(&id) {
            flow.listener.do_send(ForgetFlow(id));
        }
    }
}
