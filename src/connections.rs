//! One side's table of a tunnel's connections: TCP streams (docs/PROTOCOL.md
//! §4.3), UDP flows (§4.4) and, on the server, relayed access streams (§4.5),
//! in one id space with one dispatch. The owning actor feeds it frames from
//! the peer and local events (bytes read, bytes written, EOF, reset, a flow
//! ended) and carries out the returned actions. Errors abort one stream,
//! never the tunnel.

use std::collections::HashMap;

use bytes::Bytes;
use uuid::Uuid;

use crate::flow::{FlowError, RecvWindow, SendWindow, WindowBudget};
use crate::protocol::{CloseKind, Message, MessageType};

/// Why a stream could not be opened or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The tunnel already has its maximum of open streams.
    #[error("tunnel is at its limit of {max} streams")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// The id is already in use.
    #[error("stream {0} already exists")]
    Duplicate(Uuid),
    /// The id names no open stream.
    #[error("stream {0} is not open")]
    Unknown(Uuid),
    /// Data after this side's EOF, or beyond the peer's credit.
    #[error("stream {id}: {reason}")]
    Refused {
        /// The stream.
        id: Uuid,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Window settings of one tunnel side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Most streams open at once.
    pub max_streams: usize,
    /// Initial window we announced (what the peer may send per new stream).
    pub recv_initial: u32,
    /// Largest window a busy stream grows to.
    pub recv_max: u32,
    /// Initial window the peer announced (what we may send per new stream).
    pub send_initial: u32,
    /// Credit shared by the streams for growing their windows.
    pub budget: u64,
}

/// What the owning actor must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionAction {
    /// Write these bytes to the stream's socket, in order.
    Deliver {
        /// The stream.
        id: Uuid,
        /// The bytes.
        data: Bytes,
    },
    /// The peer granted credit: the socket reader may read this much more.
    Credit {
        /// The stream.
        id: Uuid,
        /// Bytes of credit.
        increment: u32,
    },
    /// The peer half-closed: shut the socket's write side once pending bytes are written.
    ShutdownWrite {
        /// The stream.
        id: Uuid,
    },
    /// The stream is gone: drop its socket now (reset) and discard its queue.
    Reset {
        /// The stream.
        id: Uuid,
        /// Why, for the log.
        reason: &'static str,
    },
    /// Send this message to the peer.
    Send(Message),
    /// Flow `id` is over (the peer closed or refused it): forget its socket.
    ForgetFlow {
        /// The flow.
        id: Uuid,
    },
    /// A datagram of flow `id` from the peer: send it on.
    Datagram {
        /// The flow.
        id: Uuid,
        /// The whole datagram.
        data: Bytes,
    },
    /// A datagram for no flow (a race after it ended): dropped, to count.
    DatagramDropped,
    /// The frame belongs to relayed stream `id`: pass it, as it came, to
    /// the other end's channel.
    Relay {
        /// The stream.
        id: Uuid,
        /// The relay is over with this frame (aborted, refused, eof both
        /// ways): forget the other end's channel after passing it.
        last: bool,
    },
}

/// What a connection id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A TCP stream with its credit windows.
    Stream,
    /// A UDP flow.
    Flow,
    /// An access stream the server passes between two channels.
    Relay,
}

#[derive(Debug)]
struct Stream {
    send: SendWindow,
    recv: RecvWindow,
    sent_eof: bool,
    got_eof: bool,
}

#[derive(Debug)]
enum Entry {
    Stream(Stream),
    Flow,
    /// Eofs seen, from either end: the relay is over at two.
    Relay {
        eofs: u8,
    },
}

/// The connections of one tunnel, seen from one side.
#[derive(Debug)]
pub struct ConnectionTable {
    entries: HashMap<Uuid, Entry>,
    /// Entries that are streams (the stream limit counts only these).
    streams: usize,
    /// Entries that are UDP flows.
    flows: usize,
    budget: WindowBudget,
    settings: StreamSettings,
}

impl ConnectionTable {
    /// An empty table.
    pub fn new(settings: StreamSettings) -> Self {
        Self {
            entries: HashMap::new(),
            streams: 0,
            flows: 0,
            budget: WindowBudget::new(settings.budget),
            settings,
        }
    }

    /// Open streams.
    pub fn len(&self) -> usize {
        self.streams
    }

    /// True when no connection of any kind is open.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Open UDP flows.
    pub fn flows(&self) -> usize {
        self.flows
    }

