//! The registry's services: what each tunnel registered, with live counters
//! for status pages, and which tunnel's channel serves a TCP service by name
//! (where a relayed access stream goes).

use super::*;
use crate::actors::service_listener::ServiceListener;
use crate::actors::udp_listener::UdpServiceListener;

/// A service went live on its public port (for status and metrics).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ServiceRegistered {
    pub(crate) tunnel_id: Uuid,
    pub(crate) service: ServiceEntry,
    pub(crate) counters: Arc<Counters>,
    /// UDP: the flows' traffic, as the listener last published it.
    pub(crate) flows: Option<FlowView>,
    /// The service's listener, which replicas of it join.
    pub(crate) listener: PublicListener,
}

/// A service's public listener, TCP or UDP, as replicas join it.
#[derive(Clone)]
pub(crate) enum PublicListener {
    Tcp(Addr<ServiceListener>),
    Udp(Addr<UdpServiceListener>),
}

impl PublicListener {
    /// Whether the listener still runs (it stops with its last replica).
    fn connected(&self) -> bool {
        match self {
            Self::Tcp(addr) => addr.connected(),
            Self::Udp(addr) => addr.connected(),
        }
    }
}

/// A UDP listener's flows, published for status pages.
pub(crate) type FlowView = Arc<std::sync::Mutex<Vec<crate::udp::FlowInfo>>>;

/// A service as the registry records it (the core's type).
pub(crate) type ServiceEntry = crate::tunnels::RegisteredService;

/// The channel of the tunnel that registered TCP service `name` (for `Open`).
#[derive(Message)]
#[rtype(result = "Option<RelayEnd>")]
pub(crate) struct FindService {
    pub(crate) name: String,
    pub(crate) protocol: crate::protocol::ServiceProtocol,
}

impl Handler<ServiceRegistered> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ServiceRegistered, _: &mut Self::Context) {
        if let Some(io) = self.tunnels.get_mut(msg.tunnel_id) {
            io.views.insert(msg.service.id, (msg.counters, msg.flows));
            io.listeners.insert(msg.service.port, msg.listener);
            self.tunnels.registered(msg.tunnel_id, msg.service);
        }
    }
}

/// A service's agent says whether its health checks pass (for `/status`).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ServiceHealthChanged {
    pub(crate) tunnel_id: Uuid,
    pub(crate) service_id: Uuid,
    pub(crate) healthy: bool,
}

impl Handler<ServiceHealthChanged> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ServiceHealthChanged, _: &mut Self::Context) {
        if let Some(io) = self.tunnels.get_mut(msg.tunnel_id) {
            if msg.healthy {
                io.unhealthy.remove(&msg.service_id);
            } else if io.views.contains_key(&msg.service_id) {
                io.unhealthy.insert(msg.service_id);
            }
        }
    }
}

impl Handler<FindService> for Registry {
    type Result = Option<RelayEnd>;

    fn handle(&mut self, msg: FindService, _: &mut Self::Context) -> Self::Result {
        let (_, io) = self.tunnels.find_service(&msg.name, msg.protocol)?;
        Some(io.relay.clone())
    }
}

impl Registry {
    /// The live listener on `port`, which a new replica joins.
    pub(super) fn listener_of(&self, port: u16) -> Option<PublicListener> {
        (self.tunnels.iter())
            .find_map(|(_, io, _, _)| io.listeners.get(&port).filter(|l| l.connected()))
            .cloned()
    }
}

impl TunnelIo {
    /// What `/status` says of this tunnel, with the ports and services the
    /// table holds for it.
    pub(super) fn status(&self, ports: &[u16], services: &[ServiceEntry]) -> TunnelInfo {
        let services = services.iter().map(|s| {
            let view = self.views.get(&s.id);
            ServiceInfo {
                id: s.id,
                name: s.name.clone(),
                protocol: s.protocol,
                port: s.port,
                stats: view.map(|(c, _)| c.snapshot()).unwrap_or_default(),
                flows: (view.and_then(|(_, f)| f.as_ref()))
                    .and_then(|f| f.lock().ok().map(|f| f.clone()))
                    .unwrap_or_default(),
                healthy: !self.unhealthy.contains(&s.id),
                visitors: s.visitors.clone(),
                visitor_rate: s.visitor_rate,
                bandwidth: s.bandwidth,
            }
        });
        TunnelInfo {
            ports: ports.to_vec(),
            services: services.collect(),
            stats: self.counters.snapshot(),
            ..self.info.clone()
        }
    }
}
