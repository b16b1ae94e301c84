//! `TunnelAgent` (the seed's type): the public handle of an agent. Not an
//! actor: `run()` starts an `AgentConnection` under an actix `Supervisor` on
//! the library's runtime thread and waits until the agent is stopped or meets
//! a fault that retrying cannot fix (the server refused the token).

use std::sync::{Arc, Mutex};

use actix::{Addr, Supervisor};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::agent_view::{AgentView, PublishedCallback};
use crate::accounting::{Counters, Snapshot};
use crate::actors::agent_connection::{AgentConnection, OpenStream, StopAgent};
use crate::actors::io::{admin, runtime};
use crate::config::TunnelClientConfig;
use crate::status::AgentStatus;
use crate::{Result, TunnelError};
use std::net::SocketAddr;

/// Decides whether to accept a visitor: `(service_id, connection_id, client_addr) -> accept`.
pub type ConnectionCallback = Arc<dyn Fn(Uuid, Uuid, String) -> bool + Send + Sync>;

/// The agent ended: `Ok` when stopped, `Err` for a fatal refusal.
pub(crate) struct AgentStopped(pub(crate) Result<()>);

/// What the connection actor shares with its handle.
pub(crate) struct AgentShared {
    pub(crate) config: TunnelClientConfig,
    pub(crate) client_id: Uuid,
    pub(crate) on_connection: Option<ConnectionCallback>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) view: Arc<AgentView>,
    pub(crate) on_published: Option<PublishedCallback>,
    /// For `wss://`: whom to trust (built once, at `run()`).
    tls: Option<Arc<rustls::ClientConfig>>,
    done: Mutex<Option<oneshot::Sender<Result<()>>>>,
    /// What visitors make the agent log, at most once a second per kind.
    logs: Mutex<crate::log_limit::LogLimiter>,
}

impl AgentShared {
    /// A visitor (through the server) made `event` happen: `Some(held_back)`
    /// when a line may be logged now, with how many were not since the last.
    pub(crate) fn remote_event(&self, event: crate::log_limit::RemoteEvent) -> Option<u64> {
        let mut logs = self.logs.lock().ok()?;
        logs.admit(event, std::time::Instant::now())
    }

    /// Whether the `on_connection` callback, if any, lets visitor `id` from
    /// `client_addr` reach service `service_id`.
    pub(crate) fn admits(&self, service_id: Uuid, id: Uuid, client_addr: &str) -> bool {
        self.on_connection
            .as_ref()
            .is_none_or(|cb| cb(service_id, id, client_addr.to_owned()))
    }

    /// A WebSocket client: HTTP/1.1 only (WebSockets do not run over h2
    /// here), and TCP_NODELAY, without which Nagle's algorithm and delayed
    /// ACKs hold small frames (a `Connect`, a 64-byte reply) for 40 ms.
    pub(crate) fn client(&self) -> awc::Client {
        use actix_service::Service;
        use actix_tls::connect::{ConnectError, ConnectInfo, ConnectorService};
        let tcp = ConnectorService::default();
        let nodelay = actix_service::fn_service(move |req: ConnectInfo<awc::http::Uri>| {
            let tcp = tcp.clone();
            async move {
                let connection = tcp.call(req).await?;
                let _ = connection.io_ref().set_nodelay(true);
                Ok::<_, ConnectError>(connection)
            }
        });
        let connector = awc::Connector::new().connector(nodelay);
        let connector = match &self.tls {
            Some(tls) => connector.rustls_0_23(tls.clone()),
            None => connector,
        };
        // no `max_http_version` here: awc rebuilds the TLS connector from its
        // own roots when it is set, dropping ours; our TLS configuration
        // offers only http/1.1 (ALPN), and plain TCP is HTTP/1.1 anyway
        awc::Client::builder().connector(connector).finish()
    }

    /// Whether the end of the agent was reported.
    pub(crate) fn is_done(&self) -> bool {
        self.done.lock().map_or(true, |d| d.is_none())
    }

    /// Reports the end of the agent to `run()`.
    pub(crate) fn done(&self, stopped: AgentStopped) {
        let sender = self.done.lock().ok().and_then(|mut d| d.take());
        if let Some(sender) = sender {
            let _ = sender.send(stopped.0);
        }
    }
}

/// A tunnel agent: dials out to a server, registers its services, forwards
/// visitors to them, and reconnects on exponential backoff.
#[derive(Clone)]
pub struct TunnelAgent {
    config: TunnelClientConfig,
    client_id: Uuid,
    on_connection: Option<ConnectionCallback>,
    on_published: Option<PublishedCallback>,
    counters: Arc<Counters>,
    view: Arc<AgentView>,
    control: Arc<Mutex<Control>>,
}

#[derive(Default)]
struct Control {
    addr: Option<Addr<AgentConnection>>,
    stop_requested: bool,
}

impl TunnelAgent {
    /// An agent for `config`; its client id (from the config, or drawn now) is kept for its life.
    #[must_use]
    pub fn new(config: TunnelClientConfig) -> Self {
        let client_id = config.client_id.unwrap_or_else(Uuid::new_v4);
        let view = Arc::new(AgentView::new(&config.services));
        Self {
            config,
            client_id,
            on_connection: None,
            on_published: None,
            counters: Arc::new(Counters::new()),
            view,
            control: Arc::default(),
        }
    }

