//! `AgentShared`: what an agent's link actors share with their handle
//! (`TunnelAgent`), one per link: the link's settings and TLS, callbacks,
//! counters and view, the ports the links agree on, and how the link
//! reports the end of the agent. Not an actor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::agent_view::{AgentView, PublishedCallback};
use super::tunnel_agent::ConnectionCallback;
use crate::accounting::Counters;
use crate::config::TunnelClientConfig;
use crate::{Result, TunnelError};

/// The agent ended: `Ok` when stopped, `Err` for a fatal refusal.
pub(crate) struct AgentStopped(pub(crate) Result<()>);

/// What the connection actor shares with its handle.
pub(crate) struct AgentShared {
    pub(crate) config: TunnelClientConfig,
    /// The services it publishes now: the configured ones, and those added
    /// and removed since (`TunnelAgent::add_service`); registered on each
    /// authentication.
    pub(crate) services: Arc<Mutex<Vec<crate::config::ServiceConfig>>>,
    pub(crate) client_id: Uuid,
    /// Which of the agent's links to its server this is (0 for the first;
    /// the others open only to a server that takes several, `LINKS`).
    pub(crate) connection: usize,
    pub(crate) on_connection: Option<ConnectionCallback>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) view: Arc<AgentView>,
    pub(crate) on_published: Option<PublishedCallback>,
    /// The public port each service with `remote_port = 0` was given by the
    /// first server that gave one, shared by the agent's links: the others
    /// ask for the same.
    pub(crate) assigned: Arc<watch::Sender<HashMap<String, u16>>>,
    /// True when the agent links to several servers: a port a server
    /// refuses is asked again, never traded for another.
    pub(crate) several_links: bool,
    /// For `wss://`: whom to trust (built once, at `run()`).
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    pub(super) done: Mutex<Option<oneshot::Sender<Result<()>>>>,
    /// What visitors make the agent log, at most once a second per kind.
    pub(super) logs: Mutex<crate::log_limit::LogLimiter>,
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

    /// Leaves `run()`'s answer to the agent's other links: an extra link
    /// the server does not take ends without a verdict.
    pub(crate) fn stand_down(&self) {
        drop(self.done.lock().ok().and_then(|mut d| d.take()));
    }

    /// Reports the end of the agent to `run()`.
    pub(crate) fn done(&self, stopped: AgentStopped) {
        let sender = self.done.lock().ok().and_then(|mut d| d.take());
        if let Some(sender) = sender {
            let _ = sender.send(stopped.0);
        }
    }
}

/// The TLS configuration of a `wss://` agent: the CA file it was given, or
/// the system roots. `None` for `ws://`.
pub(super) fn client_tls(config: &TunnelClientConfig) -> Result<Option<Arc<rustls::ClientConfig>>> {
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

/// Waits (at most `connect_timeout`) until the first link has been given a
/// port for every service that asks for any, so that the other links ask
/// their servers for the same ports.
pub(crate) async fn first_grants(
    config: &TunnelClientConfig,
    assigned: &watch::Sender<HashMap<String, u16>>,
) {
    let wanted: Vec<String> = (config.services.iter())
        .filter(|s| s.remote_port == 0)
        .map(|s| s.name.clone())
        .collect();
    let mut grants = assigned.subscribe();
    let all_given = grants.wait_for(|ports| wanted.iter().all(|n| ports.contains_key(n)));
    let _ = tokio::time::timeout(config.connect_timeout, all_given).await;
}
