//! `serve`: a whole tunnel server (actix-web `HttpServer` with the control
//! route) that stops promptly and politely on SIGINT or SIGTERM: agents are
//! told (`Disconnect`), public ports and the control port close, and it
//! returns within about a second. Used by the `zlayer-tunnel server` command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};

use super::signals::shutdown_signal;
use crate::actors::handles::reload::{ConfigReload, ReloadedTokens, Reloader};
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
    /// Who may use the admin endpoints ([`AdminAccess::open`]: anyone may
    /// read, nothing may be changed).
    ///
    /// [`AdminAccess::open`]: crate::admin_access::AdminAccess::open
    pub admin_access: crate::admin_access::AdminAccess,
    /// Reads the settings and `tokens` again, on `SIGHUP` and `POST /reload`
    /// (admin token required): new tokens are accepted, a removed token's
    /// tunnels closed, changed limits apply to the tunnels that connect
    /// next; none: no reload. In a cluster only the settings are reloaded:
    /// its tokens live in its store.
    pub reload: Option<ConfigReload>,
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
        peer: true,
    };
    let hash = crate::auth::hash_token(token.expose());
    fixed.clone().with_hash(&hash, scope).unwrap_or(fixed)
}

/// Runs a tunnel server until SIGINT or SIGTERM; must run inside an actix `System`.
pub async fn serve(options: ServeOptions) -> std::io::Result<()> {
    let registry = Arc::new(TunnelRegistry::new(options.config.data_port_range));
    let mut reloaded_tokens = None;
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
        (Some(store), None) => {
            let live = LiveTokens::new(store.clone());
            reloaded_tokens = Some(ReloadedTokens::new(live.clone(), store));
            ControlHandler::with_live_tokens(registry.clone(), options.config, live)
        }
        (None, None) => ControlHandler::new(registry.clone(), options.config, options.validator),
    };
    let reloader = options.reload.map(|read| Reloader {
        read,
        settings: handler.live_config(),
        tokens: reloaded_tokens,
        registry: (*registry).clone(),
    });
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
    let server = options.listen.iter().try_fold(server, |s, addr| {
        match &tls {
            Some(config) => s.bind_rustls_0_23(addr, config.clone()),
            None => s.bind(addr),
        }
        .map_err(|e| super::bind_error(e, *addr, "the control channel (--listen)"))
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
        let source = ServerAdmin {
            registry: (*registry).clone(),
            reloader: reloader.clone(),
        };
        Some(super::admin::start_guarded(
            &options.admin_listen,
            Arc::new(source),
            options.admin_access.clone(),
        )?)
    };
    let admin_handle = admin.as_ref().map(actix_web::dev::Server::handle);
    if let Some(admin) = admin {
        actix_web::rt::spawn(admin);
    }
    if let Some(reloader) = reloader {
        actix_web::rt::spawn(reload_on_hangup(reloader));
    }
    actix_web::rt::spawn(async move {
        if shutdown_signal().await.is_ok() {
            let agents = registry.close_all("server shutting down").await;
            tracing::info!(agents, "shutting down");
            tokio::time::sleep(Duration::from_millis(50)).await; // let the Disconnects go out
            if let Some(admin) = admin_handle {
                // at once: a scraper's kept-alive connection must not hold
                // the stop for the listener's graceful second
                admin.stop(false).await;
            }
            handle.stop(true).await;
        }
    });
    server.await
}

/// Reloads the configuration on each `SIGHUP` (unix), saying what changed or why
/// nothing did.
async fn reload_on_hangup(reloader: Reloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return tracing::warn!("cannot listen for SIGHUP: reload with POST /reload");
        };
        while hangups.recv().await.is_some() {
            if let Err(error) = reloader.reload().await {
                tracing::error!(%error, "configuration not reloaded; nothing changed");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = reloader;
}

/// What a server's admin endpoints read, and how it reloads.
struct ServerAdmin {
    registry: TunnelRegistry,
    reloader: Option<Reloader>,
}

impl super::admin::AdminSource for ServerAdmin {
    fn status(&self) -> futures::future::LocalBoxFuture<'_, serde_json::Value> {
        self.registry.status()
    }

    fn metrics(&self) -> futures::future::LocalBoxFuture<'_, String> {
        self.registry.metrics()
    }

    fn reload(
        &self,
    ) -> Option<futures::future::LocalBoxFuture<'_, Result<serde_json::Value, String>>> {
        let reloader = self.reloader.clone()?;
        Some(Box::pin(async move {
            let report = reloader.reload().await?;
            Ok(serde_json::to_value(report).unwrap_or_default())
        }))
    }
}