    /// Connections of every kind.
    pub fn connections(&self) -> usize {
        self.entries.len()
    }

    /// True when `id` is an open stream.
    pub fn contains(&self, id: Uuid) -> bool {
        self.kind(id) == Some(ConnectionKind::Stream)
    }

    /// What `id` names, if it is open.
    pub fn kind(&self, id: Uuid) -> Option<ConnectionKind> {
        self.entries.get(&id).map(|entry| match entry {
            Entry::Stream(_) => ConnectionKind::Stream,
            Entry::Flow => ConnectionKind::Flow,
            Entry::Relay { .. } => ConnectionKind::Relay,
        })
    }

    /// Bytes this side may send on `id` before more credit arrives (0 if unknown).
    pub fn send_credit(&self, id: Uuid) -> u32 {
        self.stream(id).map_or(0, |s| s.send.credit())
    }

    /// Opens `id` (a visitor accepted, a `Connect` or `Open` received).
    pub fn open(&mut self, id: Uuid) -> Result<(), StreamError> {
        if self.streams >= self.settings.max_streams {
            return Err(StreamError::TooMany {
                max: self.settings.max_streams,
            });
        }
        let s = &self.settings;
        let stream = Stream {
            send: SendWindow::new(s.send_initial),
            recv: RecvWindow::new(s.recv_initial, s.recv_max),
            sent_eof: false,
            got_eof: false,
        };
        self.insert(id, Entry::Stream(stream))?;
        self.streams += 1;
        Ok(())
    }

    /// Opens `id` for an `Open` stream, relayed end to end by the server:
    /// neither end knows the other's initial window, so each starts with no
    /// send credit and grants its receive window explicitly. Returns that
    /// `Window`, to send to the peer.
    pub fn open_relayed(&mut self, id: Uuid) -> Result<Message, StreamError> {
        self.open(id)?;
        let recv_initial = self.settings.recv_initial;
        if let Some(stream) = self.stream_mut(id) {
            stream.send = SendWindow::new(0);
        }
        Ok(Message::Window {
            connection_id: id,
            increment: recv_initial,
        })
    }

    /// Opens UDP flow `id` (its limits are the UDP listener's, not the streams').
    pub fn open_flow(&mut self, id: Uuid) -> Result<(), StreamError> {
        self.insert(id, Entry::Flow)?;
        self.flows += 1;
        Ok(())
    }

    /// Opens relayed access stream `id` (server side: its frames pass
    /// between two channels; the ends run its windows).
    pub fn open_relay(&mut self, id: Uuid) -> Result<(), StreamError> {
        self.insert(id, Entry::Relay { eofs: 0 })
    }

    /// Handles a data-plane frame from the peer (`Data`, `Window`, `Close`,
    /// `Datagram`, `ConnectAck`, `ConnectFail`), whatever its connection's
    /// kind; other messages produce nothing.
    pub fn on_frame(&mut self, message: Message, out: &mut Vec<ConnectionAction>) {
        let Some(id) = connection_of(&message) else {
            return;
        };
        match self.kind(id) {
            Some(ConnectionKind::Stream) => self.on_stream_frame(id, message, out),
            Some(ConnectionKind::Flow) => self.on_flow_frame(id, message, out),
            Some(ConnectionKind::Relay) => {
                let last = self.track_relay(id, &message);
                out.push(ConnectionAction::Relay { id, last });
            }
            None => on_unknown(id, message, out),
        }
    }

    fn on_stream_frame(&mut self, id: Uuid, message: Message, out: &mut Vec<ConnectionAction>) {
        match message {
            Message::Data { data, .. } => self.on_data(id, data, out),
            Message::Window { increment, .. } => self.on_window(id, increment, out),
            Message::Close { kind, .. } => self.on_close(id, kind, out),
            Message::ConnectFail { .. } if self.refused(id) => {
                out.push(ConnectionAction::Reset {
                    id,
                    reason: "the peer refused the stream",
                });
            }
            _ => {} // ConnectAck: open both ways; a Datagram for a stream: ignored
        }
    }

    fn on_flow_frame(&mut self, id: Uuid, message: Message, out: &mut Vec<ConnectionAction>) {
        match message {
            Message::Datagram { data, .. } => out.push(ConnectionAction::Datagram { id, data }),
            Message::Close { .. } | Message::ConnectFail { .. } => {
                self.remove(id);
                out.push(ConnectionAction::ForgetFlow { id });
            }
            Message::Data { .. } => {
                // stream bytes for a flow: lost, as for an unknown stream
                self.remove(id);
                out.push(ConnectionAction::ForgetFlow { id });
                out.push(ConnectionAction::Send(abort(id)));
            }
            _ => {}
        }
    }

