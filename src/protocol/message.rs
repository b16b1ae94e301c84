//! The protocol vocabulary: message types, the `Message` enum and its checked constructors.

use bytes::Bytes;
use uuid::Uuid;

use super::{Capabilities, Features, HEADER_SIZE, MAX_MESSAGE_SIZE};
use crate::auth::Secret;

/// Length of a UUID on the wire.
pub(crate) const UUID_LEN: usize = 16;

/// Largest payload a `Data` or `Datagram` message carries in one frame.
pub const MAX_DATA_PAYLOAD: usize = MAX_MESSAGE_SIZE - HEADER_SIZE - UUID_LEN;

/// Longest service name (its length travels in one byte).
pub const MAX_SERVICE_NAME_LEN: usize = u8::MAX as usize;

/// The type byte of every message, the seed's 13 plus our 0x50-0x7F extension block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Client authentication request (C->S).
    Auth = 0x01,
    /// Authentication success with the tunnel id (S->C).
    AuthOk = 0x02,
    /// Authentication failure with a reason (S->C).
    AuthFail = 0x03,
    /// Service registration request (C->S).
    Register = 0x10,
    /// Registration success with the service id (S->C).
    RegisterOk = 0x11,
    /// Registration failure (S->C).
    RegisterFail = 0x12,
    /// Incoming connection notification; opens a stream when STREAMS is on (S->C).
    Connect = 0x20,
    /// Connection accepted (C->S).
    ConnectAck = 0x21,
    /// Connection rejected (C->S).
    ConnectFail = 0x22,
    /// Keepalive with a timestamp (both ways).
    Heartbeat = 0x30,
    /// Heartbeat response (both ways).
    HeartbeatAck = 0x31,
    /// Service unregistration (C->S).
    Unregister = 0x40,
    /// Server disconnect notification (S->C).
    Disconnect = 0x41,
    /// Stream bytes (extension, STREAMS).
    Data = 0x50,
    /// Stream half-close or abort (extension, STREAMS).
    Close = 0x51,
    /// Stream credit (extension, STREAMS).
    Window = 0x52,
    /// One UDP datagram of a flow (extension, DATAGRAMS).
    Datagram = 0x53,
    /// Open a stream to a named service (extension, ACCESS).
    Open = 0x54,
    /// A registered service's health as the agent's checks see it (extension, HEALTH).
    Health = 0x55,
}

impl MessageType {
    /// The feature a peer must have announced before it may be sent this type.
    pub const fn required_feature(self) -> Features {
        match self {
            Self::Data | Self::Close | Self::Window => Features::STREAMS,
            Self::Datagram => Features::DATAGRAMS,
            Self::Open => Features::ACCESS,
            Self::Health => Features::HEALTH,
            _ => Features::NONE,
        }
    }
}

impl TryFrom<u8> for MessageType {
    type Error = u8;

    fn try_from(byte: u8) -> Result<Self, u8> {
        Ok(match byte {
            0x01 => Self::Auth,
            0x02 => Self::AuthOk,
            0x03 => Self::AuthFail,
            0x10 => Self::Register,
            0x11 => Self::RegisterOk,
            0x12 => Self::RegisterFail,
            0x20 => Self::Connect,
            0x21 => Self::ConnectAck,
            0x22 => Self::ConnectFail,
            0x30 => Self::Heartbeat,
            0x31 => Self::HeartbeatAck,
            0x40 => Self::Unregister,
            0x41 => Self::Disconnect,
            0x50 => Self::Data,
            0x51 => Self::Close,
            0x52 => Self::Window,
            0x53 => Self::Datagram,
            0x54 => Self::Open,
            0x55 => Self::Health,
            other => return Err(other),
        })
    }
}

/// Transport protocol of a service.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// TCP (wire byte 0).
    #[default]
    Tcp,
    /// UDP (wire byte 1).
    Udp,
}

impl ServiceProtocol {
    /// The wire byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Tcp => 0,
            Self::Udp => 1,
        }
    }

    /// Parses the wire byte; anything but 0 or 1 is refused.
    pub const fn from_byte(byte: u8) -> Result<Self, u8> {
        match byte {
            0 => Ok(Self::Tcp),
            1 => Ok(Self::Udp),
            other => Err(other),
        }
    }
}

