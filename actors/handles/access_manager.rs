//! `AccessManager` (the seed's type): on-demand access, like `cloudflared
//! access tcp`: a temporary local port for a remote service, with a TTL
//! enforced live. Not an actor: a handle over `AccessSession` actors, which
//! run on the library's runtime thread.
//!
//! With a server (`with_server`), each local connection becomes a stream
//! through that tunnel server to the agent that registered the service named
//! by the session's endpoint (the `Open` message of docs/PROTOCOL.md §4.5);
//! `remote_addr` is what that agent dials if its `access_targets` allow it,
//! and is otherwise only shown. Without a server, the manager dials
//! `remote_addr` directly, as the original does: for nodes that share an
//! overlay network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actix::Addr;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::tunnel_agent::TunnelAgent;
use crate::access::{AccessSessionInfo, DEFAULT_GRACE, DEFAULT_TTL, Lifetime};
use crate::accounting::{CounterSet, Counters};
use crate::actors::access_session::{AccessSession, EndSession, Route, SessionWiring};
use crate::actors::io::{admin, runtime};
use crate::config::TunnelClientConfig;
use crate::status::TunnelState;
use crate::{Result, TunnelError};

/// A session just started: where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedSession {
    /// The session's id (for `end_session`).
    pub id: Uuid,
    /// The local address to connect to.
    pub local_addr: SocketAddr,
    /// When it expires.
    pub expires_at: SystemTime,
}

struct Entry {
    endpoint: String,
    remote_addr: String,
    local_addr: SocketAddr,
    lifetime: Lifetime,
    counters: Arc<Counters>,
    actor: Addr<AccessSession>,
}

/// On-demand access sessions.
pub struct AccessManager {
    default_ttl: Duration,
    grace: Duration,
    /// The access link to a tunnel server (relay mode), started with the first session.
    link: Option<TunnelAgent>,
    link_started: std::sync::Once,
    sessions: Mutex<HashMap<Uuid, Entry>>,
}

