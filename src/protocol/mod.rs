//! The wire protocol: the seed's 13 control messages, byte for byte, plus our
//! negotiated data-plane extension. Normative text: `docs/PROTOCOL.md`.
//!
//! Every frame is `type(1) | payload length(4, big-endian) | payload`, one frame
//! per WebSocket binary message.

mod codec;
mod features;
mod message;

pub use codec::{DATA_FRAME_OVERHEAD, DecodeError, MAX_PAYLOAD_SIZE, frame_len};
pub use features::{
    Capabilities, DEFAULT_INITIAL_WINDOW, EXT_VERSION, Features, MAX_WINDOW, features_of,
};
pub use message::{
    AuthRefusal, BuildError, CloseKind, MAX_DATA_PAYLOAD, MAX_SERVICE_NAME_LEN, Message,
    MessageType, RegisterRefusal, ServiceProtocol,
};

/// True when a peer that announced `features` may be sent (or may send) a
/// message of type `kind`: its feature is announced (`Close` also ends UDP
/// flows, so `DATAGRAMS` allows it too).
pub fn announced(features: Features, kind: MessageType) -> bool {
    features.contains(kind.required_feature())
        || (kind == MessageType::Close && features.contains(Features::DATAGRAMS))
}

/// Protocol version of the seed (not sent on the wire; the extension block has its own).
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest frame, header included: 64 KiB, also the WebSocket frame limit on both ends.
pub const MAX_MESSAGE_SIZE: usize = 65536;

/// Frame header: type (1) and payload length (4).
pub const HEADER_SIZE: usize = 5;

#[cfg(test)]
mod tests;