impl std::fmt::Display for ServiceProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// How a stream ends in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseKind {
    /// Half-close: the sender will send no more bytes (TCP FIN). Wire byte 0.
    Eof,
    /// Reset: the stream is gone both ways (TCP RST). Wire byte 1.
    Abort,
}

impl CloseKind {
    /// The wire byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Eof => 0,
            Self::Abort => 1,
        }
    }

    /// Parses the wire byte.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Eof),
            1 => Some(Self::Abort),
            _ => None,
        }
    }
}

/// One protocol message. Variants with variable-length content are
/// `#[non_exhaustive]`: build them with the checked constructors below, which
/// refuse content that cannot be encoded instead of truncating it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client authentication: the raw token (hashed on arrival) and a stable client id.
    #[non_exhaustive]
    Auth {
        /// The token, masked in `Debug`.
        token: Secret,
        /// Identifies the agent across reconnects.
        client_id: Uuid,
        /// Extension block; `None` for a legacy agent.
        capabilities: Option<Capabilities>,
    },
    /// Authentication success.
    AuthOk {
        /// The tunnel's id.
        tunnel_id: Uuid,
        /// Features accepted; `None` for a legacy server.
        capabilities: Option<Capabilities>,
    },
    /// Authentication failure.
    #[non_exhaustive]
    AuthFail {
        /// Why the token was refused.
        reason: String,
        /// Whether retrying can help (extension field, appended after the
        /// reason; `None` from an original server, which sends none).
        refusal: Option<AuthRefusal>,
    },
    /// Service registration.
    #[non_exhaustive]
    Register {
        /// Service name, at most 255 bytes.
        name: String,
        /// TCP or UDP.
        protocol: ServiceProtocol,
        /// Port of the service next to the agent.
        local_port: u16,
        /// Requested public port, 0 for any.
        remote_port: u16,
        /// Visitors the server is to admit and refuse: CIDR blocks separated
        /// by commas, each list possibly empty (`VISITOR_RULES`; on the wire
        /// only when one is not empty).
        visitors: (String, String),
        /// New connections a second one visitor address may open, 0 for no
        /// limit (`VISITOR_RULES`; on the wire only when not 0).
        visitor_rate: u32,
        /// Bytes a second each way for all the service's streams, 0 for no
        /// limit (`VISITOR_RULES`; on the wire only when not 0).
        bandwidth: u64,
    },
    /// Registration success.
    RegisterOk {
        /// The service's id.
        service_id: Uuid,
        /// The public port assigned; `None` from a legacy server.
        port: Option<u16>,
    },
    /// Registration failure.
    #[non_exhaustive]
    RegisterFail {
        /// Why the registration was refused.
        reason: String,
        /// Whether asking again soon can help (extension: a trailing byte,
        /// which the original decoder ignores; `None` from an original server).
        refusal: Option<RegisterRefusal>,
    },
    /// A visitor connected (or a UDP flow began); opens a stream under STREAMS.
    #[non_exhaustive]
    Connect {
        /// The service the visitor reached.
        service_id: Uuid,
        /// The new connection (stream) id.
        connection_id: Uuid,
        /// The visitor's address, as text.
        client_addr: String,
        /// The public address and port the visitor reached, as text, or
        /// empty (`PROXY`; on the wire only when not empty).
        public_addr: String,
    },
    /// The agent accepted the connection.
    ConnectAck {
        /// The connection.
        connection_id: Uuid,
    },
    /// The agent refused the connection.
    #[non_exhaustive]
    ConnectFail {
        /// The connection.
        connection_id: Uuid,
        /// Why.
        reason: String,
    },
    /// Keepalive.
    Heartbeat {
        /// Sender's clock, milliseconds since the Unix epoch.
        timestamp: u64,
    },
    /// Keepalive answer, echoing the heartbeat's timestamp.
    HeartbeatAck {
        /// The timestamp of the heartbeat answered.
        timestamp: u64,
    },
    /// Service unregistration.
    Unregister {
        /// The service.
        service_id: Uuid,
    },
    /// The server is closing the session.
    #[non_exhaustive]
    Disconnect {
        /// Why.
        reason: String,
    },
    /// Stream bytes.
    #[non_exhaustive]
    Data {
        /// The stream.
        connection_id: Uuid,
        /// At most [`MAX_DATA_PAYLOAD`] bytes.
        data: Bytes,
    },
    /// End of a stream, one way (`Eof`) or both (`Abort`).
    Close {
        /// The stream.
        connection_id: Uuid,
        /// Half-close or reset.
        kind: CloseKind,
    },
    /// Credit: the receiver accepts `increment` more bytes on the stream.
    #[non_exhaustive]
    Window {
        /// The stream.
        connection_id: Uuid,
        /// Bytes of credit, 1 to 2^31-1.
        increment: u32,
    },
    /// One UDP datagram of a flow.
    #[non_exhaustive]
    Datagram {
        /// The flow.
        connection_id: Uuid,
        /// The whole datagram, at most [`MAX_DATA_PAYLOAD`] bytes.
        data: Bytes,
    },
    /// Open a stream to the service named `service`.
    #[non_exhaustive]
    Open {
        /// The new stream's id, chosen by the opener.
        connection_id: Uuid,
        /// Name of the registered service.
        service: String,
        /// Address the agent should dial instead of the service's own, or
        /// empty; for a UDP flow, the visitor's address (shown, never dialed).
        target: String,
        /// A TCP stream, or a UDP flow (`ACCESS_UDP`; on the wire only when
        /// UDP or when `visitor` is set).
        protocol: ServiceProtocol,
        /// For a cluster's forwarded visitor: its address and the public
        /// address it reached, as text (empty: not forwarded; on the wire
        /// only when set).
        visitor: (String, String),
        /// A probe (`ACCESS_PROBE`): the server only answers whether the
        /// service exists and may be reached, and relays nothing.
        probe: bool,
    },
    /// The agent's checks of a registered service's local end passed
    /// (`healthy`) or failed: an unhealthy replica gets no new visitor.
    #[non_exhaustive]
    Health {
        /// The service, as `RegisterOk` named it.
        service_id: Uuid,
        /// Whether its checks pass.
        healthy: bool,
    },
}

