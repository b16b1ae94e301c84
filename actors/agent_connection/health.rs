//! The agent's checks of its local services: a service with a
//! `health_check` is dialed every `health_interval` for as long as its
//! link lives; the server is told (`Health`) when `health_failures` checks
//! in a row failed, and again when one passes.

use super::*;
use crate::config::HealthCheck;
use crate::health::HealthState;

/// The result of one check of service `service_id` on link `generation`.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct HealthChecked {
    generation: u64,
    service_id: Uuid,
    passed: bool,
}

impl Handler<HealthChecked> for AgentConnection {
    type Result = ();

    fn handle(&mut self, msg: HealthChecked, ctx: &mut Self::Context) {
        let Some(link) = self
            .link
            .as_mut()
            .filter(|l| l.generation == msg.generation)
        else {
            return;
        };
        let Some((name, state)) = link.health.get_mut(&msg.service_id) else {
            return;
        };
        let Some(healthy) = state.record(msg.passed) else {
            return;
        };
        if healthy {
            tracing::info!(service = %name, "the local service passes its health check again");
        } else {
            tracing::warn!(service = %name, "the local service fails its health checks; the server sends it no new visitor");
        }
        self.write(
            crate::protocol::Message::health(msg.service_id, healthy),
            ctx,
        );
    }
}

impl AgentConnection {
    /// Starts checking `service`, registered as `service_id`, if it asks for
    /// checks and the server takes their reports.
    pub(super) fn watch_health(
        &mut self,
        service_id: Uuid,
        service: &ServiceConfig,
        ctx: &mut Context<Self>,
    ) {
        let Some(HealthCheck::Tcp) = service.health_check else {
            return;
        };
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if !link.queue.features().contains(Features::HEALTH) {
            return tracing::info!(service = %service.name, "the server takes no health reports; not checking");
        }
        let state = HealthState::new(service.health_failures);
        link.health
            .insert(service_id, (service.name.clone(), state));
        let (generation, cancel) = (link.generation, link.cancel.clone());
        let (address, interval) = (service.local_addr(), service.health_interval);
        let timeout = self.shared.config.local_connect_timeout.min(interval);
        let me = ctx.address();
        actix::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.tick().await; // the first tick is now: the service was just dialed
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let dial = tokio::net::TcpStream::connect(address.as_str());
                let passed = matches!(tokio::time::timeout(timeout, dial).await, Ok(Ok(_)));
                me.do_send(HealthChecked {
                    generation,
                    service_id,
                    passed,
                });
            }
        });
    }
}
