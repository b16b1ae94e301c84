//! The agent's WebSocket writes: control frames first, then datagrams, then
//! stream frames in order; one batch in flight on awc's sink. Frames queued
//! while the actor handles its mailbox and streams leave together: the write
//! starts once they are handled (`WriteOut`), so that, say, a reply and the
//! `Close` right behind it wake the server once.

use super::*;

/// Writes what is queued (sent to itself, handled after what is pending).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct WriteOut;

impl Handler<WriteOut> for AgentConnection {
    type Result = ();

    fn handle(&mut self, _: WriteOut, ctx: &mut Self::Context) {
        if let Some(link) = self.link.as_mut() {
            link.write_scheduled = false;
        }
        self.write_next(ctx);
    }
}

impl AgentConnection {
    /// The one write path to the server: queues a frame (never a type the
    /// server did not announce: a bug, logged and counted; never past the
    /// bound of what a server that does not read may be owed: the link
    /// ends) and schedules a write.
    pub(super) fn write(&mut self, frame: impl Into<Outbound>, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        match link.queue.push(frame.into()) {
            Ok(()) => {}
            Err(PushError::NotAnnounced(refused)) => {
                self.shared.counters.add_unsent();
                return tracing::debug!(%refused, "not sent");
            }
            Err(PushError::Backlog { bytes }) => {
                link.session.backlog_exceeded(bytes);
                return self.execute(ctx);
            }
        }
        if !link.write_scheduled {
            link.write_scheduled = true;
            ctx.notify(WriteOut);
        }
    }

    pub(super) fn queue_raw(&mut self, message: ws::Message, ctx: &mut Context<Self>) {
        if let (Some(link), ws::Message::Pong(p)) = (self.link.as_mut(), &message) {
            let pong = p.clone();
            let Some(mut sink) = link.sink.take() else {
                return;
            };
            let generation = link.generation;
            ctx.spawn(
                async move { sink.send(ws::Message::Pong(pong)).await.map(|()| sink) }
                    .into_actor(self)
                    .map(move |result, act, ctx| act.written(generation, result, ctx)),
            );
        }
    }

    /// One batch in flight on the sink; awc's `send` gives real backpressure.
    pub(super) fn write_next(&mut self, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.queue.is_empty() && link.flows.nothing_waiting() {
            return;
        }
        let Some(mut sink) = link.sink.take() else {
            return;
        };
        let generation = link.generation;
        let mut batch: Vec<Bytes> = Vec::new();
        link.queue.drain_control(&mut batch);
        link.flows.drain_into(&mut batch); // bounded in bytes
        link.queue.drain_streams(&mut batch, MAX_BATCH);
        link.session.write_started(Instant::now());
        let write = async move {
            for frame in batch {
                sink.feed(ws::Message::Binary(frame)).await?;
            }
            sink.flush().await.map(|()| sink)
        };
        ctx.spawn(
            write
                .into_actor(self)
                .map(move |result, act, ctx| act.written(generation, result, ctx)),
        );
    }

    pub(super) fn written(
        &mut self,
        generation: u64,
        result: Result<WsSink, actix_http::ws::ProtocolError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(link) = self.link.as_mut().filter(|l| l.generation == generation) else {
            return;
        };
        match result {
            Ok(sink) => {
                link.sink = Some(sink);
                link.session.write_done();
                self.write_next(ctx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing to the server failed; reconnecting");
                self.drop_link(format!("writing to the server failed: {e}"), ctx);
            }
        }
    }
}
