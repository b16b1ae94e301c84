//! The control channel's relayed access streams (docs/PROTOCOL.md §4.5).

use super::*;

impl Handler<Relay> for ControlChannel {
    type Result = ();

    fn handle(&mut self, relay: Relay, ctx: &mut Self::Context) {
        let Some(session) = self.tunnel.as_mut() else {
            return;
        };
        match relay {
            Relay::Open {
                id,
                service,
                target,
                from,
            } => {
                if !session.features.contains(Features::ACCESS) {
                    let reason = "the agent of this service does not take access streams";
                    if let Ok(refusal) = Message::connect_fail(id, reason) {
                        from.do_send(Relay::Frame {
                            id,
                            kind: MessageType::ConnectFail,
                            close: None,
                            frame: refusal.to_bytes(),
                        });
                    }
                    return;
                }
                if session.streams.table().open_relay(id).is_err() {
                    return tracing::warn!(stream = %id, "access stream id already in use; not relayed");
                }
                session.relays.insert(id, from);
                self.write_built(Message::open(id, service, target), ctx);
            }
            Relay::Frame {
                id,
                kind,
                close,
                frame,
            } => {
                let Some(last) = session.streams.table().relay_from_other(id, kind, close) else {
                    return;
                };
                if last {
                    session.relays.remove(id);
                }
                self.write(Outbound::Relayed { id, kind, frame }, ctx);
            }
            Relay::Gone { id } => {
                session.relays.remove(id);
                if session.streams.table().forget(id).is_some() {
                    let close = Message::Close {
                        connection_id: id,
                        kind: CloseKind::Abort,
                    };
                    self.write(close, ctx);
                }
            }
        }
    }
}

impl ControlChannel {
    /// An access client's `Open`: relayed to the channel of the agent that
    /// registered `service`. Later frames wait for the lookup (`wait`), so the
    /// client's first `Window` finds the relay in place.
    pub(super) fn open_relay(
        &mut self,
        id: Uuid,
        service: String,
        target: String,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Some(scope) = self.core.scope() else {
            return;
        };
        if let Err(e) = scope.check_access(&service) {
            self.span
                .in_scope(|| tracing::warn!(stream = %id, reason = %e, "access stream refused"));
            return self.write_built(Message::connect_fail(id, e.to_string()), ctx);
        }
        let find = FindService {
            name: service.clone(),
        };
        self.shared
            .registry
            .addr()
            .send(find)
            .into_actor(self)
            .map(move |found, act, ctx| {
                let Some(session) = act.tunnel.as_mut() else {
                    return;
                };
                let Ok(Some(agent)) = found else {
                    let reason = format!("no service named {service:?} on this server");
                    act.span.in_scope(
                        || tracing::info!(stream = %id, %reason, "access stream refused"),
                    );
                    return act.write_built(Message::connect_fail(id, reason), ctx);
                };
                if session.streams.table().open_relay(id).is_err() {
                    let reason = "stream id already in use";
                    return act.write_built(Message::connect_fail(id, reason), ctx);
                }
                session.relays.insert(id, agent.clone());
                agent.do_send(Relay::Open {
                    id,
                    service,
                    target,
                    from: ctx.address().recipient(),
                });
            })
            .wait(ctx);
    }
}
