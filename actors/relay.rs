//! Relayed access streams (docs/PROTOCOL.md §4.5): an access client's `Open`
//! is passed to the control channel of the agent that registered the service,
//! and from then on every frame of that stream id goes across, as encoded,
//! between the two channels. The server keeps no stream state for them: the
//! two ends run flow control between themselves (each grants its window with
//! an explicit `Window`), so what crosses is bounded by their windows.

use std::collections::HashMap;

use actix::prelude::*;
use bytes::Bytes;
use uuid::Uuid;

use crate::protocol::{CloseKind, Message, MessageType};

/// Between two control channels, about a relayed stream.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum Relay {
    /// An access client opens stream `id` to `service` (to the agent's channel).
    Open {
        id: Uuid,
        service: String,
        target: String,
        /// The access client's channel.
        from: Recipient<Self>,
    },
    /// A frame of stream `id` from the other end, for this channel's peer.
    Frame {
        id: Uuid,
        kind: MessageType,
        frame: Bytes,
    },
    /// The other end's channel ended: abort stream `id`.
    Gone { id: Uuid },
}

struct Entry {
    other: Recipient<Relay>,
    eofs: u8,
}

/// One channel's relayed streams: the other end of each.
#[derive(Default)]
pub(crate) struct Relays {
    streams: HashMap<Uuid, Entry>,
}

impl Relays {
    /// Relays stream `id` to and from `other`.
    pub(crate) fn insert(&mut self, id: Uuid, other: Recipient<Relay>) {
        self.streams.insert(id, Entry { other, eofs: 0 });
    }

    /// A frame from this channel's peer: sent across if its stream is relayed
    /// (true), else left to the caller (false).
    pub(crate) fn relay_from_peer(&mut self, message: &Message, frame: &Bytes) -> bool {
        let Some(id) = relayed_id(message) else {
            return false;
        };
        let Some(entry) = self.streams.get(&id) else {
            return false;
        };
        entry.other.do_send(Relay::Frame {
            id,
            kind: message.message_type(),
            frame: frame.clone(),
        });
        self.track(id, message);
        true
    }

    /// A frame from the other end; true if this channel should send it on.
    pub(crate) fn accept_from_other(&mut self, id: Uuid, kind: MessageType, frame: &Bytes) -> bool {
        if !self.streams.contains_key(&id) {
            return false;
        }
        if kind == MessageType::Close
            && let Ok((message, _)) = Message::decode_bytes(frame)
        {
            self.track(id, &message);
        } else if kind == MessageType::ConnectFail {
            self.streams.remove(&id);
        }
        true
    }

    /// Forgets stream `id`; true if it was relayed.
    pub(crate) fn remove(&mut self, id: Uuid) -> bool {
        self.streams.remove(&id).is_some()
    }

    /// This channel ended: tells the other end of every relayed stream.
    pub(crate) fn end_all(&mut self) {
        for (id, entry) in self.streams.drain() {
            entry.other.do_send(Relay::Gone { id });
        }
    }

    /// Forgets a stream once it is over: aborted, refused, or eof both ways.
    fn track(&mut self, id: Uuid, message: &Message) {
        let over = match message {
            Message::Close {
                kind: CloseKind::Abort,
                ..
            }
            | Message::ConnectFail { .. } => true,
            Message::Close { .. } => self.streams.get_mut(&id).is_some_and(|e| {
                e.eofs += 1;
                e.eofs == 2
            }),
            _ => false,
        };
        if over {
            self.streams.remove(&id);
        }
    }
}

/// The stream id of a frame that belongs to a stream.
fn relayed_id(message: &Message) -> Option<Uuid> {
    match message {
        Message::Data { connection_id, .. }
        | Message::Window { connection_id, .. }
        | Message::Close { connection_id, .. }
        | Message::ConnectAck { connection_id }
        | Message::ConnectFail { connection_id, .. } => Some(*connection_id),
        _ => None,
    }
}
