//! The agent's registrations: asked once authenticated, in order, answered
//! in order, published.

use super::*;

/// Publishes a service added while the agent runs.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct AddService(pub(crate) ServiceConfig);

/// Withdraws the service of this name: unregistered, its streams end.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RemoveService(pub(crate) String);

impl Handler<AddService> for AgentConnection {
    type Result = ();

    fn handle(&mut self, AddService(service): AddService, ctx: &mut Self::Context) {
        if self.link.as_ref().is_some_and(|l| l.session.is_open()) {
            self.register(service);
            self.execute(ctx);
        }
    }
}

impl Handler<RemoveService> for AgentConnection {
    type Result = ();

    fn handle(&mut self, RemoveService(name): RemoveService, ctx: &mut Self::Context) {
        self.shared.view.refusal_ended(&name);
        self.refused.remove(&name);
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.session.unregister(&name) > 0 {
            tracing::info!(service = %name, "service withdrawn");
        }
        self.shared.view.withdrawn(&name);
        self.execute(ctx);
    }
}

impl AgentConnection {
    pub(super) fn authenticated(
        &mut self,
        tunnel_id: Uuid,
        features: Features,
        ctx: &mut Context<Self>,
    ) {
        if self.shared.connection > 0 && !features.contains(Features::LINKS) {
            return self.stand_down(ctx);
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        link.queue.set_features(features);
        self.shared.view.connected(tunnel_id);
        tracing::info!(%tunnel_id, ?features, "authenticated");
        if !features.contains(Features::STREAMS) {
            tracing::warn!("the server has no data plane (legacy): visitors cannot be forwarded");
        }
        let services = self
            .shared
            .services
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if services.is_empty() {
            self.connected();
        }
        for service in services {
            self.register(service);
        }
    }

    /// An extra link to a server that takes one link per agent (`LINKS`
    /// not announced): it registers nothing, closes, and is not retried;
    /// `run()` goes on with the agent's other links.
    fn stand_down(&mut self, ctx: &mut Context<Self>) {
        tracing::warn!(
            server = %self.shared.config.server_url,
            connection = self.shared.connection,
            "the server takes one link per agent (it did not announce LINKS): this extra connection closes; `connections = 1` avoids it"
        );
        self.shared.stand_down();
        self.shared.view.disconnected();
        self.shared.view.set_state(TunnelState::Stopped);
        ctx.notify(StopAgent);
    }

    /// Registers a service, asking for the port it had before when it was
    /// auto-assigned (the session sends it; `execute` writes it).
    pub(super) fn register(&mut self, service: ServiceConfig) {
        let port = match service.remote_port {
            0 => (self.shared.assigned.borrow().get(&service.name).copied()).unwrap_or(0),
            p => p,
        };
        if let Some(link) = self.link.as_mut() {
            link.session.register(service, port);
        }
    }

    pub(super) fn registered(
        &mut self,
        service_id: Uuid,
        service: &ServiceConfig,
        port: Option<u16>,
    ) {
        self.refused.remove(&service.name);
        self.shared.view.refusal_ended(&service.name);
        match port {
            Some(port) => {
                tracing::info!(service = %service.name, public_port = port, local = %service.local_addr(), "service registered");
                self.remember_port(service, port);
                self.published(service_id, service, port);
            }
            None => {
                tracing::info!(service = %service.name, "service registered (the server did not say its port)")
            }
        }
    }

    /// Authenticated and every service registered.
    pub(super) fn connected(&self) {
        let since = std::time::SystemTime::now();
        self.shared.view.set_state(TunnelState::Connected { since });
    }

    /// Remembers the port a server gave `service` (when it asked for any),
    /// for the next registration and the agent's other links; says so when
    /// another link's server gave another.
    fn remember_port(&self, service: &ServiceConfig, port: u16) {
        if service.remote_port != 0 {
            return;
        }
        let mut other = None;
        self.shared
            .assigned
            .send_if_modified(|ports| match ports.get(&service.name) {
                Some(&known) => {
                    other = (known != port).then_some(known);
                    false
                }
                None => {
                    ports.insert(service.name.clone(), port);
                    true
                }
            });
        if let Some(other) = other {
            tracing::warn!(service = %service.name, port, other, server = %self.shared.config.server_url, "this server gave another public port than the agent's other servers");
        }
    }

    /// Records a published service and tells the `on_published` callback.
    pub(super) fn published(&self, service_id: Uuid, service: &ServiceConfig, port: u16) {
        self.shared.view.registered(service_id, service, port);
        // an extra link to a server publishes what its first did: told once
        let callback = self.shared.on_published.as_ref();
        if let Some(callback) = callback.filter(|_| self.shared.connection == 0) {
            callback(&PublishedService {
                name: service.name.clone(),
                protocol: service.protocol,
                local: service.local_addr(),
                public_port: port,
                public_addr: public_addr(&self.shared.config.server_url, port),
            });
        }
    }

    /// The server refused `service` (`lasting`: it said asking again soon
    /// cannot help): asked again after a backoff delay (the longest, for a
    /// lasting refusal, said once at ERROR until the reason changes), and
    /// shown in the status meanwhile.
    pub(super) fn register_failed(
        &mut self,
        service: ServiceConfig,
        (reason, lasting): (&str, bool),
        ctx: &mut Context<Self>,
    ) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let generation = link.generation;
        let config = &self.shared.config;
        let refused = self.refused.entry(service.name.clone()).or_insert_with(|| {
            let backoff = Backoff::new(
                config.reconnect_interval,
                config.max_reconnect_interval,
                config.stable_after,
            );
            (backoff, None)
        });
        let jitter = Uuid::new_v4().as_u64_pair().0;
        let delay = match lasting {
            true => refused.0.next_delay_at_max(jitter),
            false => refused.0.next_delay(jitter),
        };
        let retry_in = humantime::format_duration(delay);
        let name = &service.name;
        self.shared.view.refused(name, reason, lasting);
        match lasting {
            true if refused.1.as_deref() != Some(reason) => {
                tracing::error!(service = %name, %reason, %retry_in, "registration refused, and asking again soon cannot help: fix the token's scope or the service's configuration; asking again at the longest delay");
                refused.1 = Some(reason.to_owned());
            }
            true => {
                tracing::debug!(service = %name, %reason, %retry_in, "registration refused again")
            }
            false => tracing::warn!(service = %name, %reason, %retry_in, "registration refused"),
        }
        // one server: its port may have gone to another agent meanwhile; with
        // several, the port is the one every server gives the service
        let forget = service.remote_port == 0 && !self.shared.several_links;
        if forget
            && self
                .shared
                .assigned
                .send_if_modified(|p| p.remove(&service.name).is_some())
        {
            tracing::info!(service = %service.name, "asking for any port next time");
        }
        ctx.run_later(delay, move |act, ctx| {
            let same_link = (act.link.as_ref()).is_some_and(|l| l.generation == generation);
            // withdrawn or replaced meanwhile: not asked for again
            let still_published =
                (act.shared.services.lock()).is_ok_and(|services| services.contains(&service));
            if same_link && still_published {
                act.register(service);
                act.execute(ctx);
            }
        });
    }
}
