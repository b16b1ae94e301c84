//! The control channel's registrations: a public port from the registry, a
//! listener bound on it, answers in order.

use super::*;

impl ControlChannel {
    pub(super) fn register(
        &mut self,
        name: String,
        protocol: ServiceProtocol,
        remote_port: u16,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Some(session) = &self.session else { return };
        let limit = self.shared.config.max_services_per_tunnel;
        let refusal = if let Err(e) = self.scope.check_register(&name) {
            Some(e.to_string())
        } else if let Err(e) = self.scope.check_port(remote_port) {
            Some(e.to_string())
        } else if session.services.len() >= limit {
            Some(format!("tunnel is at its limit of {limit} services"))
        } else if protocol == ServiceProtocol::Udp
            && !session.features.contains(Features::DATAGRAMS)
        {
            Some(
                "udp services need the DATAGRAMS capability, which this agent did not offer"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.span
                .in_scope(|| tracing::warn!(service = %name, %reason, "registration refused"));
            return self.send(ctx, Message::register_fail(reason).ok());
        }
        let tunnel_id = session.tunnel_id;
        let registry = self.shared.registry.addr().clone();
        let host = self.shared.config.bind_host.clone();
        let allowed = self.scope.ports.clone();
        // `wait` holds later frames until this answer is sent: replies stay in order
        async move {
            let alloc = AllocatePort {
                tunnel_id,
                requested: remote_port,
                allowed,
            };
            let port = match registry
                .send(alloc)
                .await
                .map_err(crate::actors::Error::from)
            {
                Ok(Ok(port)) => port,
                Ok(Err(e)) | Err(e) => return Err(e.to_string()),
            };
            let bound = match protocol {
                ServiceProtocol::Tcp => bind_with_retry(&host, port).await.map(Bound::Tcp),
                ServiceProtocol::Udp => UdpServiceListener::bind(&host, port).map(Bound::Udp),
            };
            match bound {
                Ok(bound) => Ok((port, bound)),
                Err(e) => {
                    registry.do_send(ReleasePort { tunnel_id, port });
                    Err(format!("cannot listen on {host}:{port}: {e}"))
                }
            }
        }
        .into_actor(self)
        .map(move |result: Result<_, String>, act, ctx| act.registered(name, result, ctx))
        .wait(ctx);
    }

    pub(super) fn registered(
        &mut self,
        name: String,
        result: Result<(u16, Bound), String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let _span = self.span.enter();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let (port, bound) = match result {
            Ok(ok) => ok,
            Err(reason) => {
                tracing::warn!(service = %name, %reason, "registration refused");
                return self.send(ctx, Message::register_fail(reason).ok());
            }
        };
        let service_id = Uuid::new_v4();
        let counters = Arc::new(Counters::new());
        let cancel = session.cancel.child_token();
        let mut flows = None;
        let (listener, protocol) = match bound {
            Bound::Tcp(socket) => {
                let recipient = ctx.address().recipient();
                let guards = self.shared.registry.guard_counters().clone();
                let addr =
                    ServiceListener::start(socket, service_id, port, recipient, cancel, guards);
                (Listener::Tcp(addr), ServiceProtocol::Tcp)
            }
            Bound::Udp(socket) => {
                let budget = Budget::new(self.shared.config.udp_in_flight);
                let view = FlowView::default();
                flows = Some(view.clone());
                let wiring = UdpWiring {
                    service_id,
                    port,
                    limits: self.shared.config.flow_limits(),
                    channel: ctx.address().recipient(),
                    budget: budget.clone(),
                    counters: counters.clone(),
                    view,
                    cancel,
                };
                let addr = UdpServiceListener::start(socket, wiring);
                (Listener::Udp(addr, budget), ServiceProtocol::Udp)
            }
        };
        tracing::info!(service = %name, port, %protocol, "service registered");
        self.shared.registry.addr().do_send(ServiceRegistered {
            tunnel_id: session.tunnel_id,
            service: ServiceEntry {
                id: service_id,
                name: name.clone(),
                protocol,
                port,
            },
            counters: counters.clone(),
            flows,
        });
        session.services.insert(
            service_id,
            Service {
                name,
                port,
                listener,
                counters,
            },
        );
        self.send(
            ctx,
            Some(Message::RegisterOk {
                service_id,
                port: Some(port),
            }),
        );
    }

    pub(super) fn unregister(&mut self, service_id: Uuid) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let Some(service) = session.services.remove(&service_id) else {
            return;
        };
        self.span.in_scope(
            || tracing::info!(service = %service.name, port = service.port, "service unregistered"),
        );
        service.listener.stop();
        let release = ReleasePort {
            tunnel_id: session.tunnel_id,
            port: service.port,
        };
        self.shared.registry.addr().do_send(release);
    }
}

/// Binds a public port, retrying briefly while a closing listener (takeover) still holds it.
async fn bind_with_retry(host: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let mut attempts = 0;
    loop {
        match ServiceListener::bind(host, port) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}
