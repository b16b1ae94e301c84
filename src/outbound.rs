//! Frames on their way to a WebSocket, typed, and the queue they wait in.
//!
//! Every frame either end writes is an [`Outbound`]: a [`Message`] the writer
//! encodes, or a frame a socket reader already encoded (`Data` from a
//! forwarded connection, `Datagram` from a UDP socket, a relayed access
//! stream's frame). The writer never parses bytes to learn what a frame is or
//! which stream it belongs to, and one check ([`FrameQueue::push`], or
//! [`Outbound::check`] for a writer without a queue) keeps every type the
//! peer did not announce off the wire.
//!
//! [`FrameQueue`] orders what waits: control frames first (heartbeats,
//! credit, answers never wait behind windows of data), then stream frames in
//! the order a [`Schedule`] gives; a stream's `Data` and `Close` keep their
//! order. The schedule is the one replaceable policy of which stream's frame
//! leaves next.

use std::collections::VecDeque;

use bytes::Bytes;
use uuid::Uuid;

use crate::fair::FairQueue;
use crate::protocol::{Features, Message, MessageType, announced};

/// One frame for the WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A message, encoded when written.
    Message(Message),
    /// A `Data` frame of stream `id`, encoded by the socket's reader (header
    /// included, so that the payload is never copied).
    Data {
        /// The stream.
        id: Uuid,
        /// The whole frame.
        frame: Bytes,
    },
    /// A `Datagram` frame of flow `id`, encoded by the UDP socket's reader.
    Datagram {
        /// The flow.
        id: Uuid,
        /// The whole frame.
        frame: Bytes,
    },
    /// A frame of relayed access stream `id`, as the other end's channel
    /// received it (its session checked it there).
    Relayed {
        /// The stream.
        id: Uuid,
        /// Its type.
        kind: MessageType,
        /// The whole frame.
        frame: Bytes,
    },
}

impl Outbound {
    /// The frame's type.
    pub fn kind(&self) -> MessageType {
        match self {
            Self::Message(message) => message.message_type(),
            Self::Data { .. } => MessageType::Data,
            Self::Datagram { .. } => MessageType::Datagram,
            Self::Relayed { kind, .. } => *kind,
        }
    }

    /// The stream whose order the frame must keep (`Data` and `Close`), if any.
    pub fn stream(&self) -> Option<Uuid> {
        match self {
            Self::Data { id, .. } => Some(*id),
            Self::Message(Message::Close { connection_id, .. }) => Some(*connection_id),
            Self::Relayed {
                id,
                kind: MessageType::Data | MessageType::Close,
                ..
            } => Some(*id),
            _ => None,
        }
    }

    /// Refuses a type the peer did not announce (docs/PROTOCOL.md §4.1).
    pub fn check(&self, features: Features) -> Result<(), NotAnnounced> {
        let kind = self.kind();
        if announced(features, kind) {
            Ok(())
        } else {
            Err(NotAnnounced { kind })
        }
    }

    /// The encoded frame.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Self::Message(message) => message.to_bytes(),
            Self::Data { frame, .. }
            | Self::Datagram { frame, .. }
            | Self::Relayed { frame, .. } => frame,
        }
    }
}

impl From<Message> for Outbound {
    fn from(message: Message) -> Self {
        Self::Message(message)
    }
}

/// The most bytes of control frames (heartbeat answers, credit, refusals,
/// acknowledgments) that may wait for a peer: past it, the peer is not
/// reading what it is sent, whatever it sends.
pub const MAX_CONTROL_BACKLOG: usize = 1 << 20;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The peer did not announce the frame's type (a bug: logged and counted).
    #[error(transparent)]
    NotAnnounced(#[from] NotAnnounced),
    /// The control frames owed to the peer passed [`MAX_CONTROL_BACKLOG`]:
    /// it does not read; the link must end.
    #[error("{bytes} bytes of control frames wait for a peer that does not read them")]
    Backlog {
        /// What waits, this frame included.
        bytes: usize,
    },
}

