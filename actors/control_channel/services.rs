//! The control channel's registrations: a public port from the registry, a
//! listener bound on it, answers in order.

use super::cluster::{keep_port, lease, outside_range};
use super::*;
use crate::visitor_rules::ServiceRules;

impl Listener {
    /// Tunnel `tunnel_id`'s registration ends: it leaves the service's
    /// replicas (the listener stops with its last).
    fn stop(&self, tunnel_id: Uuid) {
        match self {
            Self::Tcp(addr) => addr.do_send(LeaveReplica { tunnel_id }),
            Self::Udp(addr, _) => addr.do_send(LeaveUdpReplica { tunnel_id }),
        }
    }

    fn protocol(&self) -> ServiceProtocol {
        match self {
            Self::Tcp(_) => ServiceProtocol::Tcp,
            Self::Udp(..) => ServiceProtocol::Udp,
        }
    }

    /// The listener, as the registry hands it to replicas.
    fn public(&self) -> PublicListener {
        match self {
            Self::Tcp(addr) => PublicListener::Tcp(addr.clone()),
            Self::Udp(addr, _) => PublicListener::Udp(addr.clone()),
        }
    }
}

impl ControlChannel {
    /// Allocates the public port of a registration the session accepted and
    /// listens on it; the answer goes back to the session, which sends
    /// answers in order.
    pub(super) fn register(
        &mut self,
        registration: Registration,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Some(tunnel) = &self.link else { return };
        let Registration {
            seq,
            name,
            protocol,
            remote_port,
            allowed_ports,
            named_in_scope,
            visitors,
            visitor_rate,
            bandwidth,
        } = registration;
        let tunnel_id = tunnel.tunnel_id;
        let registry = self.shared.registry.addr().clone();
        let host = self.config.bind_host.clone();
        let cluster = self.cluster_claim(&name, remote_port, allowed_ports.as_deref());
        let tunnel_cancel = tunnel.cancel.clone();
        let range = self.config.data_port_range;
        let forwards = self.shared.forwards.clone();
        let shared = self.shared.clone();
        // `wait` holds later frames until this answer is sent
        let service_name = name.clone();
        async move {
            // in a cluster, the port is the service's across the cluster
            let requested = match cluster {
                Some((store, claim)) => {
                    let hold = claim.hold;
                    let lease = (lease(&*store, claim, &shared).await)
                        .map_err(|e| (e, RegisterRefusal::Later))?;
                    outside_range(lease.port, range).map_err(|e| (e, RegisterRefusal::Lasting))?;
                    actix::spawn(keep_port(store, lease, hold, tunnel_cancel));
                    lease.port
                }
                None => remote_port,
            };
            let mut waits = 0;
            let port = loop {
                let alloc = AllocatePort {
                    tunnel_id,
                    name: service_name.clone(),
                    protocol,
                    requested,
                    allowed: allowed_ports.clone(),
                    named_in_scope,
                };
                let grant = registry
                    .send(alloc)
                    .await
                    .map_err(crate::actors::Error::from);
                match grant {
                    Ok(Ok(PortGrant::New(port))) => break port,
                    Ok(Ok(PortGrant::Joined(port, listener))) => {
                        let error = match joinable(&service_name, protocol, listener) {
                            Ok(bound) => return Ok((port, bound)),
                            Err(error) => error,
                        };
                        registry.do_send(ReleasePort { tunnel_id, port });
                        // the replica that holds it is still binding it (an
                        // agent's two links register at once): a moment more
                        if waits == SETUP_WAITS {
                            return Err((error, RegisterRefusal::Later));
                        }
                        waits += 1;
                        tokio::time::sleep(SETUP_WAIT).await;
                    }
                    Ok(Err(e)) | Err(e) => return Err((e.to_string(), e.refusal())),
                }
            };
            // a port this server forwarded to a peer is taken over
            forwards.release((port, protocol));
            let bound = match protocol {
                ServiceProtocol::Tcp => bind_with_retry(&host, port).await.map(Bound::Tcp),
                ServiceProtocol::Udp => UdpServiceListener::bind(&host, port).map(Bound::Udp),
            };
            match bound {
                Ok(bound) => Ok((port, bound)),
                Err(e) => {
                    registry.do_send(ReleasePort { tunnel_id, port });
                    // another process holds it, or the host is wrong: asking
                    // again soon finds the same
                    let reason = format!("cannot listen on {host}:{port}: {e}");
                    Err((reason, RegisterRefusal::Lasting))
                }
            }
        }
        .into_actor(self)
        .map(
            move |result: Result<_, (String, RegisterRefusal)>, act, ctx| {
                let limits = (visitor_rate, bandwidth);
                let answer = act.registered((name, visitors, limits), result, ctx);
                act.core.allocated(seq, answer);
                act.execute(ctx);
            },
        )
        .wait(ctx);
    }

