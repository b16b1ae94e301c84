//! What a server session asks of its owner, and why a session ends.

use bytes::Bytes;
use uuid::Uuid;

use crate::auth::Secret;
use crate::connections::ConnectionAction;
use crate::outbound::Outbound;
use crate::protocol::{CloseKind, Message, MessageType, ServiceProtocol};
use crate::session::ProtocolViolation;

/// Why a session ends (the caller maps it to a WebSocket close code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// No `Auth` within `auth_timeout`.
    AuthTimeout,
    /// `Auth` refused (`AuthFail` sent).
    AuthRefused,
    /// No `HeartbeatAck` within `heartbeat_timeout` (`Disconnect` sent).
    HeartbeatTimeout,
    /// The peer broke the protocol (`Disconnect` sent once authenticated).
    Protocol(ProtocolViolation),
    /// The server ends it (takeover, shutdown, a revoked token): `Disconnect` sent.
    Closed(String),
}

/// What the owner of a server session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// Write this frame to the agent.
    Send(Message),
    /// Check `token` ([`check_token`](crate::session::check_token)) and open the tunnel, then answer with
    /// [`ServerSession::authenticated`](crate::session::ServerSession::authenticated) or [`ServerSession::refused`](crate::session::ServerSession::refused).
    Authenticate {
        /// The raw token (hash it; never log it).
        token: Secret,
        /// The agent's stable id.
        client_id: Uuid,
    },
    /// Allocate the public port of a registration and listen on it, then
    /// answer with [`ServerSession::allocated`](crate::session::ServerSession::allocated).
    Allocate(Registration),
    /// The agent unregistered a service: stop its listener, free its port.
    Unregister {
        /// The service.
        service_id: Uuid,
        /// Its public port.
        port: u16,
    },
    /// Tell the registry the tunnel is alive.
    ReportAlive,
    /// Write this frame, encoded by a socket's reader, to the agent.
    Write(Outbound),
    /// The agent's health checks of service `service_id` passed (`healthy`)
    /// or failed: while unhealthy, its replica gets no new visitor.
    ServiceHealth {
        /// The service.
        service_id: Uuid,
        /// Whether its checks pass.
        healthy: bool,
    },
    /// The agent refused visitor stream or flow `id` (`ConnectFail`: its
    /// service down, its limit); the connection is reset as well. A remote party decides
    /// how often: log it rate-limited.
    VisitorRefused {
        /// The stream.
        id: Uuid,
        /// The agent's reason.
        reason: String,
    },
    /// Carry this out on a connection's socket (deliver, credit, shut,
    /// reset, a datagram for a visitor, a flow forgotten).
    Socket(ConnectionAction),
    /// Pass a frame of relayed access stream `id` to the other end's channel.
    Relay {
        /// The stream.
        id: Uuid,
        /// The frame's type.
        kind: MessageType,
        /// The kind of a `Close`.
        close: Option<CloseKind>,
        /// The frame, as it came.
        frame: Bytes,
        /// The relay is over with it: forget the other end after passing it.
        last: bool,
    },
    /// An access client's `Open` to `service`, within its token's scope:
    /// find the channel of the agent that registered it, then answer
    /// [`ServerSession::relay_found`](crate::session::ServerSession::relay_found) or [`ServerSession::relay_not_found`](crate::session::ServerSession::relay_not_found).
    FindService {
        /// The new stream.
        id: Uuid,
        /// The service's name.
        service: String,
        /// What the client asks the agent to dial instead, if allowed (for
        /// a UDP flow, the visitor's address).
        target: String,
        /// A stream to a TCP service, or a flow to a UDP one.
        protocol: ServiceProtocol,
        /// A peer's forwarded visitor: its address and the public address
        /// it reached (empty otherwise).
        visitor: (String, String),
        /// Only whether it exists is asked: answer
        /// [`ServerSession::probe_found`](crate::session::ServerSession::probe_found)
        /// or `relay_not_found`, and relay nothing.
        probe: bool,
    },
    /// End the session: close the WebSocket, free what it holds.
    Close(CloseReason),
}

/// A registration that passed the session's checks and waits for its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Its place in the order of `Register`s (answers go out in this order).
    pub seq: u64,
    /// The service name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// The public port asked for, 0 for any.
    pub remote_port: u16,
    /// Public ports the token may take (`None`: the server's whole range).
    pub allowed_ports: Option<Vec<(u16, u16)>>,
    /// The token's register scope names the service: it may join another
    /// token's registration of the name as a replica.
    pub named_in_scope: bool,
    /// Who may visit it: the token's lists and the registration's.
    pub visitors: crate::visitor_rules::ServiceRules,
    /// New connections (or flows) a second one visitor address may open.
    pub visitor_rate: Option<u32>,
    /// Bytes a second each way for all its streams.
    pub bandwidth: Option<u64>,
}
