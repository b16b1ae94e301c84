//! The control channel's streams: visitors of its public ports opened as
//! streams, their sockets' events, and the session's socket actions
//! (deliver, credit, shut, reset; datagrams and flows of the UDP side).

use super::*;
use crate::actors::io::runtime;
use crate::session::SocketEvent;

impl Handler<VisitorArrived> for ControlChannel {
    type Result = ();

    fn handle(&mut self, msg: VisitorArrived, ctx: &mut Self::Context) {
        let opening = Opening {
            second_chance: msg.second_chance,
            sent: msg.sent,
        };
        let opened = match runtime::onto_this_thread(msg.socket) {
            Ok(socket) => {
                self.open_stream(msg.service_id, socket, &msg.peer.to_string(), opening, ctx)
            }
            Err(_) => Err("its socket could not be watched here"),
        };
        match opened {
            // the visitor's first bytes ride in the same write as `Connect`
            Ok(Some(first)) => <Self as Handler<StreamEvent>>::handle(self, first, ctx),
            Ok(None) => self.execute(ctx),
            Err(reason) => {
                // a visitor decides how often this happens: one line a second, counted
                if let Some(held_back) = self.shared.remote_event(RemoteEvent::VisitorRefused) {
                    (self.span).in_scope(|| tracing::info!(visitor = %msg.peer, reason, held_back, "visitor refused"));
                }
            }
        }
    }
}

impl Handler<StreamEvent> for ControlChannel {
    type Result = ();

    fn handle(&mut self, StreamEvent(event): StreamEvent, ctx: &mut Self::Context) {
        if let (SocketEvent::Finished { id }, Some(link)) = (&event, self.link.as_mut()) {
            link.streams.finished(*id);
        }
        self.core.socket_event(event);
        self.execute(ctx);
    }
}

/// How a visitor's stream opens: its second chance, and what it sent
/// before another replica refused it.
struct Opening {
    second_chance: Option<crate::actors::service_listener::SecondChance>,
    sent: Bytes,
}

impl ControlChannel {
    /// The agent refused a visitor: offered to another replica if it may
    /// be; one line a second, counted.
    pub(super) fn visitor_refused(&mut self, id: Uuid, reason: &str) {
        if let Some(tunnel) = self.link.as_mut() {
            tunnel.streams.refused(id);
        }
        if let Some(held_back) = self.shared.remote_event(RemoteEvent::AgentRefusedVisitor) {
            (self.span).in_scope(|| tracing::info!(connection = %id, %reason, held_back, "the agent refused a visitor"));
        }
    }

    /// Opens a stream for a visitor (the session sends `Connect`): its
    /// connection actor starts reading up to the agent's window. What the
    /// visitor had already sent, if anything (to send right after `Connect`).
    fn open_stream(
        &mut self,
        service_id: Uuid,
        socket: tokio::net::TcpStream,
        visitor: &str,
        opening: Opening,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<Option<StreamEvent>, &'static str> {
        let tunnel = self.link.as_mut().ok_or("session not authenticated")?;
        let service = tunnel
            .services
            .get(&service_id)
            .ok_or("service unregistered")?;
        let active = service.counters.snapshot().connections_active;
        let id = Uuid::new_v4();
        let public = match self.core.wants_public_addr() {
            true => socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            false => String::new(),
        };
        (self.core).open_stream(id, service_id, (visitor, &public), active)?;
        tunnel.streams.expect(id);
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: self.core.agent_window(),
            counters: CounterSet::new(vec![service.counters.clone(), tunnel.counters.clone()]),
            read_direction: Direction::In,
            cancel: Some(tunnel.cancel.child_token()),
            gate: tunnel.gate.clone(),
            tuned: ACCEPTED_SOCKETS_TUNED,
            second_chance: opening.second_chance,
            bandwidth: service.bandwidth.clone(),
        };
        let (addr, first) = ForwardedConnection::start_reading(socket, wiring, opening.sent);
        tunnel.streams.attach(id, addr);
        Ok(first)
    }

    /// A socket action of the session: to a stream's socket, or to the UDP side.
    pub(super) fn on_socket_action(&mut self, action: ConnectionAction) {
        let Some(tunnel) = self.link.as_mut() else {
            return;
        };
        match tunnel.streams.apply(action) {
            Some(ConnectionAction::ForgetFlow { id }) => tunnel.forget_flow(id),
            Some(ConnectionAction::Datagram { id, data }) => tunnel.relay_to_visitor(id, data),
            Some(ConnectionAction::DatagramDropped) => tunnel.counters.add_drop(DropKind::NoFlow),
            _ => {}
        }
    }
}
