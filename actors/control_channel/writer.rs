//! The control channel's one write path to the agent: every frame typed,
//! gated on the negotiated features, one frame per WebSocket message.

use super::*;

impl ControlChannel {
    pub(super) fn flush(
        &mut self,
        mut outbox: Vec<Outbound>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        for frame in outbox.drain(..) {
            self.write(frame, ctx);
        }
        self.outbox = outbox;
    }

    /// Writes a message that may not have been buildable: a failure is a bug,
    /// logged and counted, never dropped silently.
    pub(super) fn write_built(
        &mut self,
        built: Result<Message, BuildError>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        match built {
            Ok(message) => self.write(message, ctx),
            Err(error) => {
                self.counters.add_unsent();
                self.span
                    .in_scope(|| tracing::error!(%error, "frame not built; not sent"));
            }
        }
    }

    /// The one write path to the agent: one frame per WebSocket message,
    /// never a type the agent did not announce (a bug: logged, counted).
    pub(super) fn write(
        &mut self,
        frame: impl Into<Outbound>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let frame = frame.into();
        if let Err(refused) = frame.check(self.core.features()) {
            self.counters.add_unsent();
            return tracing::debug!(%refused, "not sent");
        }
        ctx.binary(frame.into_bytes());
    }
}