/// Why the server refused a `Register`, as far as the agent must act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterRefusal {
    /// Asking again soon cannot help: the token's scope, the request itself,
    /// a port another process holds (wire byte 0).
    Lasting,
    /// A passing condition: a port another agent holds, a full range, a
    /// store away (wire byte 1).
    Later,
}

impl RegisterRefusal {
    /// The wire byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Lasting => 0,
            Self::Later => 1,
        }
    }

    /// The refusal a wire byte names; `None` for a value a newer peer may
    /// define (treated as no field).
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Lasting),
            1 => Some(Self::Later),
            _ => None,
        }
    }
}

/// Why the server refused an `Auth`, as far as the agent must act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthRefusal {
    /// The token is not accepted: retrying with it cannot help (wire byte 0).
    Token,
    /// A passing condition (a lockout after failures, the server's tunnel
    /// limit, a busy registry): retrying later can help (wire byte 1).
    Later,
}

impl AuthRefusal {
    /// The wire byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Token => 0,
            Self::Later => 1,
        }
    }

    /// The refusal a wire byte names; `None` for a value a newer peer may
    /// define (treated as no field).
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Token),
            1 => Some(Self::Later),
            _ => None,
        }
    }
}

/// A message that cannot be encoded, refused where it is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A service name over 255 bytes.
    #[error("service name is {len} bytes, at most {MAX_SERVICE_NAME_LEN} fit")]
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// The whole frame would exceed [`MAX_MESSAGE_SIZE`].
    #[error("{kind:?} message would be {len} bytes, at most {MAX_MESSAGE_SIZE} fit")]
    TooLarge {
        /// The message type.
        kind: MessageType,
        /// The frame length it would have.
        len: usize,
    },
    /// A window increment of 0 or over 2^31-1.
    #[error("window increment {0} is outside 1..=2147483647")]
    BadIncrement(u32),
}

impl Message {
    /// `Auth` with an optional extension block.
    pub fn auth(
        token: impl Into<Secret>,
        client_id: Uuid,
        capabilities: Option<Capabilities>,
    ) -> Result<Self, BuildError> {
        let token = token.into();
        checked(Self::Auth {
            token,
            client_id,
            capabilities,
        })
    }

