//! The agent's streams: sockets dialed for visitors' and access clients'
//! streams, their events, and the session's socket actions (deliver, credit,
//! shut, reset; datagrams and flows of the UDP side).

use super::*;
use crate::log_limit::RemoteEvent;
use crate::session::SocketEvent;

impl Handler<StreamEvent> for AgentConnection {
    type Result = ();

    fn handle(&mut self, StreamEvent(event): StreamEvent, ctx: &mut Self::Context) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let SocketEvent::Finished { id } = &event {
            link.streams.finished(*id);
        }
        link.session.socket_event(event);
        self.execute(ctx);
    }
}

impl AgentConnection {
    /// A socket action of the session: to a stream's socket, or to a flow.
    pub(super) fn on_socket_action(&mut self, action: ConnectionAction) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        match link.streams.apply(action) {
            Some(ConnectionAction::Datagram { id, data }) => {
                let delivered = link.flows.deliver(id, data);
                if !delivered {
                    self.shared.counters.add_drop(DropKind::NoFlow); // its socket is gone: a race
                }
            }
            Some(ConnectionAction::ForgetFlow { id }) => link.flows.close(id),
            Some(ConnectionAction::DatagramDropped) => {
                self.shared.counters.add_drop(DropKind::NoFlow)
            }
            _ => {} // relays are the server's
        }
    }

    /// The session opened stream `id`: a visitor's (the host's callback may
    /// refuse it) or an access client's; its socket is dialed.
    pub(super) fn on_dial(
        &mut self,
        id: Uuid,
        address: String,
        service: String,
        opening: (u32, Option<Bytes>),
        visitor: Option<(Uuid, String)>,
        ctx: &mut Context<Self>,
    ) {
        if let Some((service_id, client_addr)) = &visitor
            && !self.shared.admits(*service_id, id, client_addr)
        {
            if let Some(held_back) = self.shared.remote_event(RemoteEvent::VisitorRefused) {
                tracing::info!(stream = %id, visitor = %client_addr, held_back, "connection rejected by client");
            }
            if let Some(link) = self.link.as_mut() {
                link.session.refuse(id, "connection rejected by client");
            }
            return;
        }
        if let Some(link) = self.link.as_mut() {
            link.streams.expect(id);
        }
        self.dial(id, address, service, opening, ctx);
    }

    /// Dials `local` for stream `id`; `credit` is what the stream may send
    /// before a `Window`, `proxy_header` what is written to the socket first.
    fn dial(
        &mut self,
        id: Uuid,
        local: String,
        service: String,
        (credit, proxy_header): (u32, Option<Bytes>),
        ctx: &mut Context<Self>,
    ) {
        let timeout = self.shared.config.local_connect_timeout;
        let generation = self.link.as_ref().map_or(0, |l| l.generation);
        let unreachable = |local: &str, e| format!("local service {local} unreachable: {e}");
        let connecting = match local_dial::dial(&local) {
            Dialing::Done(result) => {
                let result = result.map_err(|e| unreachable(&local, e));
                let result = result.and_then(|s| write_proxy_header(s, proxy_header.as_deref()));
                return self.dialed(id, &service, (generation, credit), result, ctx);
            }
            Dialing::Later(connecting) => connecting,
        };
        let dial = async move {
            let socket = match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(|e| unreachable(&local, e))?,
                Err(_) => return Err(format!("local service {local} did not answer in time")),
            };
            write_proxy_header(socket, proxy_header.as_deref())
        };
        ctx.spawn(dial.into_actor(self).map(move |result, act, ctx| {
            act.dialed(id, &service, (generation, credit), result, ctx);
            act.execute(ctx);
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
                // visitors decide how often this happens: a line a second
                if let Some(held_back) = self.shared.remote_event(RemoteEvent::VisitorRefused) {
                    let hint = "is the service running there? (its local_port, or --tcp NAME:LOCAL_PORT:PUBLIC_PORT)";
                    tracing::warn!(%service, stream = %id, %reason, hint, held_back, "a visitor was reset: the local service cannot be reached");
                }
                link.streams.forget(id);
                return link.session.refuse(id, &reason);
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
            second_chance: None,
            bandwidth: self.shared.view.bandwidth(service),
        };
        if link
            .streams
            .attach(id, ForwardedConnection::start(socket, wiring))
        {
            link.session.dialed(id);
        }
    }
}

/// Writes the PROXY protocol header, if any, to a just-connected socket:
/// its send buffer is empty, so the whole header (at most 107 bytes) goes
/// in one `send` or not at all (the service closed at once).
fn write_proxy_header(
    socket: tokio::net::TcpStream,
    header: Option<&[u8]>,
) -> Result<tokio::net::TcpStream, String> {
    let Some(header) = header else {
        return Ok(socket);
    };
    match socket2::SockRef::from(&socket).send(header) {
        Ok(n) if n == header.len() => Ok(socket),
        Ok(n) => Err(format!("the PROXY protocol header was cut at {n} bytes")),
        Err(e) => Err(format!("cannot write the PROXY protocol header: {e}")),
    }
}