/// A frame of a type the peer did not announce: not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?} not sent: the peer did not announce it")]
pub struct NotAnnounced {
    /// The frame's type.
    pub kind: MessageType,
}

/// The order in which streams' frames leave: frames of one stream stay in
/// order; which stream goes next is the policy's.
pub trait Schedule: Default {
    /// Queues `frame` behind the earlier frames of `stream`.
    fn push(&mut self, stream: Uuid, frame: Bytes);
    /// The next frame to leave.
    fn pop(&mut self) -> Option<Bytes>;
    /// True when nothing waits.
    fn is_empty(&self) -> bool;
}

impl Schedule for FairQueue {
    fn push(&mut self, stream: Uuid, frame: Bytes) {
        Self::push(self, stream, frame);
    }

    fn pop(&mut self) -> Option<Bytes> {
        Self::pop(self)
    }

    fn is_empty(&self) -> bool {
        Self::is_empty(self)
    }
}

/// What waits for one WebSocket: control frames, `ConnectAck`s and stream
/// frames under a [`Schedule`]. A `ConnectAck` leaves with the next write,
/// never on its own: the server forwards without waiting for it, so a new
/// stream's acknowledgment and its first reply share one write.
#[derive(Debug, Default)]
pub struct FrameQueue<S = FairQueue> {
    features: Features,
    control: VecDeque<Bytes>,
    acks: Vec<Bytes>,
    /// Bytes in `control` and `acks`.
    control_bytes: usize,
    streams: S,
    refused: u64,
}

impl<S: Schedule> FrameQueue<S> {
    /// An empty queue for a peer that announced `features`.
    pub fn new(features: Features) -> Self {
        Self {
            features,
            control: VecDeque::new(),
            acks: Vec::new(),
            control_bytes: 0,
            streams: S::default(),
            refused: 0,
        }
    }

    /// What the peer announced.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The peer's features changed (negotiated after `Auth`).
    pub fn set_features(&mut self, features: Features) {
        self.features = features;
    }

    /// Queues a frame. A type the peer did not announce is refused and
    /// counted; a control frame past [`MAX_CONTROL_BACKLOG`] is refused too
    /// (stream frames are bounded by the peer's windows).
    pub fn push(&mut self, frame: Outbound) -> Result<(), PushError> {
        if let Err(e) = frame.check(self.features) {
            self.refused += 1;
            return Err(e.into());
        }
        let (stream, kind) = (frame.stream(), frame.kind());
        let frame = frame.into_bytes();
        if let Some(stream) = stream {
            self.streams.push(stream, frame);
            return Ok(());
        }
        let bytes = self.control_bytes + frame.len();
        if bytes > MAX_CONTROL_BACKLOG {
            return Err(PushError::Backlog { bytes });
        }
        self.control_bytes = bytes;
        match kind {
            // leaves with the next write, never on its own
            MessageType::ConnectAck => self.acks.push(frame),
            _ => self.control.push_back(frame),
        }
        Ok(())
    }

