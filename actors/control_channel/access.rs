//! The control channel's relayed access streams (docs/PROTOCOL.md §4.5):
//! the session decides; the channel finds the agent of a service and passes
//! frames to and from the other end's channel.

use super::*;

impl Handler<Relay> for ControlChannel {
    type Result = ();

    fn handle(&mut self, relay: Relay, ctx: &mut Self::Context) {
        let Some(tunnel) = self.link.as_mut() else {
            return;
        };
        match relay {
            Relay::Open {
                id,
                service,
                target,
                protocol,
                visitor,
                from,
            } => match (self.core).relay_to_agent(id, (&service, &target), protocol, visitor) {
                Ok(()) => tunnel.relays.insert(id, from),
                Err(reason) => refuse_across(&from.to, id, reason),
            },
            Relay::Frame {
                id,
                kind,
                close,
                frame,
            } => {
                if kind == MessageType::Datagram {
                    self.relay_inbox.give(frame.len());
                }
                if self.core.relay_from_other(id, kind, close, frame) == Some(true) {
                    tunnel.relays.remove(id);
                }
            }
            Relay::Gone { id } => {
                tunnel.relays.remove(id);
                self.core.relay_gone(id);
            }
        }
        self.execute(ctx);
    }
}

impl ControlChannel {
    /// An access client's `Open` within its token's scope: relayed to the
    /// channel of the agent that registered `service`. Later frames wait for
    /// the lookup (`wait`), so the client's first `Window` finds the relay in
    /// place.
    pub(super) fn find_service(
        &mut self,
        id: Uuid,
        (service, target, visitor): (String, String, (String, String)),
        (protocol, probe): (ServiceProtocol, bool),
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let find = FindService {
            name: service.clone(),
            protocol,
        };
        self.shared
            .registry
            .addr()
            .send(find)
            .into_actor(self)
            .map(move |found, act, ctx| {
                let Ok(Some(agent)) = found else {
                    let reason = format!("no {protocol} service named {service:?} on this server");
                    if let Some(held_back) = act.shared.remote_event(RemoteEvent::AccessRefused) {
                        act.span.in_scope(|| {
                            tracing::info!(stream = %id, %reason, held_back, "access stream refused")
                        });
                    }
                    act.core.relay_not_found(id, &reason);
                    return act.execute(ctx);
                };
                if probe {
                    match agent.takes_access {
                        true => act.core.probe_found(id),
                        false => act.core.relay_not_found(id, NO_ACCESS),
                    }
                    return act.execute(ctx);
                }
                if act.core.relay_found(id)
                    && let Some(tunnel) = act.link.as_mut()
                {
                    tunnel.relays.insert(id, agent.clone());
                    let from = RelayEnd {
                        to: ctx.address().recipient(),
                        datagrams: act.relay_inbox.clone(),
                        takes_access: act.core.features().contains(Features::ACCESS),
                    };
                    agent.to.do_send(Relay::Open {
                        id,
                        service,
                        target,
                        protocol,
                        visitor,
                        from,
                    });
                }
                act.execute(ctx);
            })
            .wait(ctx);
    }
}

/// Why a probe of a service whose agent takes no access streams fails (as
/// every `Open` to it would).
const NO_ACCESS: &str = "the agent of this service does not take access streams";

/// Refuses an access stream to the other end's channel, as its agent would.
fn refuse_across(from: &Recipient<Relay>, id: Uuid, reason: &str) {
    if let Ok(refusal) = Message::connect_fail(id, reason) {
        from.do_send(Relay::Frame {
            id,
            kind: MessageType::ConnectFail,
            close: None,
            frame: refusal.to_bytes(),
        });
    }
}
