//! The agent's TCP streams: visitors' `Connect`s dialed to the local
//! service, their sockets' events, and the data-plane frames the session
//! passes, dispatched by the connection table.

use super::*;

impl Handler<StreamEvent> for AgentConnection {
    type Result = ();

    fn handle(&mut self, event: StreamEvent, ctx: &mut Self::Context) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let mut outbox = std::mem::take(&mut self.outbox);
        link.streams.on_event(event, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }
}

impl AgentConnection {
    /// A data-plane frame the session passed: an `Open` starts an access
    /// stream; the connection table says whose any other is and what to do.
    pub(super) fn route(&mut self, message: Message, ctx: &mut Context<Self>) {
        if let Message::Open {
            connection_id,
            service,
            target,
        } = message
        {
            return self.on_open(connection_id, &service, &target, ctx);
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Message::ConnectFail {
            connection_id,
            reason,
            ..
        } = &message
        {
            tracing::warn!(stream = %connection_id, %reason, "access stream refused");
        }
        let (mut outbox, mut rest) = (
            std::mem::take(&mut self.outbox),
            std::mem::take(&mut self.rest),
        );
        link.streams
            .on_frame(message, &mut |m| outbox.push(m), &mut rest);
        for action in rest.drain(..) {
            match action {
                ConnectionAction::Datagram { id, data } => {
                    let delivered = link.flows.deliver(id, data);
                    if !delivered {
                        self.shared.counters.add_drop(); // its socket is gone: a race
                    }
                }
                ConnectionAction::ForgetFlow { id } => link.flows.close(id),
                ConnectionAction::DatagramDropped => self.shared.counters.add_drop(),
                _ => {} // relays are the server's
            }
        }
        self.rest = rest;
        self.flush(outbox, ctx);
    }

    pub(super) fn on_connect(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        service: &ServiceConfig,
        client_addr: &str,
        ctx: &mut Context<Self>,
    ) {
        match self.accept_stream(service_id, id, client_addr) {
            Ok(()) => {
                let credit = self.link.as_ref().map_or(0, |l| l.server_window);
                let (local, name) = (service.local_addr(), service.name.clone());
                self.dial(id, local, name, credit, ctx)
            }
            Err(reason) => {
                tracing::info!(stream = %id, visitor = %client_addr, reason, "connection refused");
                if let Some(link) = self.link.as_mut() {
                    link.session.refuse(id, reason);
                }
            }
        }
    }

    fn accept_stream(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        client_addr: &str,
    ) -> Result<(), &'static str> {
        let link = self.link.as_mut().ok_or("no link")?;
        if !self.shared.admits(service_id, id, client_addr) {
            return Err("connection rejected by client");
        }
        link.streams
            .open(id)
            .map_err(|_| "agent is at its stream limit")
    }

    /// Dials `local` for stream `id`; `credit` is what the stream may send before a `Window`.
    pub(super) fn dial(
        &mut self,
        id: Uuid,
        local: String,
        service: String,
        credit: u32,
        ctx: &mut Context<Self>,
    ) {
        let timeout = self.shared.config.local_connect_timeout;
        let generation = self.link.as_ref().map_or(0, |l| l.generation);
        let unreachable = |local: &str, e| format!("local service {local} unreachable: {e}");
        let connecting = match local_dial::dial(&local) {
            Dialing::Done(result) => {
                let result = result.map_err(|e| unreachable(&local, e));
                return self.dialed(id, &service, (generation, credit), result, ctx);
            }
            Dialing::Later(connecting) => connecting,
        };
        let dial = async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(|e| unreachable(&local, e)),
                Err(_) => Err(format!("local service {local} did not answer in time")),
            }
        };
        ctx.spawn(dial.into_actor(self).map(move |result, act, ctx| {
            act.dialed(id, &service, (generation, credit), result, ctx)
        }));
    }

    fn dialed(
        &mut self,
        id: Uuid,
        service: &str,
        (generation, credit): (u64, u32),
        result: Result<tokio::net::TcpStream, String>,
        ctx: &mut Context<Self>,
    ) {
        let Some(link) = self.link.as_mut().filter(|l| l.generation == generation) else {
            return;
        };
        let socket = match result {
            Ok(socket) => socket,
            Err(reason) => {
                tracing::info!(stream = %id, %reason, "connection refused");
                link.streams.refuse(id);
                link.session.refuse(id, &reason);
                return self.execute(ctx);
            }
        };
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: credit,
            counters: CounterSet::new(
                std::iter::once(self.shared.counters.clone())
                    .chain(self.shared.view.counters(service))
                    .collect(),
            ),
            read_direction: Direction::Out,
            cancel: None,
            gate: link.gate.clone(),
            tuned: false,
        };
        if link
            .streams
            .attach(id, ForwardedConnection::start(socket, wiring))
        {
            link.queue.push_ack(id);
        }
    }
}