    /// Sets the callback told of each service the server publishes, with its
    /// public address (after every reconnect too).
    #[must_use]
    pub fn on_published(mut self, callback: PublishedCallback) -> Self {
        self.on_published = Some(callback);
        self
    }

    /// The agent's session and services, with live counters.
    pub fn status(&self) -> AgentStatus {
        let session = self.view.session();
        let (tunnel_id, since, services) = match session {
            Some((id, since, services)) => (Some(id), Some(since), services),
            None => (None, None, Vec::new()),
        };
        AgentStatus {
            server_url: self.config.server_url.clone(),
            client_id: self.client_id,
            connected: tunnel_id.is_some(),
            state: self.view.state(),
            tunnel_id,
            connected_since: since,
            services,
            stats: self.counters.snapshot(),
        }
    }

    /// Opens an access stream through the server; false if the agent is not running.
    pub(crate) fn open_stream(&self, open: OpenStream) -> bool {
        let addr = self.control.lock().ok().and_then(|c| c.addr.clone());
        addr.map(|addr| addr.do_send(open)).is_some()
    }

    /// Traffic of service `name` since the agent started (all sessions).
    pub fn service_stats(&self, name: &str) -> Option<Snapshot> {
        self.view.counters(name).map(|c| c.snapshot())
    }

    /// Serves `/healthz`, `/status` and `/metrics` about this agent on
    /// `listen`; must run inside an actix `System`. Runs until the returned
    /// server is stopped.
    pub fn serve_admin(&self, listen: &[SocketAddr]) -> std::io::Result<actix_web::dev::Server> {
        admin::start(listen, Arc::new(self.clone()))
    }

    /// Sets the callback that accepts or refuses each visitor.
    #[must_use]
    pub fn on_connection(mut self, callback: ConnectionCallback) -> Self {
        self.on_connection = Some(callback);
        self
    }

    /// The stable client id sent in every `Auth`.
    pub fn client_id(&self) -> Uuid {
        self.client_id
    }

    /// Traffic through this agent so far.
    pub fn stats(&self) -> Snapshot {
        self.counters.snapshot()
    }

    /// Runs until [`stop`](Self::stop) (then `Ok`) or until the server refuses
    /// the token (then `Err`). Every other fault is retried on backoff.
    pub async fn run(&self) -> Result<()> {
        self.config.validate()?;
        let tls = client_tls(&self.config)?;
        let (done_tx, done_rx) = oneshot::channel();
        let shared = Arc::new(AgentShared {
            config: self.config.clone(),
            client_id: self.client_id,
            on_connection: self.on_connection.clone(),
            counters: self.counters.clone(),
            view: self.view.clone(),
            on_published: self.on_published.clone(),
            tls,
            done: Mutex::new(Some(done_tx)),
            logs: Mutex::default(),
        });
        let control = self.control.clone();
        let spawned = runtime::arbiter().spawn_fn(move || {
            let addr = Supervisor::start(move |_| AgentConnection::new(shared));
            if let Ok(mut c) = control.lock() {
                if c.stop_requested {
                    addr.do_send(StopAgent);
                }
                c.addr = Some(addr);
            }
        });
        if !spawned {
            return Err(TunnelError::Shutdown);
        }
        let result = done_rx.await.unwrap_or(Err(TunnelError::Shutdown));
        if let Ok(mut c) = self.control.lock() {
            c.addr = None; // the last address: the actor ends instead of restarting
        }
        result
    }

    /// Stops the agent: its streams are closed and `run()` returns `Ok`.
    pub fn stop(&self) {
        if let Ok(mut c) = self.control.lock() {
            c.stop_requested = true;
            if let Some(addr) = &c.addr {
                addr.do_send(StopAgent);
            }
        }
    }

    /// The seed's name for [`stop`](Self::stop).
    pub fn disconnect(&self) {
        self.stop();
    }
}

/// The TLS configuration of a `wss://` agent: the CA file it was given, or
/// the system roots. `None` for `ws://`.
fn client_tls(config: &TunnelClientConfig) -> Result<Option<Arc<rustls::ClientConfig>>> {
    if !config.server_url.starts_with("wss://") {
        return Ok(None);
    }
    let tls = match &config.ca_cert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                TunnelError::config(format!("ca_cert: cannot read {}: {e}", path.display()))
            })?;
            crate::tls::client_config_with_ca(&pem)
                .map_err(|e| TunnelError::config(format!("ca_cert {}: {e}", path.display())))?
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::debug!(%error, "a system root certificate could not be loaded");
            }
            crate::tls::client_config_with_roots(found.certs)
                .map_err(|e| TunnelError::config(format!("system roots: {e}; give ca_cert")))?
        }
    };
    Ok(Some(Arc::new(tls)))
}

impl std::fmt::Debug for TunnelAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelAgent")
            .field("server_url", &self.config.server_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}
