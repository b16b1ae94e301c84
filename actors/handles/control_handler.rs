//! `ControlHandler` (the seed's type): serves agents' control WebSockets,
//! mounted as a route in a host's actix-web `App` or on a raw TCP connection.
//! Not an actor: it starts a `ControlChannel` per connection.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::dev::Extensions;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_web_actors::ws;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::tunnel_registry::TunnelRegistry;
use crate::actors::control_channel::ControlChannel;
use crate::actors::io::frame_guard::FrameGuard;
use crate::actors::io::socket_options::harden_control_socket;
use crate::actors::io::turns::{Turns, chunk_len};
use crate::actors::io::{raw_connection, runtime};
use crate::admission::{PendingAuth, PlaceId};
use crate::auth::{LiveTokens, TokenScope, TokenStore, TokenValidator};
use crate::cluster::ClusterStore;
use crate::config::{LiveServerConfig, TunnelServerConfig};
use crate::log_limit::RemoteEvent;
use crate::protocol::MAX_MESSAGE_SIZE;
use crate::{Result, TunnelError};

/// What every control channel of one server shares.
pub(crate) struct ServerShared {
    pub(crate) registry: Arc<TunnelRegistry>,
    /// The settings now; each control channel takes them as it starts.
    pub(crate) config: LiveServerConfig,
    pub(crate) validator: TokenValidator,
    /// Failed authentications per address (token guessing is slowed down).
    pub(crate) throttle: std::sync::Mutex<crate::throttle::AuthThrottle>,
    /// Scopes of the accepted tokens; none: every token may do everything.
    pub(crate) scopes: Option<LiveTokens>,
    /// Connections awaiting authentication (bounded).
    pub(crate) pending: std::sync::Mutex<PendingAuth<CancellationToken>>,
    /// What remote parties make happen, logged at most once a second per kind.
    pub(crate) logs: std::sync::Mutex<crate::log_limit::LogLimiter>,
    /// The cluster's store: services' public ports are leased there.
    pub(crate) cluster: Option<Arc<dyn ClusterStore>>,
    /// Public ports forwarded to peers (a registration here takes one over).
    pub(crate) forwards: super::forwards::Forwards,
    /// The ports leased here, for registrations while the store is away.
    pub(crate) known_ports: std::sync::Mutex<crate::cluster::KnownPorts>,
}

impl ServerShared {
    fn new(
        registry: Arc<TunnelRegistry>,
        config: TunnelServerConfig,
        validator: TokenValidator,
        scopes: Option<LiveTokens>,
        cluster: Option<Arc<dyn ClusterStore>>,
    ) -> Self {
        let pending = PendingAuth::new(
            config.max_unauthenticated,
            config.max_unauthenticated_per_address,
        );
        Self {
            registry,
            config: LiveServerConfig::new(config),
            validator,
            throttle: std::sync::Mutex::default(),
            scopes,
            pending: std::sync::Mutex::new(pending),
            logs: std::sync::Mutex::default(),
            cluster,
            forwards: super::forwards::Forwards::default(),
            known_ports: std::sync::Mutex::default(),
        }
    }

    /// Counts a remote event; `Some(held_back)` when a line may be logged for
    /// it now (at most one per kind per second), with how many were not.
    pub(crate) fn remote_event(&self, event: RemoteEvent) -> Option<u64> {
        self.registry.guard_counters().remote_event(event);
        let mut logs = self.logs.lock().ok()?;
        logs.admit(event, Instant::now())
    }

    /// What `token` may register and access.
    pub(crate) fn scope(&self, token: &str) -> TokenScope {
        self.scopes
            .as_ref()
            .and_then(|tokens| tokens.verify(token).ok())
            .unwrap_or_default()
    }
}

/// A connection's place among those awaiting authentication (see
/// [`crate::admission`]), given back when dropped: once its session has
/// authenticated, or has ended. The place may be taken from it first, for a
/// newer connection: [`AuthPlace::evicted`] then completes.
pub(crate) struct AuthPlace {
    shared: Arc<ServerShared>,
    place: PlaceId,
    evicted: CancellationToken,
}

impl AuthPlace {
    /// A place for a connection from `peer`; with none free, the oldest
    /// connection awaiting authentication (from `peer`'s address when that
    /// has its share) loses its own (logged, at most once a second).
    pub(crate) fn take(shared: &Arc<ServerShared>, peer: SocketAddr) -> Self {
        let evicted = CancellationToken::new();
        let entered = shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enter(peer.ip(), evicted.clone());
        let guards = shared.registry.guard_counters();
        guards.auth_started();
        if let Some(oldest) = entered.evicted {
            oldest.cancel();
            guards.auth_ended();
            if let Some(held_back) = shared.remote_event(RemoteEvent::AuthEvicted) {
                tracing::warn!(%peer, held_back, "{EVICTED}");
            }
        }
        Self {
            shared: shared.clone(),
            place: entered.place,
            evicted,
        }
    }

    /// Completes when the place is taken for a newer connection.
    pub(crate) fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.evicted.clone().cancelled_owned()
    }
}

/// Why a connection awaiting authentication was closed.
pub(crate) const EVICTED: &str =
    "too many connections awaiting authentication: the oldest was dropped to make room; retry";

impl Drop for AuthPlace {
    fn drop(&mut self) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pending.leave(self.place).is_some() {
            self.shared.registry.guard_counters().auth_ended();
        }
    }
}

