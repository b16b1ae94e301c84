//! A forward: a service's public port on a server with no registration of
//! it. Each visitor goes, as an access stream (or, for a UDP service, a
//! flow: `UdpForward`), through a peer link (an access link to a peer's
//! advertised URL, with the cluster's peer token) to a server that has one,
//! the one with the fewest open streams from here first.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::accounting::CounterSet;
use crate::actors::TunnelAgent;
use crate::actors::agent_connection::OpenStream;
use crate::actors::io::runtime;
use crate::actors::service_listener::ServiceListener;
use crate::actors::udp_forward::UdpForward;
use crate::actors::udp_listener::UdpServiceListener;
use crate::auth::Secret;
use crate::config::TunnelClientConfig;

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
    /// By forwarded port: the peers' URLs and the service's name.
    routes: HashMap<PortKey, Vec<(String, String)>>,
    turn: usize,
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
        let peers = (remote.iter())
            .filter(|r| (r.port, r.protocol) == port)
            .map(|r| (r.advertise.clone(), r.service.clone()))
            .collect();
        self.lock().routes.insert(port, peers);
    }

    /// The peer for a visitor of `port`: the one with the fewest open
    /// streams from here, ties in turn; its link (started if it was not),
    /// its counters, and the service's name.
    fn pick(&self, port: PortKey) -> Option<(TunnelAgent, Arc<Counters>, String)> {
        let mut inner = self.lock();
        let peers = inner.routes.get(&port)?.clone();
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
        for (url, _) in peers {
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
    let link = TunnelAgent::new(TunnelClientConfig::new(url, token.expose()));
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
        loop {
            tokio::select! {
                () = closed.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => pass(&links, port, socket, &counters),
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
    let links = links.clone();
    let pick = Box::new(move || {
        let (link, peer, service) = links.pick(key)?;
        Some((link.connection()?, peer, service))
    });
    UdpForward::start(socket, limits, pick, counters, close.clone());
    Ok(close)
}

/// Sends a visitor to a peer (once its link is up); closed if none can take it.
fn pass(links: &PeerLinks, port: u16, socket: tokio::net::TcpStream, counters: &Arc<Counters>) {
    let Some((link, peer, service)) = links.pick((port, ServiceProtocol::Tcp)) else {
        return;
    };
    // the stream outlives the forward (closed when a registration here takes
    // the port over): it ends when either side does
    let cancel = CancellationToken::new();
    let counters = CounterSet::new(vec![counters.clone(), peer]);
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
        let open = OpenStream {
            socket,
            service,
            target: String::new(),
            counters,
            cancel,
        };
        if !link.open_stream(open) {
            tracing::warn!(port, "the peer link is not running; visitor closed");
        }
    });
}
