//! A visitor's second chance: while its agent has not answered, a copy of
//! what the visitor sent (at most [`RETRY_LIMIT`]); if the agent refuses the
//! stream (its local dial failed), the socket and the copy go back to the
//! service's listener, which offers them once to another replica.

use bytes::BytesMut;

use super::*;
use crate::actors::service_listener::RetryVisitor;
use crate::protocol::{DATA_FRAME_OVERHEAD, Message};

/// Most bytes of a visitor's opening kept for its second chance: a first
/// request, a TLS hello, a database's startup message. A visitor that sends
/// more before its agent answers is not retried.
pub(crate) const RETRY_LIMIT: usize = 16 * 1024;

/// What a visitor with a second chance sent, and where to go with it.
pub(super) struct Retry {
    chance: SecondChance,
    sent: BytesMut,
}

impl Retry {
    pub(super) fn new(chance: SecondChance) -> Self {
        Self {
            chance,
            sent: BytesMut::new(),
        }
    }

    /// Keeps a copy of the payload of `frame` (a `Data` frame just read);
    /// past [`RETRY_LIMIT`], the second chance is given up.
    pub(super) fn keep(retry: &mut Option<Self>, frame: &Bytes) {
        let Some(kept) = retry.as_mut() else {
            return;
        };
        let payload = frame.get(DATA_FRAME_OVERHEAD..).unwrap_or_default();
        if kept.sent.len() + payload.len() > RETRY_LIMIT {
            *retry = None;
        } else {
            kept.sent.extend_from_slice(payload);
        }
    }
}

impl ForwardedConnection {
    /// The agent refused the stream: the visitor goes back to its listener
    /// with what it sent (a duplicate of the socket's descriptor, so that
    /// this actor's end closes nothing), or is reset if it has no second
    /// chance.
    pub(super) fn refused(&mut self, ctx: &mut Context<Self>) {
        let Some(retry) = self.retry.take() else {
            return self.reset_now(ctx);
        };
        match hand_over(&self.socket) {
            Ok((socket, peer)) => {
                retry.chance.listener.do_send(RetryVisitor {
                    socket,
                    peer,
                    sent: retry.sent.freeze(),
                    refused_by: retry.chance.replica,
                });
                // no events, no reset: the socket lives on elsewhere
                self.reset = true;
                ctx.stop();
            }
            Err(error) => {
                tracing::debug!(stream = %self.wiring.id, %error, "cannot hand the visitor over; resetting");
                self.reset_now(ctx);
            }
        }
    }

    /// Starts the actor on a visitor another replica refused: what it had
    /// sent goes first (the event returned), then its socket is read.
    pub(super) fn start_replaying(
        socket: TcpStream,
        wiring: StreamWiring,
        sent: Bytes,
    ) -> (Addr<Self>, Option<StreamEvent>) {
        let (id, len) = (wiring.id, sent.len());
        let credit = (wiring.initial_credit as usize).saturating_sub(len);
        let event = Message::data(id, sent).map(|data| {
            let frame = data.to_bytes();
            let frame = wiring.gate.hold(frame.len()).attach(frame);
            StreamEvent(SocketEvent::Read { id, frame, len })
        });
        let addr = Self::start_with_credit(socket, wiring, credit, None);
        match event {
            Ok(event) => (addr, Some(event)),
            // cannot be: the copy is smaller than a frame's payload
            Err(error) => {
                tracing::warn!(stream = %id, %error, "cannot replay a retried visitor's bytes");
                addr.do_send(StreamCommand::Reset);
                (addr, Some(StreamEvent(SocketEvent::Failed { id })))
            }
        }
    }
}

/// A second descriptor of `socket`, registered with this thread's reactor,
/// and its peer's address.
fn hand_over(socket: &TcpStream) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    let peer = socket.peer_addr()?;
    let duplicate = socket2::SockRef::from(socket).try_clone()?;
    let duplicate = std::net::TcpStream::from(duplicate);
    duplicate.set_nonblocking(true)?;
    Ok((TcpStream::from_std(duplicate)?, peer))
}