impl Default for AccessManager {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessManager {
    /// A manager with a one-hour default TTL and a 5-second grace for open
    /// connections at expiry.
    #[must_use]
    pub fn new() -> Self {
        Self {
            default_ttl: DEFAULT_TTL,
            grace: DEFAULT_GRACE,
            link: None,
            link_started: std::sync::Once::new(),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the TTL of sessions started without one.
    #[must_use]
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Relays sessions through the tunnel server at `url` (`ws://` or
    /// `wss://`), authenticated with `token`, instead of dialing directly.
    #[must_use]
    pub fn with_server(mut self, url: impl Into<String>, token: impl Into<String>) -> Self {
        self.link = Some(TunnelAgent::new(
            TunnelClientConfig::new(url, token).with_connections(1),
        ));
        self
    }

    /// Relays sessions through the tunnel server `config` names (its
    /// `server_url`, `token`, and `ca_cert` for a `wss://` server whose
    /// certificate a private CA signed), instead of dialing directly; one
    /// link (its sessions' streams all travel on the first).
    #[must_use]
    pub fn with_server_config(mut self, config: TunnelClientConfig) -> Self {
        self.link = Some(TunnelAgent::new(config.with_connections(1)));
        self
    }

    /// Sets how long open connections may finish once their session expired.
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Starts a session: a listener on 127.0.0.1 (`local_port`, or any free
    /// port) whose connections reach `remote_addr`, until `ttl` (or the default).
    pub async fn start_session(
        &self,
        endpoint: String,
        remote_addr: String,
        local_port: Option<u16>,
        ttl: Option<Duration>,
    ) -> Result<StartedSession> {
        let ttl = ttl.unwrap_or(self.default_ttl);
        if ttl.is_zero() {
            return Err(TunnelError::config("ttl: must be longer than 0s"));
        }
        let id = Uuid::new_v4();
        let counters = Arc::new(Counters::new());
        let route = match &self.link {
            Some(link) => {
                self.start_link(link)?;
                Self::link_ready(link).await?;
                // an unknown service fails now, not at each connection
                link.probe_service(&endpoint)
                    .await
                    .map_err(TunnelError::registry)?;
                Route::Relay {
                    link: Box::new(link.clone()),
                    endpoint: endpoint.clone(),
                }
            }
            None => Route::Direct,
        };
        let wiring = SessionWiring {
            id,
            route,
            remote: remote_addr.clone(),
            ttl,
            grace: self.grace,
            counters: CounterSet::new(vec![counters.clone()]),
        };
        let port = local_port.unwrap_or(0);
        let (actor, local_addr) = start_on_runtime(port, wiring).await?;
        let started = SystemTime::now();
        tracing::info!(session = %id, %endpoint, %local_addr, remote = %remote_addr, ttl = %humantime::format_duration(ttl), "access session started");
        let entry = Entry {
            endpoint,
            remote_addr,
            local_addr,
            lifetime: Lifetime { started, ttl },
            counters,
            actor,
        };
        self.lock()?.insert(id, entry);
        Ok(StartedSession {
            id,
            local_addr,
            expires_at: started + ttl,
        })
    }

    /// Every session, expired ones included until `cleanup_expired`.
    pub fn list_sessions(&self) -> Vec<AccessSessionInfo> {
        let now = SystemTime::now();
        let Ok(sessions) = self.lock() else {
            return Vec::new();
        };
        let mut all: Vec<_> = sessions
            .iter()
            .map(|(id, e)| AccessSessionInfo {
                id: *id,
                endpoint: e.endpoint.clone(),
                local_addr: e.local_addr,
                remote_addr: e.remote_addr.clone(),
                started: e.lifetime.started,
                remaining: e.lifetime.remaining(now),
                expired: e.lifetime.is_expired(now),
                stats: e.counters.snapshot(),
            })
            .collect();
        all.sort_by_key(|s| s.started);
        all
    }

    /// Forgets expired sessions; how many.
    pub fn cleanup_expired(&self) -> usize {
        let now = SystemTime::now();
        let Ok(mut sessions) = self.lock() else {
            return 0;
        };
        let before = sessions.len();
        sessions.retain(|_, e| !e.lifetime.is_expired(now));
        before - sessions.len()
    }

    /// Ends session `id` now: its listener closes, open connections get the
    /// grace period. False if there is no such session.
    pub fn end_session(&self, id: Uuid) -> bool {
        let Ok(mut sessions) = self.lock() else {
            return false;
        };
        let Some(entry) = sessions.remove(&id) else {
            return false;
        };
        entry.actor.do_send(EndSession);
        true
    }

    /// Waits until the access link is authenticated (or fails).
    async fn link_ready(link: &TunnelAgent) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = link.status();
            let url = &status.server_url;
            let unreachable = |why: &str| {
                TunnelError::connection_msg(format!("cannot reach the tunnel server {url}: {why}"))
            };
            match status.state {
                TunnelState::Connected { .. } => return Ok(()),
                TunnelState::Failed { error } => return Err(TunnelError::auth_refused(&error)),
                // a certificate not trusted, not TLS: waiting cannot help
                TunnelState::Reconnecting {
                    last_error,
                    permanent: true,
                    ..
                } => return Err(unreachable(&last_error)),
                TunnelState::Reconnecting { last_error, .. }
                    if tokio::time::Instant::now() >= deadline =>
                {
                    return Err(unreachable(&last_error));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(unreachable("no answer within 10 s"));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Starts the access link once; it reconnects on its own from then on.
    fn start_link(&self, link: &TunnelAgent) -> Result<()> {
        let mut spawned = true;
        self.link_started.call_once(|| {
            let runner = link.clone();
            spawned = runtime::arbiter().spawn(async move {
                if let Err(error) = runner.run().await {
                    tracing::error!(%error, "the access link to the tunnel server failed");
                }
            });
        });
        if spawned {
            Ok(())
        } else {
            Err(TunnelError::Shutdown)
        }
    }

    /// Serves `/healthz`, `/status` and `/metrics` about these on `listen`;
    /// must run inside an actix `System`. Runs until the returned server is stopped.
    pub fn serve_admin(
        self: &Arc<Self>,
        listen: &[SocketAddr],
    ) -> std::io::Result<actix_web::dev::Server> {
        admin::start(listen, self.clone())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, Entry>>> {
        self.sessions.lock().map_err(|_| TunnelError::Shutdown)
    }
}

/// Binds the listener and starts the session actor on the library's runtime
/// thread (a socket belongs to the runtime that polls it).
async fn start_on_runtime(
    port: u16,
    wiring: SessionWiring,
) -> Result<(Addr<AccessSession>, SocketAddr)> {
    let (tx, rx) = oneshot::channel();
    let spawned = runtime::arbiter().spawn(async move {
        let bound = tokio::net::TcpListener::bind(("127.0.0.1", port)).await;
        let started = bound.and_then(|listener| {
            let local = listener.local_addr()?;
            Ok((AccessSession::start(listener, wiring), local))
        });
        let _ = tx.send(started);
    });
    if !spawned {
        return Err(TunnelError::Shutdown);
    }
    match rx.await {
        Ok(Ok(started)) => Ok(started),
        Ok(Err(e)) => Err(TunnelError::config(format!(
            "local_port {port}: cannot listen on 127.0.0.1: {e}"
        ))),
        Err(_) => Err(TunnelError::Shutdown),
    }
}

impl Drop for AccessManager {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            link.stop();
        }
    }
}

impl std::fmt::Debug for AccessManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessManager")
            .field("default_ttl", &self.default_ttl)
            .finish_non_exhaustive()
    }
}
