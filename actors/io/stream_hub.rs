//! `StreamHub`: the sockets of one tunnel side's streams, as the control
//! channel (server) or the agent connection holds them. Not an actor: the
//! session's connection table decides; the hub carries its socket actions to
//! the `ForwardedConnection` actors, keeping those that arrive while a
//! socket is still being dialed.

use std::collections::HashMap;

use actix::Addr;
use uuid::Uuid;

use crate::actors::forwarded_connection::{ForwardedConnection, StreamCommand};
use crate::connections::ConnectionAction;

/// A tunnel side's stream sockets.
#[derive(Default)]
pub(crate) struct StreamHub {
    conns: HashMap<Uuid, Addr<ForwardedConnection>>,
    /// Commands for streams whose socket is still being dialed (bounded by the window).
    pending: HashMap<Uuid, Vec<StreamCommand>>,
}

impl StreamHub {
    /// Stream `id` is open in the table; its socket is not attached yet.
    pub(crate) fn expect(&mut self, id: Uuid) {
        self.pending.insert(id, Vec::new());
    }

    /// Attaches the socket's actor, handing it what arrived meanwhile. False
    /// if the stream ended while the socket was dialed (the socket is reset).
    pub(crate) fn attach(&mut self, id: Uuid, addr: Addr<ForwardedConnection>) -> bool {
        let Some(queued) = self.pending.remove(&id) else {
            addr.do_send(StreamCommand::Reset);
            return false;
        };
        queued.into_iter().for_each(|c| addr.do_send(c));
        self.conns.insert(id, addr);
        true
    }

    /// The stream's dial failed or was refused: nothing to attach.
    pub(crate) fn forget(&mut self, id: Uuid) {
        self.pending.remove(&id);
        if let Some(addr) = self.conns.remove(&id) {
            addr.do_send(StreamCommand::Reset);
        }
    }

    /// The peer refused stream `id`: its socket's actor offers the visitor
    /// to another replica if it may (and resets it otherwise); the table's
    /// reset that follows finds nothing left to do.
    pub(crate) fn refused(&mut self, id: Uuid) {
        self.pending.remove(&id);
        if let Some(addr) = self.conns.remove(&id) {
            addr.do_send(StreamCommand::Refused);
        }
    }

    /// The socket's actor stopped on its own.
    pub(crate) fn finished(&mut self, id: Uuid) {
        self.conns.remove(&id);
    }

    /// Carries out a socket action of the table; one that is not a
    /// stream's (a flow's, a relay's) comes back, for the caller.
    pub(crate) fn apply(&mut self, action: ConnectionAction) -> Option<ConnectionAction> {
        match action {
            ConnectionAction::Deliver { id, data } => {
                self.command(id, StreamCommand::Deliver(data))
            }
            ConnectionAction::Credit { id, increment } => {
                self.command(id, StreamCommand::Credit(increment))
            }
            ConnectionAction::ShutdownWrite { id } => {
                self.command(id, StreamCommand::ShutdownWrite)
            }
            ConnectionAction::Reset { id, reason } => {
                tracing::debug!(stream = %id, reason, "stream reset");
                self.forget(id);
            }
            other => return Some(other),
        }
        None
    }

    /// The tunnel ended: resets every socket.
    pub(crate) fn close_all(&mut self) {
        self.pending.clear();
        for (_, addr) in self.conns.drain() {
            addr.do_send(StreamCommand::Reset);
        }
    }

    fn command(&mut self, id: Uuid, command: StreamCommand) {
        if let Some(addr) = self.conns.get(&id) {
            addr.do_send(command);
        } else if let Some(queue) = self.pending.get_mut(&id) {
            queue.push(command);
        }
    }
}