/// Serves the control channel of a tunnel server.
#[derive(Clone)]
pub struct ControlHandler {
    shared: Arc<ServerShared>,
}

impl ControlHandler {
    /// A handler that admits agents whose token `validator` accepts.
    #[must_use]
    pub fn new(
        registry: Arc<TunnelRegistry>,
        config: TunnelServerConfig,
        validator: TokenValidator,
    ) -> Self {
        Self {
            shared: Arc::new(ServerShared::new(registry, config, validator, None, None)),
        }
    }

    /// A handler that admits the tokens of `store` and holds each session to
    /// its token's scope: the services it may register and open access to.
    #[must_use]
    pub fn with_tokens(
        registry: Arc<TunnelRegistry>,
        config: TunnelServerConfig,
        store: TokenStore,
    ) -> Self {
        Self::with_live_tokens(registry, config, LiveTokens::new(store))
    }

    /// A handler that admits the tokens of `tokens` as they are at each
    /// authentication (they change while it runs: a cluster's), each session
    /// held to its token's scope.
    #[must_use]
    pub fn with_live_tokens(
        registry: Arc<TunnelRegistry>,
        config: TunnelServerConfig,
        tokens: LiveTokens,
    ) -> Self {
        let validator = tokens.validator();
        let shared = ServerShared::new(registry, config, validator, Some(tokens), None);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// A handler of a server of a cluster: the tokens of `tokens` (which
    /// follow the store: see `TokenSync`), and services' public ports leased
    /// in `store`, one per service across the cluster.
    #[must_use]
    pub fn in_cluster(
        registry: Arc<TunnelRegistry>,
        config: TunnelServerConfig,
        tokens: LiveTokens,
        store: Arc<dyn ClusterStore>,
    ) -> Self {
        let validator = tokens.validator();
        let shared = ServerShared::new(registry, config, validator, Some(tokens), Some(store));
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The public ports this server forwards to its peers.
    pub(crate) fn forwards(&self) -> super::forwards::Forwards {
        self.shared.forwards.clone()
    }

    /// The server configuration now.
    pub fn config(&self) -> Arc<TunnelServerConfig> {
        self.shared.config.current()
    }

    /// The server's settings, which a reload replaces.
    pub(crate) fn live_config(&self) -> LiveServerConfig {
        self.shared.config.clone()
    }

    /// A hook for the host's `HttpServer::on_connect` (plain TCP, or TLS
    /// through actix-tls's rustls 0.23 acceptor):
    /// TCP keepalive and `TCP_USER_TIMEOUT` at the heartbeat timeout on each
    /// accepted connection. Without it, an agent that stops reading freezes
    /// its WebSocket actor (actix-web#2441) for as long as its peer keeps the
    /// TCP connection open; the registry then drops the tunnel and its ports,
    /// but the actor, its socket and the visitors waiting in its mailbox stay
    /// until that connection dies. `serve` installs it.
    pub fn on_connect(&self) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
        // the heartbeat timeout as it is now: a reload may change it
        let settings = self.shared.config.clone();
        move |connection, _| {
            let tls = connection.downcast_ref::<TlsStream<TcpStream>>();
            let tcp = connection
                .downcast_ref::<TcpStream>()
                .or_else(|| tls.map(|s| s.get_ref().0));
            if let Some(tcp) = tcp {
                harden_control_socket(tcp, settings.current().heartbeat_timeout);
            }
        }
    }

    /// Mounts the control route on `config.control_path`:
    /// `App::new().configure(|c| handler.configure(c))`. Give the host's
    /// `HttpServer` `.tcp_nodelay(true)`: without it, small frames wait for
    /// Nagle's algorithm and delayed ACKs (40 ms a round trip); and
    /// `.on_connect(handler.on_connect())` (see [`Self::on_connect`]).
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let shared = self.shared.clone();
        cfg.app_data(web::Data::from(Arc::new(shared))).route(
            &self.shared.config.current().control_path,
            web::get().to(upgrade),
        );
    }

    /// Serves one raw TCP connection: the HTTP upgrade, then the control
    /// channel, until the session ends. Works from any tokio task: the
    /// session runs on the library's runtime thread.
    pub async fn handle_connection(
        &self,
        stream: TcpStream,
        client_addr: SocketAddr,
    ) -> Result<()> {
        let std = stream.into_std()?;
        let shared = self.shared.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = runtime::arbiter().spawn_fn(move || {
            actix::spawn(async move {
                let _ = done_tx.send(raw_connection::serve(shared, std, client_addr).await);
            });
        });
        if !spawned {
            return Err(TunnelError::Shutdown);
        }
        done_rx.await.map_err(|_| TunnelError::Shutdown)?
    }
}

impl std::fmt::Debug for ControlHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHandler")
            .field("config", &self.shared.config.current())
            .finish_non_exhaustive()
    }
}

async fn upgrade(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Arc<ServerShared>>,
) -> std::result::Result<HttpResponse, actix_web::Error> {
    let peer = req
        .peer_addr()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let place = AuthPlace::take(shared.get_ref(), peer);
    let channel = ControlChannel::new(shared.get_ref().clone(), peer, place);
    let incoming = Turns::new(FrameGuard::new(payload, MAX_MESSAGE_SIZE), chunk_len);
    ws::WsResponseBuilder::new(channel, &req, incoming)
        .frame_size(MAX_MESSAGE_SIZE)
        .start()
}
