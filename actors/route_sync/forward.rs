//! A forward: a service's public port on a server with no registration of
//! it. Each visitor goes, as an access stream (or, for a UDP service, a
//! flow: `UdpForward`), through a peer link (an access link to a peer's
//! advertised URL, with the cluster's peer token) to a server that has one,
//! the one with the fewest open streams from here first.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::accounting::CounterSet;
use crate::actors::TunnelAgent;
use crate::actors::agent_connection::OpenStream;
use crate::actors::forwarded_connection::SharedBandwidth;
use crate::actors::io::runtime;
use crate::actors::service_listener::ServiceListener;
use crate::actors::udp_forward::{PeerChoice, Peers, UdpForward};
use crate::actors::udp_listener::UdpServiceListener;
use crate::auth::Secret;
use crate::bandwidth::Bandwidth;
use crate::config::TunnelClientConfig;
use crate::log_limit::{LogLimiter, RemoteEvent};
use crate::visitor_rate::VisitorRate;
use crate::visitor_rules::{Refusal, ServiceRules};

/// How long a visitor waits for a new peer link to connect.
const LINK_WAIT: Duration = Duration::from_secs(3);

/// The peer links, one per peer, and the routes of each forwarded port.
#[derive(Clone)]
pub(super) struct PeerLinks {
    token: Secret,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// By advertised URL, with the streams sent through each.
    links: HashMap<String, (TunnelAgent, Arc<Counters>)>,
    /// By forwarded port: the peers' URLs, the service's name there, and
    /// the address lists its visitors must pass.
    routes: HashMap<PortKey, Vec<(String, String, ServiceRules)>>,
    /// By forwarded port: the service's visitor rate and bandwidth.
    limits: HashMap<PortKey, PortLimits>,
    turn: usize,
}

/// A forwarded port's limits, from its routes (the strictest, should the
/// peers' registrations differ): each lasts while its rate is unchanged.
#[derive(Default)]
struct PortLimits {
    rate: Option<VisitorRate>,
    bandwidth: Option<SharedBandwidth>,
}

impl PortLimits {
    /// Keeps what `remote` (the port's routes) still asks for, and starts
    /// what it changes.
    fn follow(&mut self, remote: &[&&Route]) {
        let rate = remote.iter().filter_map(|r| r.visitor_rate).min();
        if self.rate.as_ref().map(VisitorRate::per_second) != rate {
            self.rate = rate.map(VisitorRate::new);
        }
        let bandwidth = remote.iter().filter_map(|r| r.bandwidth).min();
        let current = (self.bandwidth.as_ref()).and_then(|b| b.lock().ok().map(|b| b.per_second()));
        if current != bandwidth {
            self.bandwidth = bandwidth
                .map(|per_second| Arc::new(Mutex::new(Bandwidth::new(per_second, Instant::now()))));
        }
    }
}

