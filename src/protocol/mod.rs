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
    MessageType, ServiceProtocol,
};

/// The feature a peer must have announced before it may be sent this encoded
/// frame; an unknown type byte requires every feature (it is never sent).
pub fn frame_feature(frame: &[u8]) -> Features {
    frame
        .first()
        .and_then(|t| MessageType::try_from(*t).ok())
        .map_or(Features::ALL, MessageType::required_feature)
}

/// Protocol version of the seed (not sent on the wire; the extension block has its own).
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest frame, header included: 64 KiB, also the WebSocket frame limit on both ends.
pub const MAX_MESSAGE_SIZE: usize = 65536;

/// Frame header: type (1) and payload length (4).
pub const HEADER_SIZE: usize = 5;

#[cfg(test)]
mod tests;
