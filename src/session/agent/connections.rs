//! The agent session's data plane: visitors' `Connect`s and access
//! clients' `Open`s turned into streams and flows, their sockets' events,
//! the streams this agent opens for its own access clients, and the
//! server's data-plane frames, all through the link's one connection table.

use super::*;
use crate::connections::{ConnectionKind, StreamError};
use crate::session::SocketEvent;

impl AgentSession {
    /// The dial of stream `id` succeeded: `ConnectAck` (our writer sends it
    /// with its next frame).
    pub fn dialed(&mut self, id: Uuid) {
        if self.data.get().is_some_and(|t| t.contains(id)) {
            self.send(Message::ConnectAck { connection_id: id });
        }
    }

    /// The socket of flow `id` is open toward its service.
    pub fn flow_started(&mut self, id: Uuid) {
        if self.data.get().and_then(|t| t.kind(id)) == Some(ConnectionKind::Flow) {
            self.send(Message::ConnectAck { connection_id: id });
        }
    }

    /// Refuses stream or flow `id` (a failed dial, a host's callback, no
    /// socket): forgotten, and `ConnectFail` tells the server why.
    pub fn refuse(&mut self, id: Uuid, reason: &str) {
        if let Some(table) = self.data.table() {
            table.forget(id);
        }
        self.send_built(Message::connect_fail(id, reason));
    }

    /// One of this agent's access clients opens stream `id` to `service`
    /// through the server (`Open`, then our receive window).
    pub fn open_access(
        &mut self,
        id: Uuid,
        service: &str,
        target: &str,
        visitor: Option<(String, String)>,
    ) -> Result<(), String> {
        if !self.features().contains(Features::ACCESS) {
            return Err("no access link to the server yet".to_owned());
        }
        let table = self
            .data
            .table()
            .ok_or("no access link to the server yet")?;
        let window = table.open_relayed(id).map_err(|e| e.to_string())?;
        let open = match visitor {
            // a cluster's forwarded visitor (a peer link): its addresses go along
            Some(visitor) => Message::open_forwarded(id, service, ServiceProtocol::Tcp, visitor),
            None => Message::open(id, service, target),
        };
        self.send_built(open);
        self.send(window);
        Ok(())
    }

    /// Asks the server whether TCP service `service` exists and this client
    /// may open streams to it (`ACCESS_PROBE`); the answer comes as
    /// [`AgentAction::ProbeAnswered`] with `id`. `Ok(false)`: this server
    /// cannot be asked (it did not announce `ACCESS_PROBE`).
    pub fn probe(&mut self, id: Uuid, service: &str) -> Result<bool, String> {
        let Phase::Open(open) = &mut self.phase else {
            return Err("no access link to the server yet".to_owned());
        };
        if !open.features.contains(Features::ACCESS_PROBE) {
            return Ok(false);
        }
        if open.probes.len() >= MAX_PROBES {
            return Err(format!("{MAX_PROBES} probes already await their answers"));
        }
        let probe = Message::probe(id, service).map_err(|e| e.to_string())?;
        open.probes.insert(id);
        self.send(probe);
        Ok(true)
    }

    /// The answer to a probe of this session, if `message` is one.
    fn probe_answer(&mut self, message: &Message) -> Option<(Uuid, Result<(), String>)> {
        let Phase::Open(open) = &mut self.phase else {
            return None;
        };
        let answer = match message {
            Message::ConnectAck { connection_id } => (*connection_id, Ok(())),
            Message::ConnectFail {
                connection_id,
                reason,
                ..
            } => (*connection_id, Err(reason.clone())),
            _ => return None,
        };
        open.probes.remove(&answer.0).then_some(answer)
    }

    /// A server of a cluster forwards the visitor at `visitor` of UDP
    /// service `service` to this peer (`Open` of a flow): flow `id`, whose
    /// datagrams go both ways as any flow's.
    pub fn open_access_flow(
        &mut self,
        id: Uuid,
        service: &str,
        visitor: (String, String),
    ) -> Result<(), String> {
        if !self.features().contains(Features::ACCESS_UDP) {
            return Err("the peer takes no UDP flows by Open".to_owned());
        }
        let max_flows = self.settings.max_flows;
        let table = self.data.table().ok_or("no link to the peer yet")?;
        if table.flows() >= max_flows {
            return Err(format!("at the limit of {max_flows} UDP flows"));
        }
        table.open_flow(id).map_err(|e| e.to_string())?;
        self.send_built(Message::open_forwarded(
            id,
            service,
            ServiceProtocol::Udp,
            visitor,
        ));
        Ok(())
    }

    /// A stream's socket reported.
    pub fn socket_event(&mut self, event: SocketEvent) {
        let emitted = self.data.socket_event(event);
        self.emit_all(emitted);
    }

    /// Flow `id` idled out: the server is told.
    pub fn flow_ended(&mut self, id: Uuid) {
        let emitted = self.data.flow_ended(id);
        self.emit_all(emitted);
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.data
            .get()
            .map_or(0, crate::connections::ConnectionTable::len)
    }