    fn on_data(&mut self, id: Uuid, data: Bytes, out: &mut Vec<ConnectionAction>) {
        let Some(stream) = self.stream_mut(id) else {
            return;
        };
        if stream.got_eof {
            return self.abort(id, "data after the peer's eof", out);
        }
        match stream.recv.on_data(data.len()) {
            Ok(()) => out.push(ConnectionAction::Deliver { id, data }),
            Err(FlowError::Overrun { .. } | FlowError::Overflow { .. }) => {
                self.abort(id, "peer overran the stream window", out);
            }
        }
    }

    fn on_window(&mut self, id: Uuid, increment: u32, out: &mut Vec<ConnectionAction>) {
        let Some(stream) = self.stream_mut(id) else {
            return;
        };
        match stream.send.grant(increment) {
            Ok(()) => out.push(ConnectionAction::Credit { id, increment }),
            Err(_) => self.abort(id, "peer's window increment overflowed", out),
        }
    }

    fn on_close(&mut self, id: Uuid, kind: CloseKind, out: &mut Vec<ConnectionAction>) {
        let Some(stream) = self.stream_mut(id) else {
            return;
        };
        match kind {
            CloseKind::Abort => {
                self.remove(id);
                out.push(ConnectionAction::Reset {
                    id,
                    reason: "peer aborted the stream",
                });
            }
            CloseKind::Eof if !stream.got_eof => {
                stream.got_eof = true;
                let done = stream.sent_eof;
                out.push(ConnectionAction::ShutdownWrite { id });
                if done {
                    self.remove(id);
                }
            }
            CloseKind::Eof => {}
        }
    }

    /// Builds the `Data` for `data` read from the socket; refuses more than the credit.
    pub fn send_data(&mut self, id: Uuid, data: Bytes) -> Result<Message, StreamError> {
        let message = Message::data(id, data.clone()).map_err(|_| StreamError::Refused {
            id,
            reason: "chunk larger than a frame",
        })?;
        self.spend(id, data.len())?;
        Ok(message)
    }

    /// Accounts for `len` bytes about to be sent on `id` (in a frame built by
    /// the caller); refuses more than the credit, or data after our eof.
    pub fn spend(&mut self, id: Uuid, len: usize) -> Result<(), StreamError> {
        let stream = self.stream_mut(id).ok_or(StreamError::Unknown(id))?;
        if stream.sent_eof {
            return Err(StreamError::Refused {
                id,
                reason: "data after our eof",
            });
        }
        if stream.send.allowance(len) < len {
            return Err(StreamError::Refused {
                id,
                reason: "more data than the peer's credit",
            });
        }
        stream.send.spend(len);
        Ok(())
    }

    /// `len` bytes of `id` reached the socket; returns the `Window` to send, if due.
    pub fn on_delivered(&mut self, id: Uuid, len: usize) -> Option<Message> {
        let Some(Entry::Stream(stream)) = self.entries.get_mut(&id) else {
            return None;
        };
        if stream.got_eof {
            return None; // the peer sends no more: no credit needed
        }
        let increment = stream.recv.on_delivered(len, &mut self.budget)?;
        Message::window(id, increment).ok()
    }

    /// The socket's read side ended: the `Close eof` to send.
    pub fn local_eof(&mut self, id: Uuid) -> Option<Message> {
        let stream = self.stream_mut(id)?;
        if stream.sent_eof {
            return None;
        }
        stream.sent_eof = true;
        if stream.got_eof {
            self.remove(id);
        }
        Some(Message::Close {
            connection_id: id,
            kind: CloseKind::Eof,
        })
    }

    /// The socket failed or was reset (a stream), or the flow ended on its
    /// own: forgets `id`; the `Close abort` to send.
    pub fn local_reset(&mut self, id: Uuid) -> Option<Message> {
        self.remove(id)?;
        Some(abort(id))
    }

    /// The stream was refused (a `ConnectFail`, a failed dial): forgets it.
    pub fn refused(&mut self, id: Uuid) -> bool {
        self.remove(id).is_some()
    }