impl PeerLinks {
    pub(super) fn new(token: Secret) -> Self {
        Self {
            token,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The peers that route `port` now.
    pub(super) fn set_routes(&self, port: PortKey, remote: &[&Route]) {
        let routes: Vec<&&Route> = (remote.iter())
            .filter(|r| (r.port, r.protocol) == port)
            .collect();
        let peers = (routes.iter())
            .map(|r| (r.advertise.clone(), r.service.clone(), r.visitors.clone()))
            .collect();
        let mut inner = self.lock();
        inner.routes.insert(port, peers);
        inner.limits.entry(port).or_default().follow(&routes);
    }

    /// Whether a new connection (or flow) from `ip` is within the visitor
    /// rate of `port`'s service.
    pub(super) fn admit(&self, port: PortKey, ip: IpAddr) -> bool {
        let mut inner = self.lock();
        let rate = inner.limits.get_mut(&port).and_then(|l| l.rate.as_mut());
        rate.is_none_or(|rate| rate.admit(ip, Instant::now()))
    }

    /// The bandwidth bucket of `port`'s service, if it has a limit.
    fn bandwidth(&self, port: PortKey) -> Option<SharedBandwidth> {
        self.lock().limits.get(&port)?.bandwidth.clone()
    }

    /// Whether some peer that routes `port` admits a visitor from `ip`
    /// (its route's address lists); why not if none does.
    pub(super) fn check(&self, port: PortKey, ip: IpAddr) -> Result<(), Refusal> {
        let inner = self.lock();
        let Some(peers) = inner.routes.get(&port) else {
            return Ok(());
        };
        let mut verdicts = peers.iter().map(|(_, _, rules)| rules.check(ip));
        let first = verdicts.next().unwrap_or(Ok(()));
        match first {
            Ok(()) => Ok(()),
            Err(_) if verdicts.any(|v| v.is_ok()) => Ok(()),
            Err(why) => Err(why),
        }
    }

    /// The peer for a visitor of `port` from `ip`: among those whose lists
    /// admit it, the one with the fewest open streams from here, ties in
    /// turn; its link (started if it was not), its counters, and the
    /// service's name.
    fn pick(&self, port: PortKey, ip: IpAddr) -> Option<(TunnelAgent, Arc<Counters>, String)> {
        let mut inner = self.lock();
        let peers: Vec<(String, String)> = (inner.routes.get(&port)?.iter())
            .filter(|(_, _, rules)| rules.check(ip).is_ok())
            .map(|(url, service, _)| (url.clone(), service.clone()))
            .collect();
        if peers.is_empty() {
            return None;
        }
        inner.turn = inner.turn.wrapping_add(1);
        let turn = inner.turn;
        let open = |inner: &Inner, url: &str| {
            inner
                .links
                .get(url)
                .map_or(0, |(_, c)| c.open_connections())
        };
        let order = (0..peers.len()).map(|i| (turn + i) % peers.len());
        let chosen = order.min_by_key(|&i| open(&inner, &peers[i].0))?;
        let (url, service) = peers[chosen].clone();
        let (link, counters) = inner
            .links
            .entry(url.clone())
            .or_insert_with(|| (start_link(&url, &self.token), Arc::new(Counters::new())))
            .clone();
        Some((link, counters, service))
    }

    /// Starts the links to the peers that route `port`, so that its first
    /// visitors find them up.
    pub(super) fn warm(&self, port: PortKey) {
        let mut inner = self.lock();
        let peers = inner.routes.get(&port).cloned().unwrap_or_default();
        for (url, _, _) in peers {
            inner
                .links
                .entry(url.clone())
                .or_insert_with(|| (start_link(&url, &self.token), Arc::new(Counters::new())));
        }
    }

    /// Each peer link: its peer, whether it is up, its streams.
    pub(super) fn report(&self) -> Vec<crate::status::PeerLinkStatus> {
        let inner = self.lock();
        let mut links: Vec<_> = (inner.links.iter())
            .map(|(url, (link, counters))| crate::status::PeerLinkStatus {
                peer: url.clone(),
                connected: matches!(
                    link.status().state,
                    crate::status::TunnelState::Connected { .. }
                ),
                stats: counters.snapshot(),
            })
            .collect();
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        links
    }
}

/// A peer link: an access link that reconnects on its own.
fn start_link(url: &str, token: &Secret) -> TunnelAgent {
    let link = TunnelAgent::new(TunnelClientConfig::new(url, token.expose()).with_connections(1));
    let runner = link.clone();
    let url = url.to_owned();
    runtime::arbiter().spawn(async move {
        if let Err(error) = runner.run().await {
            tracing::error!(peer = %url, %error, "peer link failed");
        }
    });
    link
}

/// Listens on `route.port` and forwards its visitors until the token fires.
pub(super) fn open(
    host: &str,
    route: &Route,
    links: &PeerLinks,
    counters: Arc<Counters>,
) -> std::io::Result<CancellationToken> {
    let listener = ServiceListener::bind(host, route.port)?;
    let close = CancellationToken::new();
    let (links, closed, port) = (links.clone(), close.clone(), route.port);
    links.warm((port, ServiceProtocol::Tcp));
    actix::spawn(async move {
        let mut logs = LogLimiter::new();
        loop {
            tokio::select! {
                () = closed.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, visitor)) => match admit(&links, port, visitor.ip()) {
                        Ok(()) => pass(&links, port, (socket, visitor), &counters),
                        Err(why) => refuse(port, (socket, visitor), why, (&counters, &mut logs)),
                    },
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
            }
        }
    });
    Ok(close)
}

