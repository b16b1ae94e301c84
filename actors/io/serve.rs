//! `serve`: a whole tunnel server (actix-web `HttpServer` with the control
//! route) that stops promptly and politely on SIGINT or SIGTERM: agents are
//! told (`Disconnect`), public ports and the control port close, and it
//! returns within about a second. Used by the `zlayer-tunnel server` command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};

use super::signals::shutdown_signal;
use crate::actors::route_sync::{PeerOptions, RouteSync};
use crate::actors::token_sync::TokenSync;
use crate::actors::{ControlHandler, TunnelRegistry};
use crate::auth::{LiveTokens, TokenStore, TokenValidator};
use crate::cluster::ClusterStore;
use crate::config::TunnelServerConfig;

/// What `serve` needs.
pub struct ServeOptions {
    /// Addresses of the control listener.
    pub listen: Vec<SocketAddr>,
    /// Server settings (port range, heartbeats, limits).
    pub config: TunnelServerConfig,
    /// Who may connect.
    pub validator: TokenValidator,
    /// The accepted tokens with their scopes; when given, it replaces
    /// `validator` and each session is held to its token's scope.
    pub tokens: Option<TokenStore>,
    /// Where to serve `/healthz`, `/status` and `/metrics` (none: not served).
    pub admin_listen: Vec<SocketAddr>,
    /// Serve `wss://` with this configuration (see [`crate::tls::server_config`]);
    /// none: plain `ws://`.
    pub tls: Option<rustls::ServerConfig>,
    /// The cluster's store (`--etcd`): its tokens are accepted beside
    /// `tokens` and followed as they change; none: a server on its own.
    pub cluster: Option<Arc<dyn ClusterStore>>,
    /// In a cluster: who this server is to its peers; then it publishes its
    /// routes and answers the visitors of every service of the cluster.
    pub peer: Option<PeerOptions>,
}

/// `fixed` and the cluster's peer token, which may open access streams to
/// any service (a peer's forwarded visitors) and register none.
fn with_peer_token(fixed: TokenStore, token: &crate::auth::Secret) -> TokenStore {
    let scope = crate::auth::TokenScope {
        register: Some(Vec::new()),
        access: None,
        ports: None,
        visitors: crate::visitor_rules::VisitorRules::default(),
    };
    let hash = crate::auth::hash_token(token.expose());
    fixed.clone().with_hash(&hash, scope).unwrap_or(fixed)
}

/// Runs a tunnel server until SIGINT or SIGTERM; must run inside an actix `System`.
pub async fn serve(options: ServeOptions) -> std::io::Result<()> {
    let registry = Arc::new(TunnelRegistry::new(options.config.data_port_range));
    let handler = match (options.tokens, options.cluster) {
        (fixed, Some(store)) => {
            let mut fixed = fixed.unwrap_or_default();
            if let Some(peer) = &options.peer {
                fixed = with_peer_token(fixed, &peer.peer_token);
            }
            let live = LiveTokens::new(fixed.clone());
            TokenSync::start(store.clone(), live.clone(), fixed, (*registry).clone());
            let host = options.config.bind_host.clone();
            let limits = options.config.flow_limits();
            let handler =
                ControlHandler::in_cluster(registry.clone(), options.config, live, store.clone());
            if let Some(peer) = options.peer {
                let forwards = handler.forwards();
                let listening = (host, limits);
                RouteSync::start(store, peer, (*registry).clone(), listening, forwards);
            }
            handler
        }
        (Some(store), None) => ControlHandler::with_tokens(registry.clone(), options.config, store),
        (None, None) => ControlHandler::new(registry.clone(), options.config, options.validator),
    };
    let hardening = handler.on_connect();
    let server = HttpServer::new(move || {
        let handler = handler.clone();
        App::new().configure(move |c| handler.configure(c))
    })
    .on_connect(hardening)
    .disable_signals()
    .tcp_nodelay(true) // small frames must not wait for Nagle and delayed ACKs
    .shutdown_timeout(1);
    let tls = options.tls;
    let server = options
        .listen
        .iter()
        .try_fold(server, |s, addr| match &tls {
            Some(config) => s.bind_rustls_0_23(addr, config.clone()),
            None => s.bind(addr),
        })?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    for addr in server.addrs() {
        tracing::info!(%addr, scheme, "control channel listening");
    }
    let server = server.run();
    let handle = server.handle();
    let admin = if options.admin_listen.is_empty() {
        None
    } else {
        Some(super::admin::start(
            &options.admin_listen,
            registry.clone(),
        )?)
    };
    let admin_handle = admin.as_ref().map(actix_web::dev::Server::handle);
    if let Some(admin) = admin {
        actix_web::rt::spawn(admin);
    }
    actix_web::rt::spawn(async move {
        if shutdown_signal().await.is_ok() {
            let agents = registry.close_all("server shutting down").await;
            tracing::info!(agents, "shutting down");
            tokio::time::sleep(Duration::from_millis(50)).await; // let the Disconnects go out
            if let Some(admin) = admin_handle {
                admin.stop(true).await;
            }
            handle.stop(true).await;
        }
    });
    server.await
}
