//! `RouteSync`: one per server of a cluster with peers (`--peer-token`).
//! Twice a second: keeps the server's store lease alive, publishes a route
//! for each service registered here (TCP and UDP) and withdraws the gone
//! ones, reads every server's routes, and makes this server answer every
//! service of the cluster: a service with no registration here but a route
//! on a peer gets a *forward* on its public port, whose visitors (streams,
//! or UDP flows: `UdpForward`) go through a peer link (an access link with
//! the peer token: `forward.rs`) to a server that has one.
//! A route whose server dies goes with its lease (`--route-ttl`); a forward
//! with no route left closes; a registration here takes its port over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::TunnelRegistry;
use super::handles::forwards::Forwards;
use crate::accounting::Counters;
use crate::cluster::{ClusterStore, Route};
use crate::protocol::ServiceProtocol;
use crate::udp::FlowLimits;

/// A service as routed: its name and protocol.
type Routed = (String, ServiceProtocol);

/// A public port as forwarded: its number and protocol.
type PortKey = (u16, ServiceProtocol);

/// A route as published: the service's port and address lists.
/// What is published of a service here: its port, visitor lists, visitor
/// rate and bandwidth.
type Published = (
    u16,
    crate::visitor_rules::ServiceRules,
    Option<u32>,
    Option<u64>,
);

mod forward;

use forward::PeerLinks;

/// How often routes are published and read.
const TICK: Duration = Duration::from_millis(500);

/// Who this server is to its peers.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// This server's id in the cluster (`--server-id`).
    pub server_id: String,
    /// Its control URL for its peers (`--advertise`).
    pub advertise: String,
    /// The token every server of the cluster accepts from its peers.
    pub peer_token: crate::auth::Secret,
    /// A dead server's routes go this long after its last renewal (`--route-ttl`).
    pub route_ttl: Duration,
}

/// The actor.
pub(crate) struct RouteSync {
    store: Arc<dyn ClusterStore>,
    peer: PeerOptions,
    registry: TunnelRegistry,
    bind_host: String,
    /// The limits of a forwarded UDP port's flows (the server's).
    flow_limits: FlowLimits,
    forwards: Forwards,
    /// The forwarded ports' services and traffic, for `/status`.
    forwarded: HashMap<PortKey, (String, Arc<Counters>)>,
    links: PeerLinks,
    lease: Option<i64>,
    /// This server's published routes: service → port and lists.
    published: HashMap<Routed, Published>,
    busy: bool,
}

impl Actor for RouteSync {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

impl RouteSync {
    /// Starts following the cluster's routes.
    pub(crate) fn start(
        store: Arc<dyn ClusterStore>,
        peer: PeerOptions,
        registry: TunnelRegistry,
        (bind_host, flow_limits): (String, FlowLimits),
        forwards: Forwards,
    ) -> Addr<Self> {
        let links = PeerLinks::new(peer.peer_token.clone());
        Self {
            store,
            peer,
            registry,
            bind_host,
            flow_limits,
            forwards,
            forwarded: HashMap::new(),
            links,
            lease: None,
            published: HashMap::new(),
            busy: false,
        }
        .start()
    }

    /// One round: lease, publish, read, forward. Rounds never overlap.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (store, registry) = (self.store.clone(), self.registry.clone());
        let (peer, lease) = (self.peer.clone(), self.lease);
        let published = self.published.clone();
        let round = async move {
            let tunnels = registry.list_tunnels().await;
            let local: HashMap<Routed, Published> = (tunnels.iter())
                .flat_map(|t| t.services.iter())
                .map(|s| {
                    let published = (s.port, s.visitors.clone(), s.visitor_rate, s.bandwidth);
                    ((s.name.clone(), s.protocol), published)
                })
                .collect();
            let renewed = keep(&*store, lease, peer.route_ttl).await?;
            // under a new lease (the old one expired) every route again
            let published = if Some(renewed) == lease {
                published
            } else {
                HashMap::new()
            };
            let lease = renewed;
            publish(&*store, &peer, lease, &published, &local).await?;
            let routes = store.routes().await?;
            Ok::<_, crate::cluster::StoreError>((lease, local, routes))
        };
        ctx.spawn(round.into_actor(self).map(|result, act, _| {
            act.busy = false;
            match result {
                Ok((lease, local, routes)) => {
                    act.lease = Some(lease);
                    act.follow(&local, &routes);
                    act.published = local;
                    act.report(routes);
                }
                Err(error) => {
                    act.lease = None;
                    tracing::debug!(%error, "cluster store: routes not followed this round");
                }
            }
        }));
    }

