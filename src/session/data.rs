//! The data plane both sessions share: the link's connection table, fed
//! the peer's data-plane frames and the sockets' events, and what that means
//! for the peer and for the sockets.

use bytes::Bytes;
use uuid::Uuid;

use crate::connections::{ConnectionAction, ConnectionTable, StreamSettings};
use crate::outbound::Outbound;
use crate::protocol::Message;

/// What a forwarded connection's socket reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketEvent {
    /// Bytes read within the credit, already framed as `Data` by the reader.
    Read {
        /// The stream.
        id: Uuid,
        /// The whole `Data` frame.
        frame: Bytes,
        /// Payload bytes in it.
        len: usize,
    },
    /// The socket's read side ended (FIN).
    ReadEof {
        /// The stream.
        id: Uuid,
    },
    /// Bytes written to the socket: credit may go back.
    Delivered {
        /// The stream.
        id: Uuid,
        /// How many.
        len: usize,
    },
    /// The socket failed or was reset.
    Failed {
        /// The stream.
        id: Uuid,
    },
    /// The socket's actor stopped (both directions done, or reset).
    Finished {
        /// The stream.
        id: Uuid,
    },
}

/// What the data plane asks of its session.
#[derive(Debug)]
pub(crate) enum Emit {
    /// A message for the peer.
    Send(Message),
    /// A frame a reader encoded, for the peer.
    Write(Outbound),
    /// Something for a socket (deliver, credit, shut, reset, a flow, a relay).
    Socket(ConnectionAction),
}

/// A link's connection table, once the link is up.
#[derive(Debug, Default)]
pub(crate) struct DataPlane {
    table: Option<ConnectionTable>,
    scratch: Vec<ConnectionAction>,
}

impl DataPlane {
    /// The table of a link that just authenticated.
    pub(crate) fn start(&mut self, settings: StreamSettings) {
        self.table = Some(ConnectionTable::new(settings));
    }

    /// The table (none before authentication).
    pub(crate) fn table(&mut self) -> Option<&mut ConnectionTable> {
        self.table.as_mut()
    }

    /// The table, to read.
    pub(crate) fn get(&self) -> Option<&ConnectionTable> {
        self.table.as_ref()
    }

    /// A data-plane frame from the peer.
    pub(crate) fn on_frame(&mut self, message: Message, emit: &mut impl FnMut(Emit)) {
        let Some(table) = self.table.as_mut() else {
            return;
        };
        table.on_frame(message, &mut self.scratch);
        for action in self.scratch.drain(..) {
            emit(match action {
                ConnectionAction::Send(message) => Emit::Send(message),
                other => Emit::Socket(other),
            });
        }
    }

    /// An event of a stream's socket: what it asks of the session.
    pub(crate) fn socket_event(&mut self, event: SocketEvent) -> Vec<Emit> {
        let mut emitted = Vec::new();
        self.on_socket(event, &mut |e| emitted.push(e));
        emitted
    }

    fn on_socket(&mut self, event: SocketEvent, emit: &mut impl FnMut(Emit)) {
        let Some(table) = self.table.as_mut() else {
            return;
        };
        let reply = match event {
            SocketEvent::Read { id, frame, len } => {
                match table.spend(id, len) {
                    Ok(()) => emit(Emit::Write(Outbound::Data { id, frame })),
                    // bytes past the credit cannot be sent, nor dropped
                    // while the stream goes on: a short stream that ends
                    // cleanly would look complete. Reset it.
                    Err(e) => {
                        if let Some(abort) = table.local_reset(id) {
                            tracing::warn!(stream = %id, error = %e, "read past the credit; stream reset");
                            let reason = "read past the peer's credit";
                            emit(Emit::Socket(ConnectionAction::Reset { id, reason }));
                            emit(Emit::Send(abort));
                        }
                    }
                }
                return;
            }
            SocketEvent::ReadEof { id } => table.local_eof(id),
            SocketEvent::Delivered { id, len } => table.on_delivered(id, len),
            SocketEvent::Failed { id } | SocketEvent::Finished { id } => table.local_reset(id),
        };
        if let Some(message) = reply {
            emit(Emit::Send(message));
        }
    }

    /// A flow ended on its own (idle): the peer is told with an abort.
    pub(crate) fn flow_ended(&mut self, id: Uuid) -> Vec<Emit> {
        let close = self.table.as_mut().and_then(|t| t.local_reset(id));
        close.map(Emit::Send).into_iter().collect()
    }

    /// The link ended: every connection, to close.
    pub(crate) fn drain(&mut self) -> Vec<(Uuid, crate::connections::ConnectionKind)> {
        self.table
            .as_mut()
            .map(ConnectionTable::drain)
            .unwrap_or_default()
    }
}
