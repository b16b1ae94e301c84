//! The registry's services: what each tunnel registered, with live counters
//! for status pages, and which tunnel's channel serves a TCP service by name
//! (where a relayed access stream goes).

use super::*;

/// A service went live on its public port (for status and metrics).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ServiceRegistered {
    pub(crate) tunnel_id: Uuid,
    pub(crate) service: ServiceEntry,
    pub(crate) counters: Arc<Counters>,
    /// UDP: the flows' traffic, as the listener last published it.
    pub(crate) flows: Option<FlowView>,
}

/// A UDP listener's flows, published for status pages.
pub(crate) type FlowView = Arc<std::sync::Mutex<Vec<crate::udp::FlowInfo>>>;

/// A registered service, as the registry keeps it.
#[derive(Debug, Clone)]
pub(crate) struct ServiceEntry {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) protocol: ServiceProtocol,
    pub(crate) port: u16,
}

/// The channel of the tunnel that registered TCP service `name` (for `Open`).
#[derive(Message)]
#[rtype(result = "Option<Recipient<Relay>>")]
pub(crate) struct FindService {
    pub(crate) name: String,
}

impl Handler<ServiceRegistered> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ServiceRegistered, _: &mut Self::Context) {
        if let Some(entry) = self.tunnels.get_mut(&msg.tunnel_id) {
            entry.services.push((msg.service, msg.counters, msg.flows));
        }
    }
}

impl Handler<FindService> for Registry {
    type Result = Option<Recipient<Relay>>;

    fn handle(&mut self, msg: FindService, _: &mut Self::Context) -> Self::Result {
        let mut tunnels = self.tunnels.values();
        let found = tunnels.find(|t| {
            t.services
                .iter()
                .any(|(s, _, _)| s.name == msg.name && s.protocol == ServiceProtocol::Tcp)
        })?;
        Some(found.relay.clone())
    }
}

impl TunnelEntry {
    /// The tunnel's info with live readings of its counters.
    pub(super) fn status(&self) -> TunnelInfo {
        let services = self
            .services
            .iter()
            .map(|(s, counters, flows)| ServiceInfo {
                id: s.id,
                name: s.name.clone(),
                protocol: s.protocol,
                port: s.port,
                stats: counters.snapshot(),
                flows: flows
                    .as_ref()
                    .and_then(|f| f.lock().ok().map(|f| f.clone()))
                    .unwrap_or_default(),
            });
        TunnelInfo {
            services: services.collect(),
            stats: self.counters.snapshot(),
            ..self.info.clone()
        }
    }
}
