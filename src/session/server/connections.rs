//! The server session's data plane: visitors opened as streams or flows,
//! their sockets' events, relayed access streams, and the agent's data-plane
//! frames, all through the tunnel's one connection table.

use super::*;
use crate::connections::ConnectionKind;
use crate::session::SocketEvent;

impl ServerSession {
    /// A visitor reached the public port of TCP service `service_id`, which
    /// has `active` connections open: stream `id` opens and `Connect` goes
    /// out; or the reason it cannot (the visitor is closed).
    pub fn open_stream(
        &mut self,
        id: Uuid,
        service_id: Uuid,
        (client_addr, public_addr): (&str, &str),
        active: u64,
    ) -> Result<(), &'static str> {
        let open = self.open().ok_or("session not authenticated")?;
        if !open.features.contains(Features::STREAMS) {
            return Err("legacy agent: no data plane");
        }
        if !open.services.contains_key(&service_id) {
            return Err("service unregistered");
        }
        if active >= self.settings.max_connections_per_service as u64 {
            return Err("service is at its connection limit");
        }
        // what the tunnel's other services are guaranteed is not this one's
        let others = open.services.len().saturating_sub(1);
        let reserved = others.saturating_mul(self.settings.stream_reserve_per_service);
        let share = self
            .settings
            .streams
            .max_streams
            .saturating_sub(reserved)
            .max(1);
        if active >= share as u64 {
            return Err("service is at its share of the tunnel's streams");
        }
        let table = self.data.table().ok_or("session not authenticated")?;
        table
            .open(id)
            .map_err(|_| "tunnel is at its stream limit")?;
        self.send_connect(service_id, id, client_addr, public_addr);
        Ok(())
    }

    /// A new visitor address on UDP service `service_id`: flow `id` opens
    /// and `Connect` goes out.
    pub fn open_flow(
        &mut self,
        id: Uuid,
        service_id: Uuid,
        (visitor, public_addr): (&str, &str),
    ) -> Result<(), &'static str> {
        let open = self.open().ok_or("session not authenticated")?;
        if !open.features.contains(Features::DATAGRAMS) || !open.services.contains_key(&service_id)
        {
            return Err("no such UDP service on this tunnel");
        }
        let table = self.data.table().ok_or("session not authenticated")?;
        table.open_flow(id).map_err(|_| "flow id in use")?;
        self.send_connect(service_id, id, visitor, public_addr);
        Ok(())
    }

    /// True when the agent wants the public address each visitor reached
    /// (`PROXY`: it writes PROXY protocol headers).
    pub fn wants_public_addr(&self) -> bool {
        self.features().contains(Features::PROXY)
    }

    /// `Connect`, with the public address only to an agent that asked.
    fn send_connect(&mut self, service_id: Uuid, id: Uuid, visitor: &str, public_addr: &str) {
        let public_addr = if self.wants_public_addr() {
            public_addr
        } else {
            ""
        };
        self.send_built(Message::connect_to(service_id, id, visitor, public_addr));
    }

    /// A visitor's socket reported.
    pub fn socket_event(&mut self, event: SocketEvent) {
        let emitted = self.data.socket_event(event);
        self.emit_all(emitted);
    }

    /// A flow idled out at its listener: the agent is told.
    pub fn flow_ended(&mut self, id: Uuid) {
        let emitted = self.data.flow_ended(id);
        self.emit_all(emitted);
    }

    /// True when `id` is an open flow (its datagrams may go to the agent).
    pub fn is_flow(&self, id: Uuid) -> bool {
        self.data.get().and_then(|t| t.kind(id)) == Some(ConnectionKind::Flow)
    }

    /// The agent of the service an access client asked for was found: its
    /// frames pass from now on.
    pub fn relay_found(&mut self, id: Uuid) -> bool {
        let opened = self.data.table().is_some_and(|t| t.open_relay(id).is_ok());
        if !opened {
            self.send_built(Message::connect_fail(id, "stream id already in use"));
        }
        opened
    }

    /// The service a probe asked about exists and its agent takes access
    /// streams: `ConnectAck`, and nothing relayed.
    pub fn probe_found(&mut self, id: Uuid) {
        self.send(Message::ConnectAck { connection_id: id });
    }

    /// No agent registered the service an access client asked for.
    pub fn relay_not_found(&mut self, id: Uuid, reason: &str) {
        self.send_built(Message::connect_fail(id, reason));
    }

    /// Another channel's access client opens stream `id` to this agent's
    /// `service`: relayed if the agent takes access streams. A UDP flow
    /// (a peer's forwarded visitor) reaches the agent as any visitor's flow
    /// does, a `Connect` with the visitor's address (`target`).
    pub fn relay_to_agent(
        &mut self,
        id: Uuid,
        (service, target): (&str, &str),
        protocol: ServiceProtocol,
        visitor: (String, String),
    ) -> Result<(), &'static str> {
        let forwarded = !visitor.0.is_empty();
        let opening = match protocol {
            ServiceProtocol::Tcp if !self.features().contains(Features::ACCESS) => {
                return Err("the agent of this service does not take access streams");
            }
            ServiceProtocol::Tcp if forwarded => {
                Message::open_forwarded(id, service, protocol, visitor)
            }
            ServiceProtocol::Tcp => Message::open(id, service, target),
            ServiceProtocol::Udp => {
                let service_id = (self.open().map(|o| o.services.iter()))
                    .and_then(|mut s| s.find(|(_, s)| s.name == service).map(|(id, _)| *id))
                    .ok_or("no such service on this agent")?;
                let public = if self.wants_public_addr() {
                    visitor.1.as_str()
                } else {
                    ""
                };
                Message::connect_to(service_id, id, target, public)
            }
        };
        let table = self.data.table().ok_or("session not authenticated")?;
        table
            .open_relay(id)
            .map_err(|_| "stream id already in use")?;
        self.send_built(opening);
        Ok(())
    }

    /// A frame of relayed stream `id` from the other end's channel: written
    /// to our agent if the relay is ours; whether the relay is over with it
    /// (`None`: not ours, not sent).
    pub fn relay_from_other(
        &mut self,
        id: Uuid,
        kind: MessageType,
        close: Option<CloseKind>,
        frame: Bytes,
    ) -> Option<bool> {
        let last = self.data.table()?.relay_from_other(id, kind, close)?;
        self.write(Outbound::Relayed { id, kind, frame });
        Some(last)
    }

    /// The other end's channel of relayed stream `id` ended: our agent's
    /// side is aborted.
    pub fn relay_gone(&mut self, id: Uuid) {
        if self.data.table().and_then(|t| t.forget(id)).is_some() {
            self.send(Message::Close {
                connection_id: id,
                kind: CloseKind::Abort,
            });
        }
    }

    /// The tunnel's connections, forgotten for the owner to close (the session ended).
    pub fn close_connections(&mut self) -> Vec<(Uuid, ConnectionKind)> {
        self.data.drain()
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.data
            .get()
            .map_or(0, crate::connections::ConnectionTable::len)
    }

    /// An access client's `Open`, checked against its token's scope (a UDP
    /// flow only from a client that announced `ACCESS_UDP`, a probe only
    /// from one that announced `ACCESS_PROBE`).
    pub(super) fn on_open(
        &mut self,
        id: Uuid,
        service: String,
        (target, visitor): (String, (String, String)),
        (protocol, probe): (ServiceProtocol, bool),
    ) {
        let refusal = self.scope().and_then(|s| s.check_access(&service).err());
        if let Some(e) = refusal {
            return self.send_built(Message::connect_fail(id, e.to_string()));
        }
        if probe && !self.features().contains(Features::ACCESS_PROBE) {
            return self.send_built(Message::connect_fail(id, "a probe needs ACCESS_PROBE"));
        }
        if protocol == ServiceProtocol::Udp && !self.features().contains(Features::ACCESS_UDP) {
            return self.send_built(Message::connect_fail(
                id,
                "UDP flows by Open need ACCESS_UDP",
            ));
        }
        // a visitor's address is trusted from a peer server only
        let peer = self.scope().is_some_and(|s| s.peer);
        let visitor = if peer { visitor } else { Default::default() };
        (self.actions).push_back(ServerAction::FindService {
            id,
            service,
            target,
            protocol,
            visitor,
            probe,
        });
    }

    /// A stream frame, datagram, `ConnectAck` or `ConnectFail`: whatever its
    /// connection, the table decides. A relayed stream's frame is passed on
    /// as it came (`frame`, when the caller has the encoded bytes).
    pub(super) fn on_data_plane(&mut self, message: Message, frame: Option<Bytes>) {
        // what a relay pass needs, without a lookup: the table says whether
        // the frame is a relay's (the caller has the encoded bytes; a decoded
        // message handed in alone is encoded again)
        let kind = message.message_type();
        let close = match &message {
            Message::Close { kind, .. } => Some(*kind),
            _ => None,
        };
        let frame = frame.unwrap_or_else(|| message.to_bytes());
        if let Message::ConnectFail {
            connection_id,
            reason,
        } = &message
        {
            self.note_refusal(*connection_id, reason);
        }
        let mut emitted = Vec::new();
        self.data.on_frame(message, &mut |e| emitted.push(e));
        for e in emitted {
            match e {
                Emit::Socket(ConnectionAction::Relay { id, last }) => {
                    let frame = frame.clone();
                    (self.actions).push_back(ServerAction::Relay {
                        id,
                        kind,
                        close,
                        frame,
                        last,
                    });
                }
                e => self.emit(e),
            }
        }
    }

    /// A `ConnectFail` for a visitor's stream or flow (not for a relayed
    /// access stream, whose client hears of it): reported.
    fn note_refusal(&mut self, id: Uuid, reason: &str) {
        let kind = self.data.get().and_then(|t| t.kind(id));
        if matches!(kind, Some(ConnectionKind::Stream | ConnectionKind::Flow)) {
            (self.actions).push_back(ServerAction::VisitorRefused {
                id,
                reason: reason.to_owned(),
            });
        }
    }

    fn emit_all(&mut self, emitted: Vec<Emit>) {
        emitted.into_iter().for_each(|e| self.emit(e));
    }

    fn emit(&mut self, e: Emit) {
        match e {
            Emit::Send(message) => self.send(message),
            Emit::Write(frame) => self.write(frame),
            Emit::Socket(action) => self.actions.push_back(ServerAction::Socket(action)),
        }
    }

    /// Queues a frame a reader encoded (gated like every frame).
    fn write(&mut self, frame: Outbound) {
        match frame.check(self.features()) {
            Ok(()) => self.actions.push_back(ServerAction::Write(frame)),
            Err(refused) => {
                self.unsent += 1;
                tracing::error!(%refused, "not sent");
            }
        }
    }
}
