//! The agent's own access streams: opened for an `AccessManager` with a
//! server (`OpenStream`). Those access clients open to this agent's services
//! arrive as the session's `Dial`s.

use super::*;

/// Opens an access stream for `socket` to `service` through the server
/// (`AccessManager` with a server).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct OpenStream {
    pub(crate) socket: tokio::net::TcpStream,
    pub(crate) service: String,
    pub(crate) target: String,
    /// A cluster's forwarded visitor: its address and the public address
    /// it reached (they go with the `Open`).
    pub(crate) visitor: Option<(String, String)>,
    /// The service's bandwidth limit on this side (a cluster's forwarded
    /// visitors are read no faster than the service allows).
    pub(crate) bandwidth: Option<crate::actors::forwarded_connection::SharedBandwidth>,
    pub(crate) counters: CounterSet,
    pub(crate) cancel: CancellationToken,
}

impl Handler<OpenStream> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: OpenStream, ctx: &mut Self::Context) {
        let Some(link) = self.link.as_mut() else {
            // the socket is dropped: the local client sees the connection close
            return tracing::warn!(service = %msg.service, "no access link to the server yet; connection closed");
        };
        let id = Uuid::new_v4();
        let opened = (link.session).open_access(id, &msg.service, &msg.target, msg.visitor);
        if let Err(error) = opened {
            return tracing::warn!(service = %msg.service, %error, "access stream not opened; connection closed");
        }
        link.streams.expect(id);
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: 0,
            counters: msg.counters,
            read_direction: Direction::In,
            cancel: Some(msg.cancel),
            gate: link.gate.clone(),
            tuned: false,
            second_chance: None,
            bandwidth: msg.bandwidth,
        };
        link.streams
            .attach(id, ForwardedConnection::start(msg.socket, wiring));
        tracing::debug!(stream = %id, service = %msg.service, "access stream opened");
        self.execute(ctx);
    }
}
