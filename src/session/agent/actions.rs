//! What an agent session asks of its owner, and how a link ends.

use bytes::Bytes;
use uuid::Uuid;

use crate::config::ServiceConfig;
use crate::connections::ConnectionAction;
use crate::outbound::Outbound;
use crate::protocol::{Features, Message};
use crate::session::ProtocolViolation;

/// How a link ended, and whether reconnecting can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The server refused the token: reconnecting with it cannot help.
    #[error("the server refused the token: {reason}")]
    TokenRefused {
        /// The server's reason.
        reason: String,
    },
    /// The server refused `Auth` for a passing reason (a lockout, its tunnel limit).
    #[error("authentication refused: {reason}")]
    AuthRefused {
        /// The server's reason.
        reason: String,
    },
    /// No answer to `Auth` in time.
    #[error("no answer to Auth in time")]
    AuthTimeout,
    /// Nothing heard from the server for the heartbeat timeout.
    #[error("nothing heard from the server within the heartbeat timeout")]
    HeartbeatTimeout,
    /// The server does not read what it is sent (a write waited for the
    /// heartbeat timeout, or the answers owed to it passed their bound),
    /// however much it sends.
    #[error("the server does not read what it is sent: {detail}")]
    NotReading {
        /// What showed it.
        detail: String,
    },
    /// The server ended the session (`Disconnect`).
    #[error("server disconnected the agent: {reason}")]
    Disconnected {
        /// The server's reason.
        reason: String,
    },
    /// The server broke the protocol.
    #[error("protocol error by the server: {0}")]
    Protocol(#[from] ProtocolViolation),
}

impl LinkError {
    /// True when reconnecting cannot help (the agent stops).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::TokenRefused { .. })
    }
}

/// What the owner of an agent session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// Write this frame to the server.
    Send(Message),
    /// `AuthOk` arrived: the tunnel is up with these features.
    Authenticated {
        /// The tunnel's id.
        tunnel_id: Uuid,
        /// Features both ends support.
        features: Features,
        /// What we may send on a new stream before a `Window`.
        server_window: u32,
    },
    /// A service is not registered: the server carries no datagrams (a UDP
    /// service), or enforces no visitor lists (a service with them).
    NotRegistered {
        /// The service.
        service: ServiceConfig,
        /// Why.
        reason: &'static str,
    },
    /// A service registered.
    Registered {
        /// Its id on the server.
        service_id: Uuid,
        /// The service.
        service: ServiceConfig,
        /// Its public port (`None` from an original server).
        port: Option<u16>,
    },
    /// The server refused a registration.
    RegistrationRefused {
        /// The service.
        service: ServiceConfig,
        /// The server's reason.
        reason: String,
        /// Asking again soon cannot help (the server said so): retry at
        /// the longest delay, and say it once.
        lasting: bool,
    },
    /// Authenticated and every registration asked for so far answered (a
    /// refused one is retried on its own backoff).
    Ready,
    /// The server answered probe `id`: the service exists and may be
    /// reached (`Ok`), or why not.
    ProbeAnswered {
        /// The probe.
        id: Uuid,
        /// Its answer.
        answer: Result<(), String>,
    },
    /// Dial `address` for stream `connection_id` (a visitor's, or an
    /// access client's relayed by the server), then answer
    /// [`AgentSession::dialed`](crate::session::AgentSession::dialed) or [`AgentSession::refuse`](crate::session::AgentSession::refuse).
    Dial {
        /// The stream.
        connection_id: Uuid,
        /// What to dial.
        address: String,
        /// The service's name (for its counters).
        service: String,
        /// What the socket may send before the server's first `Window`.
        credit: u32,
        /// For a visitor's stream: the service's id and the visitor's address
        /// (a host's connection callback may refuse it).
        visitor: Option<(Uuid, String)>,
        /// The PROXY protocol header to write to the socket first, if the
        /// service wants one.
        proxy_header: Option<Bytes>,
    },
    /// A UDP flow began on a service: open its socket.
    OpenFlow {
        /// The flow.
        connection_id: Uuid,
        /// The service's id.
        service_id: Uuid,
        /// The service.
        service: ServiceConfig,
        /// The visitor's address, as the server wrote it.
        client_addr: String,
        /// The PROXY protocol header to put before each datagram, if the
        /// service wants one.
        proxy_header: Option<Bytes>,
    },
    /// Write this frame, encoded by a socket's reader, to the server.
    Write(Outbound),
    /// Carry this out on a connection's socket (deliver, credit, shut,
    /// reset, a datagram for a flow, a flow forgotten).
    Socket(ConnectionAction),
    /// The link ends (close the WebSocket); reconnect unless it is fatal.
    Close(LinkError),
}
