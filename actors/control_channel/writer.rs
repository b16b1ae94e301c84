//! The control channel's one write path to the agent: every frame typed,
//! gated on the negotiated features, one frame per WebSocket message.

use super::*;

impl ControlChannel {
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