    /// True when nothing but deferred acks waits.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.streams.is_empty()
    }

    /// Frames refused because the peer did not announce their type.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Moves the control frames, then the deferred acks, into `batch`.
    pub fn drain_control(&mut self, batch: &mut Vec<Bytes>) {
        batch.extend(self.control.drain(..));
        batch.append(&mut self.acks);
        self.control_bytes = 0;
    }

    /// Moves stream frames into `batch` until `max_bytes` are taken (the
    /// frame that crosses it included).
    pub fn drain_streams(&mut self, batch: &mut Vec<Bytes>, max_bytes: usize) {
        let mut size = 0;
        while size < max_bytes {
            let Some(frame) = self.streams.pop() else {
                break;
            };
            size += frame.len();
            batch.push(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CloseKind;

    fn data(id: u128, tag: &'static [u8]) -> Outbound {
        let id = Uuid::from_u128(id);
        let frame = Message::data(id, Bytes::from_static(tag))
            .unwrap()
            .to_bytes();
        Outbound::Data { id, frame }
    }

    #[test]
    fn control_leaves_first_then_streams_take_turns_in_order() {
        let mut queue: FrameQueue = FrameQueue::new(Features::ALL);
        queue.push(data(1, b"bulk0")).unwrap();
        queue.push(data(1, b"bulk1")).unwrap();
        let close = Message::Close {
            connection_id: Uuid::from_u128(2),
            kind: CloseKind::Eof,
        };
        queue.push(data(2, b"ping")).unwrap();
        queue.push(close.clone().into()).unwrap();
        queue
            .push(Message::Heartbeat { timestamp: 1 }.into())
            .unwrap();
        let ack = Message::ConnectAck {
            connection_id: Uuid::from_u128(3),
        };
        queue.push(ack.into()).unwrap();
        let mut batch = Vec::new();
        queue.drain_control(&mut batch);
        queue.drain_streams(&mut batch, usize::MAX);
        let kinds: Vec<_> = batch
            .iter()
            .map(|f| Message::decode(f).unwrap().0)
            .collect();
        assert_eq!(kinds[0], Message::Heartbeat { timestamp: 1 });
        assert!(matches!(kinds[1], Message::ConnectAck { .. }));
        let order: Vec<_> = kinds[2..]
            .iter()
            .map(|m| match m {
                Message::Data { data, .. } => String::from_utf8(data.to_vec()).unwrap(),
                _ => "close".to_owned(),
            })
            .collect();
        assert_eq!(order, ["bulk0", "ping", "bulk1", "close"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_type_the_peer_did_not_announce_is_refused_and_counted() {
        let mut queue: FrameQueue = FrameQueue::new(Features::NONE);
        let refused = NotAnnounced {
            kind: MessageType::Data,
        };
        assert_eq!(queue.push(data(1, b"x")), Err(refused.into()));
        queue
            .push(Message::Heartbeat { timestamp: 1 }.into())
            .unwrap();
        assert_eq!(queue.refused(), 1);
        // a flow's Close is allowed under DATAGRAMS alone
        queue.set_features(Features::DATAGRAMS);
        let close = Message::Close {
            connection_id: Uuid::from_u128(1),
            kind: CloseKind::Abort,
        };
        assert!(queue.push(close.into()).is_ok());
    }

    #[test]
    fn stream_frames_leave_in_batches_of_a_bounded_size() {
        let mut queue: FrameQueue = FrameQueue::new(Features::ALL);
        for _ in 0..4 {
            queue.push(data(1, b"0123456789")).unwrap();
        }
        let mut batch = Vec::new();
        queue.drain_streams(&mut batch, 40);
        assert_eq!(batch.len(), 2, "a frame is 31 bytes: the second crosses 40");
        assert!(!queue.is_empty());
    }

    #[test]
    fn control_frames_for_a_peer_that_does_not_read_are_bounded() {
        let mut queue: FrameQueue = FrameQueue::new(Features::ALL);
        let ack = |n| Outbound::Message(Message::HeartbeatAck { timestamp: n });
        let each = ack(0).into_bytes().len();
        let fit = MAX_CONTROL_BACKLOG / each;
        for n in 0..fit as u64 {
            queue.push(ack(n)).unwrap();
        }
        assert_eq!(
            queue.push(ack(0)),
            Err(PushError::Backlog {
                bytes: (fit + 1) * each
            })
        );
        // stream frames are the windows' to bound, not this
        assert!(queue.push(data(1, b"x")).is_ok());
        // once written, there is room again
        let mut batch = Vec::new();
        queue.drain_control(&mut batch);
        assert_eq!(batch.len(), fit);
        assert!(queue.push(ack(1)).is_ok());
    }
}
