//! `StreamHub`: the connections of one tunnel side, as the control channel
//! (server) or the agent connection holds them. Not an actor: it joins the
//! sans-IO [`ConnectionTable`] (streams, flows and relays in one id space) to
//! the `ForwardedConnection` actors, carrying out the table's stream actions
//! and handing the rest (flows, relays) back to its owner.

use std::collections::HashMap;

use actix::Addr;
use uuid::Uuid;

use crate::actors::forwarded_connection::{ForwardedConnection, StreamCommand, StreamEvent};
use crate::connections::{
    ConnectionAction, ConnectionKind, ConnectionTable, StreamError, StreamSettings,
};
use crate::outbound::Outbound;
use crate::protocol::Message;

/// A tunnel side's streams and their connection actors.
pub(crate) struct StreamHub {
    table: ConnectionTable,
    conns: HashMap<Uuid, Addr<ForwardedConnection>>,
    /// Commands for streams whose socket is still being dialed (bounded by the window).
    pending: HashMap<Uuid, Vec<StreamCommand>>,
    actions: Vec<ConnectionAction>,
}

impl StreamHub {
    pub(crate) fn new(settings: StreamSettings) -> Self {
        Self {
            table: ConnectionTable::new(settings),
            conns: HashMap::new(),
            pending: HashMap::new(),
            actions: Vec::new(),
        }
    }

    /// Open streams.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// The table, for what is not a stream's socket (flows, relays).
    pub(crate) fn table(&mut self) -> &mut ConnectionTable {
        &mut self.table
    }

    /// Opens a stream whose socket is not attached yet.
    pub(crate) fn open(&mut self, id: Uuid) -> Result<(), StreamError> {
        self.table.open(id)?;
        self.pending.insert(id, Vec::new());
        Ok(())
    }

    /// Opens a relayed (`Open`) stream whose socket is not attached yet; the
    /// `Window` to send (see `ConnectionTable::open_relayed`).
    pub(crate) fn open_relayed(&mut self, id: Uuid) -> Result<Message, StreamError> {
        let window = self.table.open_relayed(id)?;
        self.pending.insert(id, Vec::new());
        Ok(window)
    }

    /// Attaches the socket's actor, handing it what arrived meanwhile. False
    /// if the stream ended while the socket was dialed.
    pub(crate) fn attach(&mut self, id: Uuid, addr: Addr<ForwardedConnection>) -> bool {
        let Some(queued) = self.pending.remove(&id) else {
            addr.do_send(StreamCommand::Reset);
            return false;
        };
        queued.into_iter().for_each(|c| addr.do_send(c));
        self.conns.insert(id, addr);
        true
    }

    /// The peer refused or the socket could not be dialed: forgets the stream.
    pub(crate) fn refuse(&mut self, id: Uuid) {
        self.table.refused(id);
        self.pending.remove(&id);
        if let Some(addr) = self.conns.remove(&id) {
            addr.do_send(StreamCommand::Reset);
        }
    }

    /// A data-plane frame from the peer: what concerns a stream's socket is
    /// done here, frames for the peer go to `send`, the rest (flows, relays)
    /// to `rest`.
    pub(crate) fn on_frame(
        &mut self,
        message: Message,
        send: &mut impl FnMut(Outbound),
        rest: &mut Vec<ConnectionAction>,
    ) {
        let mut actions = std::mem::take(&mut self.actions);
        self.table.on_frame(message, &mut actions);
        for action in actions.drain(..) {
            self.apply(action, send, rest);
        }
        self.actions = actions;
    }

    /// An event from a connection actor.
    pub(crate) fn on_event(&mut self, event: StreamEvent, send: &mut impl FnMut(Outbound)) {
        let reply = match event {
            StreamEvent::Read { id, frame, len } => {
                match self.table.spend(id, len) {
                    Ok(()) => send(Outbound::Data { id, frame }),
                    Err(e) => tracing::debug!(error = %e, "read dropped"),
                }
                return;
            }
            StreamEvent::ReadEof { id } => self.table.local_eof(id),
            StreamEvent::Delivered { id, len } => self.table.on_delivered(id, len),
            StreamEvent::Failed { id } => self.table.local_reset(id),
            StreamEvent::Finished { id } => {
                self.conns.remove(&id);
                self.table.local_reset(id)
            }
        };
        if let Some(message) = reply {
            send(Outbound::Message(message));
        }
    }

    /// The tunnel ended: resets every socket; the connections that are not
    /// streams, for the owner to end.
    pub(crate) fn close_all(&mut self) -> Vec<(Uuid, ConnectionKind)> {
        let mut others = self.table.drain();
        others.retain(|(_, kind)| *kind != ConnectionKind::Stream);
        self.pending.clear();
        for (_, addr) in self.conns.drain() {
            addr.do_send(StreamCommand::Reset);
        }
        others
    }

    fn apply(
        &mut self,
        action: ConnectionAction,
        send: &mut impl FnMut(Outbound),
        rest: &mut Vec<ConnectionAction>,
    ) {
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
                self.pending.remove(&id);
                if let Some(addr) = self.conns.remove(&id) {
                    addr.do_send(StreamCommand::Reset);
                }
            }
            ConnectionAction::Send(message) => send(Outbound::Message(message)),
            other => rest.push(other),
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