    /// A frame of relayed stream `id` from the other end's channel, about to
    /// go to our peer: `None` if `id` is not relayed here (then it is not
    /// sent), else whether the relay is over with it.
    pub fn relay_from_other(
        &mut self,
        id: Uuid,
        kind: MessageType,
        close: Option<CloseKind>,
    ) -> Option<bool> {
        if self.kind(id) != Some(ConnectionKind::Relay) {
            return None;
        }
        Some(self.track_end(id, kind, close))
    }

    /// Forgets `id` whatever it is; what it was.
    pub fn forget(&mut self, id: Uuid) -> Option<ConnectionKind> {
        let kind = self.kind(id)?;
        self.remove(id);
        Some(kind)
    }

    /// The tunnel ended: forgets every connection and returns them, to close.
    pub fn drain(&mut self) -> Vec<(Uuid, ConnectionKind)> {
        let all: Vec<_> = (self.entries.keys())
            .filter_map(|id| Some((*id, self.kind(*id)?)))
            .collect();
        all.iter().for_each(|(id, _)| {
            self.remove(*id);
        });
        all
    }

    /// Credit left in the growth budget.
    pub fn budget_available(&self) -> u64 {
        self.budget.available()
    }

    /// Forgets a relayed stream once it is over; true if it is.
    fn track_relay(&mut self, id: Uuid, message: &Message) -> bool {
        let close = match message {
            Message::Close { kind, .. } => Some(*kind),
            _ => None,
        };
        self.track_end(id, message.message_type(), close)
    }

    /// A relayed stream is over when aborted, refused, or eof both ways.
    fn track_end(&mut self, id: Uuid, kind: MessageType, close: Option<CloseKind>) -> bool {
        let Some(Entry::Relay { eofs }) = self.entries.get_mut(&id) else {
            return false;
        };
        let over = match (kind, close) {
            (MessageType::ConnectFail, _) | (_, Some(CloseKind::Abort)) => true,
            (_, Some(CloseKind::Eof)) => {
                *eofs += 1;
                *eofs == 2
            }
            _ => false,
        };
        if over {
            self.remove(id);
        }
        over
    }

    fn abort(&mut self, id: Uuid, reason: &'static str, out: &mut Vec<ConnectionAction>) {
        self.remove(id);
        out.push(ConnectionAction::Reset { id, reason });
        out.push(ConnectionAction::Send(abort(id)));
    }

    fn insert(&mut self, id: Uuid, entry: Entry) -> Result<(), StreamError> {
        match self.entries.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => Err(StreamError::Duplicate(id)),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(entry);
                Ok(())
            }
        }
    }

    fn stream(&self, id: Uuid) -> Option<&Stream> {
        match self.entries.get(&id) {
            Some(Entry::Stream(stream)) => Some(stream),
            _ => None,
        }
    }

    fn stream_mut(&mut self, id: Uuid) -> Option<&mut Stream> {
        match self.entries.get_mut(&id) {
            Some(Entry::Stream(stream)) => Some(stream),
            _ => None,
        }
    }

    fn remove(&mut self, id: Uuid) -> Option<()> {
        match self.entries.remove(&id)? {
            Entry::Stream(mut stream) => {
                self.streams -= 1;
                stream.recv.release(&mut self.budget);
            }
            Entry::Flow => self.flows -= 1,
            Entry::Relay { .. } => {}
        }
        Some(())
    }
}

/// The connection a data-plane frame belongs to (`None` for a control message).
pub fn connection_of(message: &Message) -> Option<Uuid> {
    match message {
        Message::Data { connection_id, .. }
        | Message::Window { connection_id, .. }
        | Message::Close { connection_id, .. }
        | Message::Datagram { connection_id, .. }
        | Message::ConnectAck { connection_id }
        | Message::ConnectFail { connection_id, .. } => Some(*connection_id),
        _ => None,
    }
}

/// A frame for a connection this side does not know (or no longer knows):
/// `Data` is answered with an abort, since its bytes are lost; a datagram is
/// dropped and counted; a `Window` or `Close` is a race after a close (never
/// answered, so they cannot loop).
fn on_unknown(id: Uuid, message: Message, out: &mut Vec<ConnectionAction>) {
    match message {
        Message::Data { .. } => out.push(ConnectionAction::Send(abort(id))),
        Message::Datagram { .. } => out.push(ConnectionAction::DatagramDropped),
        _ => {}
    }
}

fn abort(id: Uuid) -> Message {
    Message::Close {
        connection_id: id,
        kind: CloseKind::Abort,
    }
}

#[cfg(test)]
mod tests;
