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
    pub(super) fn flush(&mut self, mut outbox: Vec<Bytes>, ctx: &mut Context<Self>) {
        for frame in outbox.drain(..) {
            self.send_frame(frame, ctx);
        }
        self.outbox = outbox;
    }

    /// Queues one frame (never a type the server did not announce) and writes.
    pub(super) fn send(&mut self, message: Option<Message>, ctx: &mut Context<Self>) {
        if let Some(message) = message {
            self.send_frame(message.to_bytes(), ctx);
        }
    }

    /// Queues one encoded frame (never a type the server did not announce) and writes.
    pub(super) fn send_frame(&mut self, frame: Bytes, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if !link.session.features().contains(frame_feature(&frame)) {
            return;
        }
        match Message::stream_of_frame(&frame) {
            // Data and Close: in turn with other streams, in order within their own
            Some(stream) => link.data.push(stream, frame),
            None => link.control.push_back(frame),
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
        if link.control.is_empty() && link.data.is_empty() && link.flows.nothing_waiting() {
            return;
        }
        let Some(mut sink) = link.sink.take() else {
            return;
        };
        let generation = link.generation;
        let mut batch: Vec<Bytes> = link.control.drain(..).collect();
        batch.append(&mut link.acks);
        link.flows.drain_into(&mut batch); // bounded in bytes
        let mut size = 0;
        while let Some(frame) = link.data.pop() {
            size += frame.len();
            batch.push(frame);
            if size >= MAX_BATCH {
                break;
            }
        }
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
                self.write_next(ctx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing to the server failed; reconnecting");
                self.drop_link(format!("writing to the server failed: {e}"), ctx);
            }
        }
    }
}
