//! One side's table of a tunnel's streams: the rules of docs/PROTOCOL.md §4.3
//! as a pure state machine. The owning actor feeds it frames from the peer and
//! local events (bytes read, bytes written, EOF, reset) and carries out the
//! returned actions. Errors abort one stream, never the tunnel.

use std::collections::HashMap;

use bytes::Bytes;
use uuid::Uuid;

use crate::flow::{FlowError, RecvWindow, SendWindow, WindowBudget};
use crate::protocol::{CloseKind, Message};

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
pub enum StreamAction {
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
}

#[derive(Debug)]
struct Stream {
    send: SendWindow,
    recv: RecvWindow,
    sent_eof: bool,
    got_eof: bool,
}

/// The streams of one tunnel, seen from one side.
#[derive(Debug)]
pub struct StreamTable {
    streams: HashMap<Uuid, Stream>,
    budget: WindowBudget,
    settings: StreamSettings,
}

impl StreamTable {
    /// An empty table.
    pub fn new(settings: StreamSettings) -> Self {
        Self {
            streams: HashMap::new(),
            budget: WindowBudget::new(settings.budget),
            settings,
        }
    }

    /// Open streams.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// True when no stream is open.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// True when `id` is open.
    pub fn contains(&self, id: Uuid) -> bool {
        self.streams.contains_key(&id)
    }

    /// Bytes this side may send on `id` before more credit arrives (0 if unknown).
    pub fn send_credit(&self, id: Uuid) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.send.credit())
    }

    /// Opens `id` (a visitor accepted, a `Connect` or `Open` received).
    pub fn open(&mut self, id: Uuid) -> Result<(), StreamError> {
        if self.streams.len() >= self.settings.max_streams {
            return Err(StreamError::TooMany {
                max: self.settings.max_streams,
            });
        }
        if self.streams.contains_key(&id) {
            return Err(StreamError::Duplicate(id));
        }
        let s = &self.settings;
        self.streams.insert(
            id,
            Stream {
                send: SendWindow::new(s.send_initial),
                recv: RecvWindow::new(s.recv_initial, s.recv_max),
                sent_eof: false,
                got_eof: false,
            },
        );
        Ok(())
    }

    /// Opens `id` for an `Open` stream, relayed end to end by the server:
    /// neither end knows the other's initial window, so each starts with no
    /// send credit and grants its receive window explicitly. Returns that
    /// `Window`, to send to the peer.
    pub fn open_relayed(&mut self, id: Uuid) -> Result<Message, StreamError> {
        self.open(id)?;
        let recv_initial = self.settings.recv_initial;
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.send = SendWindow::new(0);
        }
        Ok(Message::Window {
            connection_id: id,
            increment: recv_initial,
        })
    }

    /// Handles a stream frame from the peer (`Data`, `Window`, `Close`); other
    /// messages are not stream frames and produce nothing.
    pub fn on_frame(&mut self, message: Message, out: &mut Vec<StreamAction>) {
        match message {
            Message::Data {
                connection_id,
                data,
            } => self.on_data(connection_id, data, out),
            Message::Window {
                connection_id,
                increment,
            } => self.on_window(connection_id, increment, out),
            Message::Close {
                connection_id,
                kind,
            } => self.on_close(connection_id, kind, out),
            _ => {}
        }
    }

    fn on_data(&mut self, id: Uuid, data: Bytes, out: &mut Vec<StreamAction>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            out.push(StreamAction::Send(Message::Close {
                connection_id: id,
                kind: CloseKind::Abort,
            }));
            return;
        };
        if stream.got_eof {
            return self.abort(id, "data after the peer's eof", out);
        }
        match stream.recv.on_data(data.len()) {
            Ok(()) => out.push(StreamAction::Deliver { id, data }),
            Err(FlowError::Overrun { .. } | FlowError::Overflow { .. }) => {
                self.abort(id, "peer overran the stream window", out);
            }
        }
    }

    fn on_window(&mut self, id: Uuid, increment: u32, out: &mut Vec<StreamAction>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return; // a race after close: ignored
        };
        match stream.send.grant(increment) {
            Ok(()) => out.push(StreamAction::Credit { id, increment }),
            Err(_) => self.abort(id, "peer's window increment overflowed", out),
        }
    }

    fn on_close(&mut self, id: Uuid, kind: CloseKind, out: &mut Vec<StreamAction>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return; // never answer a Close with a Close
        };
        match kind {
            CloseKind::Abort => {
                self.remove(id);
                out.push(StreamAction::Reset {
                    id,
                    reason: "peer aborted the stream",
                });
            }
            CloseKind::Eof if !stream.got_eof => {
                stream.got_eof = true;
                out.push(StreamAction::ShutdownWrite { id });
                if stream.sent_eof {
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
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
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
        let stream = self.streams.get_mut(&id)?;
        if stream.got_eof {
            return None; // the peer sends no more: no credit needed
        }
        let increment = stream.recv.on_delivered(len, &mut self.budget)?;
        Message::window(id, increment).ok()
    }

    /// The socket's read side ended: the `Close eof` to send.
    pub fn local_eof(&mut self, id: Uuid) -> Option<Message> {
        let stream = self.streams.get_mut(&id)?;
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

    /// The socket failed or was reset: forgets `id`; the `Close abort` to send.
    pub fn local_reset(&mut self, id: Uuid) -> Option<Message> {
        self.remove(id)?;
        Some(Message::Close {
            connection_id: id,
            kind: CloseKind::Abort,
        })
    }

    /// The peer refused the stream (`ConnectFail`): forgets it.
    pub fn refused(&mut self, id: Uuid) -> bool {
        self.remove(id).is_some()
    }

    /// The tunnel ended: forgets every stream and returns their ids, to reset.
    pub fn drain(&mut self) -> Vec<Uuid> {
        let ids: Vec<Uuid> = self.streams.keys().copied().collect();
        ids.iter().for_each(|id| {
            self.remove(*id);
        });
        ids
    }

    /// Credit left in the growth budget.
    pub fn budget_available(&self) -> u64 {
        self.budget.available()
    }

    fn abort(&mut self, id: Uuid, reason: &'static str, out: &mut Vec<StreamAction>) {
        self.remove(id);
        out.push(StreamAction::Reset { id, reason });
        out.push(StreamAction::Send(Message::Close {
            connection_id: id,
            kind: CloseKind::Abort,
        }));
    }

    fn remove(&mut self, id: Uuid) -> Option<()> {
        let mut stream = self.streams.remove(&id)?;
        stream.recv.release(&mut self.budget);
        Some(())
    }
}

#[cfg(test)]
mod tests;
