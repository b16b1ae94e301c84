//! The agent's access streams: opened for an `AccessManager` with a server
//! (`OpenStream`), and accepted from access clients through the server (`Open`).

use super::*;

/// Opens an access stream for `socket` to `service` through the server
/// (`AccessManager` with a server).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct OpenStream {
    pub(crate) socket: tokio::net::TcpStream,
    pub(crate) service: String,
    pub(crate) target: String,
    pub(crate) counters: CounterSet,
    pub(crate) cancel: CancellationToken,
}

impl Handler<OpenStream> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: OpenStream, ctx: &mut Self::Context) {
        let ready = self
            .link
            .as_mut()
            .filter(|l| l.session.features().contains(Features::ACCESS));
        let Some(link) = ready else {
            // the socket is dropped: the local client sees the connection close
            return tracing::warn!(service = %msg.service, "no access link to the server yet; connection closed");
        };
        let id = Uuid::new_v4();
        let window = match link.streams.open_relayed(id) {
            Ok(window) => window,
            Err(e) => return tracing::warn!(error = %e, "access stream not opened"),
        };
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: 0,
            counters: msg.counters,
            read_direction: Direction::In,
            cancel: Some(msg.cancel),
            gate: link.gate.clone(),
            tuned: false,
        };
        link.streams
            .attach(id, ForwardedConnection::start(msg.socket, wiring));
        tracing::debug!(stream = %id, service = %msg.service, "access stream opened");
        self.write_built(Message::open(id, msg.service, msg.target), ctx);
        self.write(window, ctx);
    }
}

impl AgentConnection {
    /// An access client opened a stream to service `name` (relayed by the server).
    pub(super) fn on_open(&mut self, id: Uuid, name: &str, target: &str, ctx: &mut Context<Self>) {
        match self.accept_open(id, name, target) {
            Ok((dial, window)) => {
                self.write(window, ctx);
                self.dial(id, dial, name.to_owned(), 0, ctx);
            }
            Err(reason) => {
                tracing::info!(stream = %id, service = name, target, %reason, "access stream refused");
                if let Some(link) = self.link.as_mut() {
                    link.session.refuse(id, &reason);
                }
            }
        }
    }

    /// What to dial for an `Open`, and the `Window` granting our receive window.
    pub(super) fn accept_open(
        &mut self,
        id: Uuid,
        name: &str,
        target: &str,
    ) -> Result<(String, Message), String> {
        let allowed = &self.shared.config.access_targets;
        let link = self.link.as_mut().ok_or("no link")?;
        let service = link
            .session
            .service_named(name, ServiceProtocol::Tcp)
            .ok_or_else(|| format!("no TCP service named {name:?} on this agent"))?;
        // the target is dialed only if allowed; otherwise it is only shown
        // to the access client, and the service's own address is dialed
        let dial = if !target.is_empty() && allowed.iter().any(|a| a == target) {
            target.to_owned()
        } else {
            service.local_addr()
        };
        let window = link.streams.open_relayed(id).map_err(|e| e.to_string())?;
        Ok((dial, window))
    }
}
