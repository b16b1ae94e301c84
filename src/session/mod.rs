//! The session core: the rules of one control link, seen from each end, as
//! state machines that do no IO (the shape quinn-proto gives a QUIC
//! connection).
//!
//! * [`ServerSession`]: one agent's link as the server holds it.
//! * [`AgentSession`]: the same link as the agent holds it.
//!
//! Each is fed decoded frames, timer expiries and `now`, and returns what to
//! do: frames to send, tunnels to open, ports to allocate, services that
//! registered, the reason the link ends. The actors (`ControlChannel` on the
//! server, `AgentConnection` on the agent) carry that out and own the sockets.
//! `src/session/tests.rs` drives a server session against an agent session in
//! memory, with a fabricated clock.
//!
//! Data-plane frames (`Data`, `Window`, `Close`, `Datagram`, `Open`, and
//! `ConnectAck`/`ConnectFail`) pass the rules here (direction, negotiated
//! features, authentication) and go back to the caller, which routes them
//! by their connection id.

use crate::protocol::{DecodeError, Features, Message, MessageType, announced};

pub mod agent;
mod data;
pub mod server;

#[cfg(test)]
mod tests;

pub use agent::{AgentAction, AgentSession, AgentSettings, LinkError};
pub use data::SocketEvent;
pub use server::{
    CloseReason, Registration, ServerAction, ServerSession, ServerSettings, TokenRefusal,
    check_token,
};

/// A peer broke the protocol: the link is closed (docs/PROTOCOL.md §2, §4.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// A frame that does not decode.
    #[error("bad frame: {0}")]
    Malformed(#[from] DecodeError),
    /// A WebSocket text or fragmented message.
    #[error("text and fragmented messages are not part of the protocol")]
    NotBinary,
    /// Anything but `Auth` (server) or `AuthOk`/`AuthFail` (agent) first.
    #[error("{0:?} before authentication")]
    BeforeAuth(MessageType),
    /// A second `Auth`, or a message that only the other end sends.
    #[error("unexpected {0:?}")]
    Unexpected(MessageType),
    /// A message of a feature that was not negotiated.
    #[error("{kind:?} without the {feature:?} feature")]
    NotNegotiated {
        /// The message's type.
        kind: MessageType,
        /// What it needs.
        feature: Features,
    },
    /// A `RegisterOk` or `RegisterFail` with no `Register` waiting for it.
    #[error("{0:?} with no registration waiting for it")]
    UnpairedReply(MessageType),
}

/// Which end of a link receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The tunnel server.
    Server,
    /// The agent (or an access client).
    Agent,
}

impl End {
    /// True when the peer of this end may send `kind` (docs/PROTOCOL.md §3, §4):
    /// the server never receives the server's answers, nor the agent `Auth`,
    /// `Register`, `Unregister` or `Health`. Stream frames, heartbeats and the relayed
    /// `ConnectAck`/`ConnectFail`/`Open` go both ways.
    pub const fn receives(self, kind: MessageType) -> bool {
        use MessageType as T;
        match self {
            Self::Server => !matches!(
                kind,
                T::AuthOk
                    | T::AuthFail
                    | T::RegisterOk
                    | T::RegisterFail
                    | T::Connect
                    | T::Disconnect
            ),
            Self::Agent => !matches!(kind, T::Auth | T::Register | T::Unregister | T::Health),
        }
    }
}

/// Checks an authenticated peer's message against this end's rules: its
/// direction, and the features negotiated (`Close` is also a UDP flow's
/// end, so `DATAGRAMS` allows it too).
pub fn check_inbound(
    end: End,
    features: Features,
    message: &Message,
) -> Result<(), ProtocolViolation> {
    let kind = message.message_type();
    if !end.receives(kind) || kind == MessageType::Auth {
        return Err(ProtocolViolation::Unexpected(kind));
    }
    if announced(features, kind) {
        Ok(())
    } else {
        let feature = kind.required_feature();
        Err(ProtocolViolation::NotNegotiated { kind, feature })
    }
}

/// Refuses a frame the peer did not announce (docs/PROTOCOL.md §4.1: a peer
/// is never sent a message type it did not announce). The refused type.
pub fn check_outbound(features: Features, message: &Message) -> Result<(), MessageType> {
    let kind = message.message_type();
    if announced(features, kind) {
        Ok(())
    } else {
        Err(kind)
    }
}