    /// The link's connections, forgotten for the owner to close (the link ended).
    pub fn close_connections(&mut self) -> Vec<(Uuid, ConnectionKind)> {
        self.data.drain()
    }

    /// A visitor reached service `service_id`: a stream to dial, or a flow.
    pub(super) fn on_connect(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        client_addr: String,
        public_addr: &str,
    ) {
        let Phase::Open(open) = &self.phase else {
            return;
        };
        let (features, credit) = (open.features, open.server_window);
        let Some(service) = open.services.get(&service_id).cloned() else {
            return self.refuse(id, "unknown service");
        };
        let proxy_header = service.proxy_header(&client_addr, public_addr);
        let max_flows = self.settings.max_flows;
        let Some(table) = self.data.table() else {
            return;
        };
        let action = match service.protocol {
            ServiceProtocol::Udp if table.flows() >= max_flows => {
                let reason = format!("agent is at its limit of {max_flows} UDP flows");
                return self.refuse(id, &reason);
            }
            ServiceProtocol::Udp => match table.open_flow(id) {
                Ok(()) => AgentAction::OpenFlow {
                    connection_id: id,
                    service_id,
                    service,
                    client_addr,
                    proxy_header,
                },
                Err(e) => return self.refuse(id, &e.to_string()),
            },
            ServiceProtocol::Tcp if !features.contains(Features::STREAMS) => {
                return self.refuse(id, "the server has no data plane");
            }
            ServiceProtocol::Tcp => match table.open(id) {
                Ok(()) => AgentAction::Dial {
                    connection_id: id,
                    address: service.local_addr(),
                    service: service.name,
                    credit,
                    visitor: Some((service_id, client_addr)),
                    proxy_header,
                },
                Err(StreamError::TooMany { max }) => {
                    let reason = format!("agent is at its limit of {max} streams");
                    return self.refuse(id, &reason);
                }
                Err(e) => return self.refuse(id, &e.to_string()),
            },
        };
        self.actions.push_back(action);
        self.remember_service(id, service_id);
    }

    /// Notes that visitor `id` is of `service_id` (to end it if the service
    /// is withdrawn), first forgetting ended ones when the notes outgrow the
    /// open connections.
    fn remember_service(&mut self, id: Uuid, service_id: Uuid) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        let table = self.data.get();
        let live = table.map_or(0, crate::connections::ConnectionTable::len);
        if open.service_of.len() > 2 * live + 64 {
            open.service_of
                .retain(|c, _| table.is_some_and(|t| t.contains(*c)));
        }
        open.service_of.insert(id, service_id);
    }

    /// An access client's stream to service `name`, relayed by the server:
    /// the `target` is dialed only if `access_targets` allows it (otherwise
    /// it is only shown to the client, and the service's own address is
    /// dialed); our window is granted at once, before the dial.
    pub(super) fn on_open(
        &mut self,
        id: Uuid,
        name: &str,
        target: &str,
        visitor: &(String, String),
    ) {
        let Some(service) = self.service_named(name, ServiceProtocol::Tcp).cloned() else {
            return self.refuse(id, &format!("no TCP service named {name:?} on this agent"));
        };
        let allowed =
            !target.is_empty() && self.settings.access_targets.iter().any(|a| a == target);
        let address = if allowed {
            target.to_owned()
        } else {
            service.local_addr()
        };
        let Some(table) = self.data.table() else {
            return;
        };
        match table.open_relayed(id) {
            Ok(window) => {
                self.send(window);
                // a peer's forwarded visitor has its addresses; an access
                // client's stream none: the header says so (PROXY
                // UNKNOWN, or v2's LOCAL)
                let proxy_header = service.proxy_header(&visitor.0, &visitor.1);
                self.actions.push_back(AgentAction::Dial {
                    connection_id: id,
                    address,
                    service: service.name,
                    credit: 0,
                    visitor: None,
                    proxy_header,
                });
            }
            Err(e) => self.refuse(id, &e.to_string()),
        }
    }

    /// A stream frame, datagram, `ConnectAck` or `ConnectFail`: whatever its
    /// connection, the table decides.
    pub(super) fn on_data_plane(&mut self, message: Message) {
        if let Some((id, answer)) = self.probe_answer(&message) {
            return self
                .actions
                .push_back(AgentAction::ProbeAnswered { id, answer });
        }
        if let Message::ConnectFail {
            connection_id,
            reason,
            ..
        } = &message
        {
            tracing::warn!(stream = %connection_id, %reason, "access stream refused");
        }
        let mut emitted = Vec::new();
        self.data.on_frame(message, &mut |e| emitted.push(e));
        self.emit_all(emitted);
    }

    fn emit_all(&mut self, emitted: Vec<Emit>) {
        for e in emitted {
            match e {
                Emit::Send(message) => self.send(message),
                Emit::Write(frame) => match frame.check(self.features()) {
                    Ok(()) => self.actions.push_back(AgentAction::Write(frame)),
                    Err(refused) => {
                        self.unsent += 1;
                        tracing::error!(%refused, "not sent");
                    }
                },
                Emit::Socket(action) => self.actions.push_back(AgentAction::Socket(action)),
            }
        }
    }
}
