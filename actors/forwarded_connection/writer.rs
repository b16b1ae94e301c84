//! The connection's write side: what the channel delivers goes straight to
//! the socket when it takes it, the rest waits in the queue and leaves in one
//! vectored write at a time; a half-close from the peer becomes a FIN once
//! the queue is written.

use super::*;

impl ForwardedConnection {
    /// Writes `data` at once when the socket takes it (no copy, no spawned
    /// write); what must wait is copied out of the WebSocket read buffer it was
    /// sliced from, so that a stalled socket pins nothing larger than itself.
    /// The write goes straight to the (non-blocking) socket, not through
    /// tokio's readiness: a socket just dialed has none until the reactor's
    /// next turn, and the first bytes would wait for it.
    pub(super) fn deliver(&mut self, data: Bytes, ctx: &mut Context<Self>) {
        let idle = !self.writing && !self.write_done && self.queue.is_empty();
        let written = if idle {
            match socket2::SockRef::from(&*self.socket).send(&data) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return self.write_failed(e, ctx),
            }
        } else {
            0
        };
        if written < data.len() {
            self.queue
                .push_back(Bytes::copy_from_slice(&data[written..]));
        }
        if written > 0 {
            self.report_written(written);
        }
        self.write_next(ctx);
    }

    /// Writes everything queued in one batch (vectored); at most one batch in flight.
    pub(super) fn write_next(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.write_done {
            return;
        }
        if self.queue.is_empty() {
            return self.shutdown_if_asked(ctx);
        }
        let batch: Vec<Bytes> = self.queue.drain(..).collect();
        let len: usize = batch.iter().map(Bytes::len).sum();
        self.writing = true;
        let socket = self.socket.clone();
        ctx.spawn(
            write_all(socket, batch)
                .into_actor(self)
                .map(move |result, act, ctx| act.written(result, len, ctx)),
        );
    }

    fn written(&mut self, result: io::Result<()>, len: usize, ctx: &mut Context<Self>) {
        self.writing = false;
        match result {
            Ok(()) => {
                self.report_written(len);
                self.write_next(ctx);
            }
            Err(e) => self.write_failed(e, ctx),
        }
    }

    /// Bytes reached the socket: count them and let the channel return credit.
    fn report_written(&self, len: usize) {
        let id = self.wiring.id;
        let direction = opposite(self.wiring.read_direction);
        self.wiring.counters.add_bytes(direction, len as u64);
        self.wiring
            .channel
            .do_send(StreamEvent(SocketEvent::Delivered { id, len }));
    }

    fn write_failed(&mut self, error: io::Error, ctx: &mut Context<Self>) {
        tracing::debug!(stream = %self.wiring.id, %error, "socket write failed; aborting the stream");
        self.wiring
            .channel
            .do_send(StreamEvent(SocketEvent::Failed { id: self.wiring.id }));
        ctx.stop();
    }

    /// Sends FIN once everything queued is written (the peer's half-close).
    /// When the read side has ended too, closing the socket sends the FIN:
    /// no `shutdown` call first.
    fn shutdown_if_asked(&mut self, ctx: &mut Context<Self>) {
        if !self.shutdown_pending || self.write_done {
            return;
        }
        if !self.read_done {
            let _ = socket2::SockRef::from(&*self.socket).shutdown(std::net::Shutdown::Write);
        }
        self.write_done = true;
        self.stop_when_done(ctx);
    }
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::In => Direction::Out,
        Direction::Out => Direction::In,
    }
}

/// Writes every chunk, vectored, waiting for writability as needed.
async fn write_all(socket: Rc<TcpStream>, batch: Vec<Bytes>) -> io::Result<()> {
    let (mut index, mut offset) = (0, 0);
    while index < batch.len() {
        socket.writable().await?;
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&batch[index][offset..])
            .chain(batch[index + 1..].iter().map(|b| &b[..]))
            .take(64)
            .map(io::IoSlice::new)
            .collect();
        let mut written = match socket.try_write_vectored(&slices) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while index < batch.len() && written >= batch[index].len() - offset {
            written -= batch[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}
