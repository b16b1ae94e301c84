//! The control channel's authentication: the token checked with its
//! lockouts, the tunnel opened by the registry, the answer from the session.

use super::*;

impl ControlChannel {
    pub(super) fn authenticate(
        &mut self,
        token: &str,
        client_id: Uuid,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if let Err(refusal) = self.check_token(token) {
            self.core.refused(&refusal.to_string(), refusal.refusal());
            return;
        }
        let scope = self.shared.scope(token);
        let config = &self.config;
        let open = OpenTunnel {
            token_hash: hash_token(token),
            client_id,
            peer: self.peer,
            channel: ctx.address().recipient(),
            relay: RelayEnd {
                to: ctx.address().recipient(),
                datagrams: self.relay_inbox.clone(),
                takes_access: self.core.offered().contains(Features::ACCESS),
            },
            timeout: config.heartbeat_timeout + config.heartbeat_interval,
            max_tunnels: config.max_tunnels,
            counters: self.counters.clone(),
        };
        self.shared
            .registry
            .addr()
            .send(open)
            .into_actor(self)
            .map(move |result, act, ctx| {
                match result.map_err(crate::actors::Error::from).and_then(|r| r) {
                    Ok((tunnel_id, cancel)) => {
                        let agent = crate::replicas::agent_of(client_id);
                        act.accepted((tunnel_id, agent), cancel, scope, ctx)
                    }
                    Err(e) => {
                        if let Some(held_back) = act.shared.remote_event(RemoteEvent::AuthRefused) {
                            act.span.in_scope(|| {
                                tracing::warn!(reason = %e, held_back, "authentication refused by the registry")
                            });
                        }
                        act.core.refused(&e.to_string(), AuthRefusal::Later);
                        act.execute(ctx);
                    }
                }
            })
            .wait(ctx);
    }

    /// Checks a token (with the lockouts of failed attempts), logging a refusal.
    fn check_token(&self, token: &str) -> Result<(), TokenRefusal> {
        let Ok(mut throttle) = self.shared.throttle.lock() else {
            return Err(TokenRefusal::LockedOut { retry_in_s: 1 });
        };
        let verdict = check_token(&mut throttle, self.peer.ip(), Instant::now(), || {
            (self.shared.validator)(token)
        });
        let event = match &verdict {
            Ok(()) => return verdict,
            Err(TokenRefusal::LockedOut { .. }) => RemoteEvent::AuthLockedOut,
            Err(TokenRefusal::Refused { .. }) => RemoteEvent::AuthRefused,
        };
        // a guesser decides how often this happens: one line a second, counted
        let Some(held_back) = self.shared.remote_event(event) else {
            return verdict;
        };
        let _span = self.span.enter();
        match &verdict {
            Ok(()) => {}
            Err(TokenRefusal::LockedOut { retry_in_s }) => tracing::warn!(
                retry_in_s,
                held_back,
                "authentication during a lockout refused unchecked"
            ),
            Err(TokenRefusal::Refused {
                reason,
                failures,
                lockout: Some(lockout),
            }) => {
                tracing::warn!(%reason, failures, held_back, lockout = %humantime::format_duration(*lockout), "authentication refused; address locked out")
            }
            Err(TokenRefusal::Refused {
                reason, failures, ..
            }) => tracing::warn!(%reason, failures, held_back, "authentication refused"),
        }
        verdict
    }

    fn accepted(
        &mut self,
        (tunnel_id, agent): (Uuid, Uuid),
        cancel: CancellationToken,
        scope: TokenScope,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.place = None;
        self.span
            .record("tunnel_id", tracing::field::display(tunnel_id));
        self.core
            .authenticated(tunnel_id, scope, Instant::now(), now_ms());
        let features = self.core.features();
        self.span
            .in_scope(|| tracing::info!(?features, "agent authenticated"));
        self.link = Some(Link {
            tunnel_id,
            agent,
            cancel,
            services: HashMap::new(),
            streams: StreamHub::default(),
            flows: HashMap::new(),
            relays: Relays::default(),
            counters: self.counters.clone(),
            gate: ReadGate::new(self.config.read_ahead),
        });
        self.execute(ctx);
    }
}
