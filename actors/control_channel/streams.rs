//! The control channel's TCP streams: visitors of its public ports opened as
//! streams, their sockets' events, and the data-plane frames the session
//! passes, dispatched by the connection table.

use super::*;

impl Handler<VisitorArrived> for ControlChannel {
    type Result = ();

    fn handle(&mut self, msg: VisitorArrived, ctx: &mut Self::Context) {
        match self.open_stream(msg.service_id, msg.socket, ctx) {
            Ok((id, first)) => {
                let connect = Message::connect(msg.service_id, id, msg.peer.to_string());
                self.write_built(connect, ctx);
                // the visitor's first bytes ride in the same write as `Connect`
                if let Some(first) = first {
                    <Self as Handler<StreamEvent>>::handle(self, first, ctx);
                }
            }
            Err(reason) => self
                .span
                .in_scope(|| tracing::info!(visitor = %msg.peer, reason, "visitor refused")),
        }
    }
}

impl Handler<StreamEvent> for ControlChannel {
    type Result = ();

    fn handle(&mut self, event: StreamEvent, ctx: &mut Self::Context) {
        let Some(tunnel) = self.tunnel.as_mut() else {
            return;
        };
        let mut outbox = std::mem::take(&mut self.outbox);
        tunnel.streams.on_event(event, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }
}

impl ControlChannel {
    /// A data-plane frame the session passed: the connection table says
    /// whose it is (a stream, a flow, a relay) and what to do.
    pub(super) fn route(
        &mut self,
        message: Message,
        frame: Bytes,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if let Message::Open {
            connection_id,
            service,
            target,
        } = message
        {
            return self.open_relay(connection_id, service, target, ctx);
        }
        let Some(tunnel) = self.tunnel.as_mut() else {
            return;
        };
        if let Message::ConnectFail {
            connection_id,
            reason,
            ..
        } = &message
            && tunnel.streams.table().kind(*connection_id) != Some(ConnectionKind::Relay)
        {
            self.span.in_scope(
                || tracing::info!(stream = %connection_id, %reason, "agent refused the visitor"),
            );
        }
        let (kind, close) = (message.message_type(), close_kind(&message));
        let (mut outbox, mut rest) = (
            std::mem::take(&mut self.outbox),
            std::mem::take(&mut self.rest),
        );
        tunnel
            .streams
            .on_frame(message, &mut |m| outbox.push(m), &mut rest);
        for action in rest.drain(..) {
            match action {
                ConnectionAction::ForgetFlow { id } => tunnel.forget_flow(id),
                ConnectionAction::Datagram { id, data } => tunnel.relay_to_visitor(id, data),
                ConnectionAction::DatagramDropped => tunnel.counters.add_drop(),
                ConnectionAction::Relay { id, last } => {
                    tunnel.relays.pass(id, kind, close, frame.clone(), last)
                }
                _ => {}
            }
        }
        self.rest = rest;
        self.flush(outbox, ctx);
    }

    /// Opens a stream for a visitor: its connection actor starts reading up
    /// to the agent's window. The stream's id, and what the visitor had
    /// already sent, if anything (to send right after `Connect`).
    fn open_stream(
        &mut self,
        service_id: Uuid,
        socket: tokio::net::TcpStream,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<(Uuid, Option<StreamEvent>), &'static str> {
        let max = self.shared.config.max_connections_per_service as u64;
        let tunnel = self.tunnel.as_mut().ok_or("session not authenticated")?;
        if !tunnel.features.contains(Features::STREAMS) {
            return Err("legacy agent: no data plane");
        }
        let service = tunnel
            .services
            .get(&service_id)
            .ok_or("service unregistered")?;
        if service.counters.snapshot().connections_active >= max {
            return Err("service is at its connection limit");
        }
        let id = Uuid::new_v4();
        tunnel
            .streams
            .open(id)
            .map_err(|_| "tunnel is at its stream limit")?;
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: tunnel.agent_window,
            counters: CounterSet::new(vec![service.counters.clone(), tunnel.counters.clone()]),
            read_direction: Direction::In,
            cancel: Some(tunnel.cancel.child_token()),
            gate: tunnel.gate.clone(),
            tuned: ACCEPTED_SOCKETS_TUNED,
        };
        let (addr, first) = ForwardedConnection::start_reading(socket, wiring);
        tunnel.streams.attach(id, addr);
        Ok((id, first))
    }
}

/// The kind of a `Close` (it decides when a relayed stream is over).
fn close_kind(message: &Message) -> Option<CloseKind> {
    match message {
        Message::Close { kind, .. } => Some(*kind),
        _ => None,
    }
}