/// Listens on UDP `route.port` and forwards its visitors' flows until the
/// token fires.
pub(super) fn open_udp(
    host: &str,
    route: &Route,
    links: &PeerLinks,
    limits: FlowLimits,
    counters: Arc<Counters>,
) -> std::io::Result<CancellationToken> {
    let socket = UdpServiceListener::bind(host, route.port)?;
    let close = CancellationToken::new();
    let key = (route.port, ServiceProtocol::Udp);
    links.warm(key);
    let peers = Box::new(ForwardedPort {
        links: links.clone(),
        key,
    });
    UdpForward::start(socket, limits, peers, counters, close.clone());
    Ok(close)
}

/// The peers of one forwarded UDP port, for its `UdpForward`.
struct ForwardedPort {
    links: PeerLinks,
    key: PortKey,
}

impl Peers for ForwardedPort {
    fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.links.check(self.key, ip)
    }

    fn admit_flow(&self, ip: IpAddr) -> bool {
        self.links.admit(self.key, ip)
    }

    fn pick(&self, ip: IpAddr) -> Option<PeerChoice> {
        let (link, peer, service) = self.links.pick(self.key, ip)?;
        Some((link.connection()?, peer, service))
    }
}

/// Whether a TCP visitor from `ip` passes the lists and the rate of `port`'s service.
fn admit(links: &PeerLinks, port: u16, ip: IpAddr) -> Result<(), Refusal> {
    let key = (port, ServiceProtocol::Tcp);
    links.check(key, ip)?;
    match links.admit(key, ip) {
        true => Ok(()),
        false => Err(Refusal::RateLimited),
    }
}

/// A visitor the service's address lists refuse: reset at once, counted
/// by why, logged at most once a second.
fn refuse(
    port: u16,
    (socket, visitor): (tokio::net::TcpStream, SocketAddr),
    why: Refusal,
    (counters, logs): (&Counters, &mut LogLimiter),
) {
    #[allow(deprecated)] // SO_LINGER 0: a reset, which never blocks
    let _ = socket.set_linger(Some(Duration::ZERO));
    counters.add_refused(why);
    if let Some(held_back) = logs.admit(RemoteEvent::VisitorRefused, Instant::now()) {
        tracing::info!(port, %visitor, reason = why.name(), held_back, "visitor refused by the service's rules");
    }
}

/// Sends a visitor to a peer (once its link is up); closed if none can take it.
fn pass(
    links: &PeerLinks,
    port: u16,
    (socket, visitor): (tokio::net::TcpStream, SocketAddr),
    counters: &Arc<Counters>,
) {
    let Some((link, peer, service)) = links.pick((port, ServiceProtocol::Tcp), visitor.ip()) else {
        return;
    };
    // the stream outlives the forward (closed when a registration here takes
    // the port over): it ends when either side does
    let cancel = CancellationToken::new();
    let counters = CounterSet::new(vec![counters.clone(), peer]);
    let bandwidth = links.bandwidth((port, ServiceProtocol::Tcp));
    actix::spawn(async move {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        while !matches!(
            link.status().state,
            crate::status::TunnelState::Connected { .. }
        ) {
            if tokio::time::Instant::now() >= deadline {
                return tracing::warn!(port, "no peer link up in time; visitor closed");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let public = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let open = OpenStream {
            socket,
            service,
            target: String::new(),
            visitor: Some((visitor.to_string(), public)),
            bandwidth,
            counters,
            cancel,
        };
        if !link.open_stream(open) {
            tracing::warn!(port, "the peer link is not running; visitor closed");
        }
    });
}