    /// Opens a forward for each service routed only elsewhere; closes those
    /// registered here now or routed nowhere.
    fn follow(&mut self, local: &HashMap<Routed, Published>, routes: &[Route]) {
        let me = &self.peer.server_id;
        let remote: Vec<&Route> = routes.iter().filter(|r| &r.server != me).collect();
        let wanted: HashSet<PortKey> = (remote.iter())
            .filter(|r| !local.contains_key(&(r.service.clone(), r.protocol)))
            .map(|r| (r.port, r.protocol))
            .collect();
        self.forwards.retain(|port| wanted.contains(port));
        self.forwarded.retain(|port, _| wanted.contains(port));
        for route in remote
            .iter()
            .filter(|r| wanted.contains(&(r.port, r.protocol)))
        {
            let key = (route.port, route.protocol);
            self.links.set_routes(key, &remote);
            if self.forwards.contains(key) {
                continue;
            }
            let counters = Arc::new(Counters::new());
            let opened = match route.protocol {
                ServiceProtocol::Tcp => {
                    forward::open(&self.bind_host, route, &self.links, counters.clone())
                }
                ServiceProtocol::Udp => forward::open_udp(
                    &self.bind_host,
                    route,
                    &self.links,
                    self.flow_limits,
                    counters.clone(),
                ),
            };
            match opened {
                Ok(cancel) => {
                    tracing::info!(service = %route.service, port = route.port, protocol = %route.protocol, via = %route.server, "forwarding public port to a peer");
                    self.forwards.insert(key, cancel);
                    self.forwarded
                        .insert(key, (route.service.clone(), counters));
                }
                Err(error) => {
                    tracing::warn!(service = %route.service, port = route.port, protocol = %route.protocol, %error, "cannot forward public port")
                }
            }
        }
    }
}

impl RouteSync {
    /// What `/status` and `/metrics` say of the routes and forwards.
    fn report(&self, routes: Vec<Route>) {
        let mut forwards: Vec<crate::status::ForwardStatus> = (self.forwarded.iter())
            .map(
                |((port, protocol), (service, counters))| crate::status::ForwardStatus {
                    port: *port,
                    protocol: *protocol,
                    service: service.clone(),
                    stats: counters.snapshot(),
                },
            )
            .collect();
        forwards.sort_by_key(|f| (f.port, f.protocol.to_byte()));
        let server_id = self.peer.server_id.clone();
        let peer_links = self.links.report();
        self.registry.update_cluster(|c| {
            c.server_id = Some(server_id);
            c.routes = routes;
            c.forwards = forwards;
            c.peer_links = peer_links;
        });
    }
}

/// The server's lease: kept alive, or a new one if it expired or is none.
async fn keep(
    store: &dyn ClusterStore,
    lease: Option<i64>,
    ttl: Duration,
) -> Result<i64, crate::cluster::StoreError> {
    if let Some(lease) = lease
        && store.keep_lease(lease).await?
    {
        return Ok(lease);
    }
    store.grant_lease(ttl).await
}

/// Publishes the routes of `local` (all of them under a new lease, the new
/// ones otherwise) and withdraws those of `published` gone from it.
async fn publish(
    store: &dyn ClusterStore,
    peer: &PeerOptions,
    lease: i64,
    published: &HashMap<Routed, Published>,
    local: &HashMap<Routed, Published>,
) -> Result<(), crate::cluster::StoreError> {
    for (routed, now) in local {
        if published.get(routed) == Some(now) {
            continue;
        }
        let route = Route {
            server: peer.server_id.clone(),
            advertise: peer.advertise.clone(),
            service: routed.0.clone(),
            port: now.0,
            protocol: routed.1,
            visitors: now.1.clone(),
            visitor_rate: now.2,
            bandwidth: now.3,
        };
        store.publish_route(lease, route).await?;
    }
    for (service, protocol) in published.keys().filter(|s| !local.contains_key(*s)) {
        store
            .withdraw_route(&peer.server_id, service, *protocol)
            .await?;
    }
    Ok(())
}