    /// `AuthFail` with a reason.
    pub fn auth_fail(reason: impl Into<String>) -> Result<Self, BuildError> {
        checked(Self::AuthFail {
            reason: reason.into(),
            refusal: None,
        })
    }

    /// `AuthFail` that also says whether retrying can help (for an agent
    /// that offered the extension; an original agent ignores the field).
    pub fn auth_refused(
        reason: impl Into<String>,
        refusal: AuthRefusal,
    ) -> Result<Self, BuildError> {
        checked(Self::AuthFail {
            reason: reason.into(),
            refusal: Some(refusal),
        })
    }

    /// `Register`; a name over 255 bytes is refused.
    pub fn register(
        name: impl Into<String>,
        protocol: ServiceProtocol,
        local_port: u16,
        remote_port: u16,
    ) -> Result<Self, BuildError> {
        let name = name.into();
        if name.len() > MAX_SERVICE_NAME_LEN {
            return Err(BuildError::NameTooLong { len: name.len() });
        }
        checked(Self::Register {
            name,
            protocol,
            local_port,
            remote_port,
            visitors: (String::new(), String::new()),
            visitor_rate: 0,
            bandwidth: 0,
        })
    }

    /// `Register` with visitor address lists, `(allow, deny)`: CIDR blocks
    /// separated by commas (sent only to a server that announced
    /// `VISITOR_RULES`).
    pub fn register_with_visitors(
        name: impl Into<String>,
        protocol: ServiceProtocol,
        (local_port, remote_port): (u16, u16),
        (visitors, visitor_rate, bandwidth): ((String, String), u32, u64),
    ) -> Result<Self, BuildError> {
        match Self::register(name, protocol, local_port, remote_port)? {
            Self::Register {
                name,
                protocol,
                local_port,
                remote_port,
                ..
            } => checked(Self::Register {
                name,
                protocol,
                local_port,
                remote_port,
                visitors,
                visitor_rate,
                bandwidth,
            }),
            other => Ok(other),
        }
    }

    /// `RegisterFail` with a reason.
    pub fn register_fail(reason: impl Into<String>) -> Result<Self, BuildError> {
        checked(Self::RegisterFail {
            reason: reason.into(),
            refusal: None,
        })
    }

    /// `RegisterFail` with a reason, saying whether asking again soon can help.
    pub fn register_refused(
        reason: impl Into<String>,
        refusal: RegisterRefusal,
    ) -> Result<Self, BuildError> {
        checked(Self::RegisterFail {
            reason: reason.into(),
            refusal: Some(refusal),
        })
    }

    /// `Connect` for a new visitor.
    pub fn connect(
        service_id: Uuid,
        connection_id: Uuid,
        client_addr: impl Into<String>,
    ) -> Result<Self, BuildError> {
        Self::connect_to(service_id, connection_id, client_addr, "")
    }

    /// `Connect` for a new visitor who reached `public_addr` (sent to an
    /// agent that announced `PROXY`; empty: unknown).
    pub fn connect_to(
        service_id: Uuid,
        connection_id: Uuid,
        client_addr: impl Into<String>,
        public_addr: impl Into<String>,
    ) -> Result<Self, BuildError> {
        checked(Self::Connect {
            service_id,
            connection_id,
            client_addr: client_addr.into(),
            public_addr: public_addr.into(),
        })
    }

    /// `ConnectFail` with a reason.
    pub fn connect_fail(
        connection_id: Uuid,
        reason: impl Into<String>,
    ) -> Result<Self, BuildError> {
        checked(Self::ConnectFail {
            connection_id,
            reason: reason.into(),
        })
    }

    /// `Disconnect` with a reason.
    pub fn disconnect(reason: impl Into<String>) -> Result<Self, BuildError> {
        checked(Self::Disconnect {
            reason: reason.into(),
        })
    }

    /// `Data`; more than [`MAX_DATA_PAYLOAD`] bytes is refused.
    pub fn data(connection_id: Uuid, data: Bytes) -> Result<Self, BuildError> {
        checked(Self::Data {
            connection_id,
            data,
        })
    }

    /// `Window`; the increment must be in 1..=2^31-1.
    pub fn window(connection_id: Uuid, increment: u32) -> Result<Self, BuildError> {
        if increment == 0 || increment > super::MAX_WINDOW {
            return Err(BuildError::BadIncrement(increment));
        }
        Ok(Self::Window {
            connection_id,
            increment,
        })
    }

