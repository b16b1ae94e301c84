//! The agent's own access streams: opened for an `AccessManager` with a
//! server (`OpenStream`). Those access clients open to this agent's services
//! arrive as the session's `Dial`s.

use super::*;
use crate::actors::io::runtime;

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
        if let Err((service, why)) = self.open_access_stream(msg, ctx) {
            // a cluster's forwarded visitors decide how often: one line a second
            if let Some(held_back) = self.access_log.admit(Instant::now()) {
                tracing::warn!(%service, %why, held_back, "access stream not opened; connection closed");
            }
        }
    }
}

impl AgentConnection {
    /// Opens `msg`'s stream; the service and why not if it cannot (the
    /// socket is dropped: the local client sees the connection close).
    fn open_access_stream(
        &mut self,
        msg: OpenStream,
        ctx: &mut Context<Self>,
    ) -> Result<(), (String, String)> {
        let Some(link) = self.link.as_mut() else {
            return Err((msg.service, "no access link to the server yet".to_owned()));
        };
        // accepted on the access session's (or a cluster forward's) thread
        let socket = match runtime::onto_this_thread(msg.socket) {
            Ok(socket) => socket,
            Err(error) => return Err((msg.service, format!("its connection is gone: {error}"))),
        };
        let id = Uuid::new_v4();
        if let Err(why) = (link.session).open_access(id, &msg.service, &msg.target, msg.visitor) {
            return Err((msg.service, why));
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
            .attach(id, ForwardedConnection::start(socket, wiring));
        tracing::debug!(stream = %id, service = %msg.service, "access stream opened");
        self.execute(ctx);
        Ok(())
    }
}

/// Asks the server whether a TCP service exists and this client may open
/// streams to it: `Ok` if so, or if the server cannot be asked (an older
/// one); why not otherwise.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub(crate) struct ProbeService(pub(crate) String);

impl Handler<ProbeService> for AgentConnection {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(
        &mut self,
        ProbeService(service): ProbeService,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        let Some(link) = self.link.as_mut() else {
            return Box::pin(async { Err("no access link to the server yet".to_owned()) });
        };
        let id = Uuid::new_v4();
        let asked = link.session.probe(id, &service);
        let answer = match asked {
            Ok(true) => {
                let (answered, answer) = tokio::sync::oneshot::channel();
                link.probes.insert(id, answered);
                answer
            }
            Ok(false) => return Box::pin(async { Ok(()) }),
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        self.execute(ctx);
        Box::pin(async move {
            let ended = "the link to the server ended before it answered".to_owned();
            answer.await.unwrap_or(Err(ended))
        })
    }
}

impl AgentConnection {
    /// The server answered probe `id`.
    pub(super) fn probe_answered(&mut self, id: Uuid, answer: Result<(), String>) {
        let waiting = self.link.as_mut().and_then(|l| l.probes.remove(&id));
        if let Some(waiting) = waiting {
            let _ = waiting.send(answer);
        }
    }
}