    /// Starts the listener of a registered service; its id and port, or
    /// why it was refused.
    fn registered(
        &mut self,
        (name, visitors, (visitor_rate, bandwidth)): (
            String,
            ServiceRules,
            (Option<u32>, Option<u64>),
        ),
        result: Result<(u16, Bound), (String, RegisterRefusal)>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<(Uuid, u16), (String, RegisterRefusal)> {
        let _span = self.span.enter();
        let Some(session) = self.link.as_mut() else {
            return Err(("session closed".to_owned(), RegisterRefusal::Later));
        };
        let (port, bound) = match result {
            Ok(ok) => ok,
            Err((reason, refusal)) => {
                tracing::warn!(service = %name, %reason, ?refusal, "registration refused");
                return Err((reason, refusal));
            }
        };
        let service_id = Uuid::new_v4();
        let counters = Arc::new(Counters::new());
        let cancel = session.cancel.child_token();
        let (tunnel_id, agent) = (session.tunnel_id, session.agent);
        let mut flows = None;
        let tcp_replica = || JoinReplica {
            tunnel_id,
            replica: Replica {
                service_id,
                agent,
                channel: ctx.address().recipient(),
                counters: counters.clone(),
                healthy: true,
                visitors: visitors.clone(),
                visitor_rate,
            },
            cancel: cancel.clone(),
        };
        let budget = Budget::new(self.config.udp_in_flight);
        let udp_replica = |view: FlowView| JoinUdpReplica {
            replica: UdpReplica {
                tunnel_id,
                service_id,
                channel: ctx.address().recipient(),
                budget: budget.clone(),
                counters: counters.clone(),
                view,
                healthy: true,
                visitors: visitors.clone(),
                visitor_rate,
            },
            cancel: cancel.clone(),
        };
        let listener = match bound {
            Bound::Tcp(socket) => {
                let guards = self.shared.registry.guard_counters().clone();
                let policy = self.config.load_balance;
                let first = tcp_replica();
                Listener::Tcp(ServiceListener::start(socket, port, first, policy, guards))
            }
            Bound::TcpReplica(addr) => {
                addr.do_send(tcp_replica());
                Listener::Tcp(addr)
            }
            Bound::Udp(socket) => {
                let view = FlowView::default();
                flows = Some(view.clone());
                let settings = UdpSettings {
                    port,
                    limits: self.config.flow_limits(),
                    policy: self.config.load_balance,
                };
                let first = udp_replica(view);
                Listener::Udp(
                    UdpServiceListener::start(socket, settings, first),
                    budget.clone(),
                )
            }
            Bound::UdpReplica(addr) => {
                let view = FlowView::default();
                flows = Some(view.clone());
                addr.do_send(udp_replica(view));
                Listener::Udp(addr, budget.clone())
            }
        };
        let protocol = listener.protocol();
        tracing::info!(service = %name, port, %protocol, "service registered");
        self.shared.registry.addr().do_send(ServiceRegistered {
            tunnel_id: session.tunnel_id,
            service: ServiceEntry {
                id: service_id,
                name: name.clone(),
                protocol,
                port,
                visitors: visitors.clone(),
                visitor_rate,
                bandwidth,
            },
            counters: counters.clone(),
            flows,
            listener: listener.public(),
        });
        session.services.insert(
            service_id,
            Service {
                name,
                port,
                listener,
                counters,
                bandwidth: bandwidth.map(|rate| {
                    let bucket = crate::bandwidth::Bandwidth::new(rate, Instant::now());
                    Arc::new(std::sync::Mutex::new(bucket))
                }),
            },
        );
        Ok((service_id, port))
    }

    pub(super) fn unregister(&mut self, service_id: Uuid) {
        let Some(session) = self.link.as_mut() else {
            return;
        };
        let Some(service) = session.services.remove(&service_id) else {
            return;
        };
        self.span.in_scope(
            || tracing::info!(service = %service.name, port = service.port, "service unregistered"),
        );
        service.listener.stop(session.tunnel_id);
        let release = ReleasePort {
            tunnel_id: session.tunnel_id,
            port: service.port,
        };
        self.shared.registry.addr().do_send(release);
    }
}

impl ControlChannel {
    /// The agent's checks of service `service_id` changed their verdict: its
    /// replica takes new visitors again, or none until they pass.
    pub(super) fn service_health(&mut self, service_id: Uuid, healthy: bool) {
        let Some(session) = self.link.as_ref() else {
            return;
        };
        let Some(service) = session.services.get(&service_id) else {
            return;
        };
        let health = ReplicaHealth {
            tunnel_id: session.tunnel_id,
            healthy,
        };
        match &service.listener {
            Listener::Tcp(addr) => addr.do_send(health),
            Listener::Udp(addr, _) => addr.do_send(health),
        }
        self.shared.registry.addr().do_send(ServiceHealthChanged {
            tunnel_id: session.tunnel_id,
            service_id,
            healthy,
        });
        // the agent decides how often: one line a second, counted
        if let Some(held_back) = self.shared.remote_event(RemoteEvent::ReplicaHealth) {
            let (name, port) = (&service.name, service.port);
            self.span.in_scope(|| tracing::info!(service = %name, port, healthy, held_back, "replica health changed"));
        }
    }
}

/// The listener a replica of service `name` joins, if it can join one.
fn joinable(
    name: &str,
    protocol: ServiceProtocol,
    listener: Option<PublicListener>,
) -> Result<Bound, String> {
    match (protocol, listener) {
        (ServiceProtocol::Tcp, Some(PublicListener::Tcp(l))) if l.connected() => {
            Ok(Bound::TcpReplica(l))
        }
        (ServiceProtocol::Udp, Some(PublicListener::Udp(l))) if l.connected() => {
            Ok(Bound::UdpReplica(l))
        }
        _ => Err(format!(
            "service {name:?} is being set up or closed by another agent; register again in a moment"
        )),
    }
}

/// How often, 20 ms apart, a registration joining a replica whose listener
/// is still being set up asks again before it is refused.
const SETUP_WAITS: u32 = 25;
const SETUP_WAIT: Duration = Duration::from_millis(20);

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