    /// `Datagram`; more than [`MAX_DATA_PAYLOAD`] bytes is refused.
    pub fn datagram(connection_id: Uuid, data: Bytes) -> Result<Self, BuildError> {
        checked(Self::Datagram {
            connection_id,
            data,
        })
    }

    /// `Open` a stream to a named service, optionally asking for a specific target.
    pub fn open(
        connection_id: Uuid,
        service: impl Into<String>,
        target: impl Into<String>,
    ) -> Result<Self, BuildError> {
        let stream = (ServiceProtocol::Tcp, (String::new(), String::new()));
        Self::open_with(connection_id, service.into(), target.into(), stream, false)
    }

    /// A probe `Open` (`ACCESS_PROBE`): whether TCP service `service`
    /// exists on the server and this client may open streams to it.
    pub fn probe(connection_id: Uuid, service: impl Into<String>) -> Result<Self, BuildError> {
        let stream = (ServiceProtocol::Tcp, (String::new(), String::new()));
        Self::open_with(connection_id, service.into(), String::new(), stream, true)
    }

    /// `Open` of a stream (TCP) or flow (UDP) for a visitor a server of a
    /// cluster forwards to its peer: the visitor's address and the public
    /// address it reached travel with it (the agent's PROXY header, its
    /// connection callback); for a flow, `target` is the visitor's address.
    pub fn open_forwarded(
        connection_id: Uuid,
        service: impl Into<String>,
        protocol: ServiceProtocol,
        visitor: (String, String),
    ) -> Result<Self, BuildError> {
        let target = match protocol {
            ServiceProtocol::Tcp => String::new(),
            ServiceProtocol::Udp => visitor.0.clone(),
        };
        Self::open_with(
            connection_id,
            service.into(),
            target,
            (protocol, visitor),
            false,
        )
    }

    /// Any `Open`; a service name over 255 bytes is refused.
    fn open_with(
        connection_id: Uuid,
        service: String,
        target: String,
        (protocol, visitor): (ServiceProtocol, (String, String)),
        probe: bool,
    ) -> Result<Self, BuildError> {
        if service.len() > MAX_SERVICE_NAME_LEN {
            return Err(BuildError::NameTooLong { len: service.len() });
        }
        checked(Self::Open {
            connection_id,
            service,
            target,
            protocol,
            visitor,
            probe,
        })
    }

    /// A `Health` report for `service_id`.
    pub fn health(service_id: Uuid, healthy: bool) -> Self {
        Self::Health {
            service_id,
            healthy,
        }
    }

    /// The message's type byte.
    pub const fn message_type(&self) -> MessageType {
        match self {
            Self::Auth { .. } => MessageType::Auth,
            Self::AuthOk { .. } => MessageType::AuthOk,
            Self::AuthFail { .. } => MessageType::AuthFail,
            Self::Register { .. } => MessageType::Register,
            Self::RegisterOk { .. } => MessageType::RegisterOk,
            Self::RegisterFail { .. } => MessageType::RegisterFail,
            Self::Connect { .. } => MessageType::Connect,
            Self::ConnectAck { .. } => MessageType::ConnectAck,
            Self::ConnectFail { .. } => MessageType::ConnectFail,
            Self::Heartbeat { .. } => MessageType::Heartbeat,
            Self::HeartbeatAck { .. } => MessageType::HeartbeatAck,
            Self::Unregister { .. } => MessageType::Unregister,
            Self::Disconnect { .. } => MessageType::Disconnect,
            Self::Data { .. } => MessageType::Data,
            Self::Close { .. } => MessageType::Close,
            Self::Window { .. } => MessageType::Window,
            Self::Datagram { .. } => MessageType::Datagram,
            Self::Open { .. } => MessageType::Open,
            Self::Health { .. } => MessageType::Health,
        }
    }
}

/// Refuses a message whose frame would not fit in [`MAX_MESSAGE_SIZE`].
fn checked(message: Message) -> Result<Message, BuildError> {
    let len = message.encoded_len();
    if len > MAX_MESSAGE_SIZE {
        return Err(BuildError::TooLarge {
            kind: message.message_type(),
            len,
        });
    }
    Ok(message)
}
