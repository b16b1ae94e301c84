//! Relayed access streams (docs/PROTOCOL.md §4.5): an access client's `Open`
//! is passed to the control channel of the agent that registered the service,
//! and from then on every frame of that stream id goes across, as encoded,
//! between the two channels. The server keeps no stream state for them: the
//! two ends run flow control between themselves (each grants its window with
//! an explicit `Window`), so what crosses is bounded by their windows. The
//! connection table decides which frames are a relay's and when it is over.
//! A relayed UDP flow (a peer's forwarded visitor) has no windows: its
//! datagrams cross within the receiving channel's budget, and past it are
//! dropped and counted, as any datagram over a budget is.

use std::collections::HashMap;

use actix::prelude::*;
use bytes::Bytes;
use uuid::Uuid;

use crate::budget::Budget;
use crate::protocol::{CloseKind, MessageType, ServiceProtocol};

/// A channel, as the other end of relays: where their frames go, and the
/// bytes of datagrams that may be on their way to it.
#[derive(Clone, Debug)]
pub(crate) struct RelayEnd {
    pub(crate) to: Recipient<Relay>,
    pub(crate) datagrams: Budget,
    /// Its peer announced `ACCESS`: access streams may be relayed to it.
    pub(crate) takes_access: bool,
}

/// Between two control channels, about a relayed stream.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(crate) enum Relay {
    /// An access client opens stream (or flow) `id` to `service` (to the agent's channel).
    Open {
        id: Uuid,
        service: String,
        target: String,
        protocol: ServiceProtocol,
        /// A peer's forwarded visitor: its address, the public address.
        visitor: (String, String),
        /// The access client's channel.
        from: RelayEnd,
    },
    /// A frame of stream `id` from the other end, for this channel's peer.
    Frame {
        id: Uuid,
        kind: MessageType,
        /// The kind of a `Close`, which decides when the relay is over.
        close: Option<CloseKind>,
        frame: Bytes,
    },
    /// The other end's channel ended: abort stream `id`.
    Gone { id: Uuid },
}

/// One channel's relayed streams: the other end's channel of each. Which
/// frames belong to a relay, and when it is over, is the connection table's
/// (`ConnectionKind::Relay`); this holds only the recipients.
#[derive(Default)]
pub(crate) struct Relays {
    others: HashMap<Uuid, RelayEnd>,
}

impl Relays {
    /// Relays stream `id` to and from `other`.
    pub(crate) fn insert(&mut self, id: Uuid, other: RelayEnd) {
        self.others.insert(id, other);
    }

    /// Passes a frame of relayed stream `id` from this channel's peer to the
    /// other end; `last`: the relay is over, forget it. False if it was a
    /// datagram over the other end's budget (dropped).
    pub(crate) fn pass(
        &mut self,
        id: Uuid,
        message_kind: MessageType,
        close: Option<CloseKind>,
        frame: Bytes,
        last: bool,
    ) -> bool {
        let other = if last {
            self.others.remove(&id)
        } else {
            self.others.get(&id).cloned()
        };
        let Some(other) = other else {
            return true;
        };
        if message_kind == MessageType::Datagram && !other.datagrams.take(frame.len()) {
            return false;
        }
        other.to.do_send(Relay::Frame {
            id,
            kind: message_kind,
            close,
            frame,
        });
        true
    }

    /// Forgets stream `id`; true if it was relayed.
    pub(crate) fn remove(&mut self, id: Uuid) -> bool {
        self.others.remove(&id).is_some()
    }

    /// This channel ended: tells the other end of every relayed stream.
    pub(crate) fn end_all(&mut self) {
        for (id, other) in self.others.drain() {
            other.to.do_send(Relay::Gone { id });
        }
    }
}
