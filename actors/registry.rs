//! `Registry`: one per server. Owns the port pool, the tunnels (by token hash
//! and client id, for takeover), and their liveness watchdog.
//!
//! Receives `OpenTunnel`, `ReportAlive`, `TunnelClosed`, `ListTunnels` and
//! `CloseAll`; ports (`AllocatePort`, `ReleasePort`, `CountFreePorts`) in
//! `registry/ports.rs`, services (`ServiceRegistered`, `FindService`) in
//! `registry/services.rs`. Sends `CloseTunnel` to a control channel that is
//! taken over or has gone silent. Lives on the library's runtime thread;
//! [`TunnelRegistry`] is the public handle to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Error;
use super::control_channel::Relay;
use crate::accounting::{Counters, Snapshot};
use crate::liveness::Liveness;
use crate::ports::{PortError, PortPool};
use crate::protocol::ServiceProtocol;
pub use crate::status::{ServiceInfo, TunnelInfo};
pub(crate) use ports::{AllocatePort, CountFreePorts, ReleasePort};
pub(crate) use services::{FindService, FlowView, ServiceEntry, ServiceRegistered};

/// The public handle, in `actors/handles/`; re-exported here so that
/// `actors::registry::TunnelRegistry` still names it.
pub use super::handles::tunnel_registry::TunnelRegistry;

mod ports;
mod services;

/// Asks a control channel to end its session (takeover, silence, shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct CloseTunnel {
    /// Why, sent to the agent in `Disconnect`.
    pub reason: String,
}

/// Registers an authenticated session; answers its tunnel id and the token
/// that stops everything the tunnel owns (listeners, connections).
#[derive(Message)]
#[rtype(result = "Result<(Uuid, CancellationToken), Error>")]
pub(crate) struct OpenTunnel {
    pub(crate) token_hash: String,
    pub(crate) client_id: Uuid,
    pub(crate) peer: SocketAddr,
    pub(crate) channel: Recipient<CloseTunnel>,
    /// Where relayed access streams for this tunnel's services go.
    pub(crate) relay: Recipient<Relay>,
    pub(crate) timeout: Duration,
    pub(crate) max_tunnels: usize,
    pub(crate) counters: Arc<Counters>,
}

/// A control channel's periodic proof of life (it may freeze; see ACTIX-NOTES).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ReportAlive {
    pub(crate) tunnel_id: Uuid,
}

/// A control channel ended; frees everything its tunnel held.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct TunnelClosed {
    pub(crate) tunnel_id: Uuid,
}

/// Lists the connected tunnels.
#[derive(Message)]
#[rtype(result = "Vec<TunnelInfo>")]
pub(crate) struct ListTunnels;

/// Closes every tunnel (server shutdown); answers how many were open.
#[derive(Message)]
#[rtype(result = "usize")]
pub(crate) struct CloseAll {
    pub(crate) reason: String,
}

struct TunnelEntry {
    info: TunnelInfo,
    key: (String, Uuid),
    channel: Recipient<CloseTunnel>,
    relay: Recipient<Relay>,
    liveness: Liveness,
    cancel: CancellationToken,
    counters: Arc<Counters>,
    services: Vec<(ServiceEntry, Arc<Counters>, Option<FlowView>)>,
}

/// The registry actor.
pub(crate) struct Registry {
    ports: Result<PortPool, PortError>,
    tunnels: HashMap<Uuid, TunnelEntry>,
    by_client: HashMap<(String, Uuid), Uuid>,
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(500), |act, _| {
            act.drop_silent(Instant::now())
        });
    }
}

impl Handler<OpenTunnel> for Registry {
    type Result = Result<(Uuid, CancellationToken), Error>;

    fn handle(&mut self, msg: OpenTunnel, _: &mut Self::Context) -> Self::Result {
        let key = (msg.token_hash, msg.client_id);
        if let Some(old) = self.by_client.get(&key).copied() {
            tracing::info!(tunnel_id = %old, peer = %msg.peer, "session taken over by a reconnecting agent");
            self.close(old, "taken over by a new session of the same agent");
        }
        if self.tunnels.len() >= msg.max_tunnels {
            return Err(Error::TooManyTunnels {
                max: msg.max_tunnels,
            });
        }
        let id = Uuid::new_v4();
        let info = TunnelInfo {
            id,
            client_id: msg.client_id,
            client_addr: msg.peer,
            connected_since: SystemTime::now(),
            ports: Vec::new(),
            services: Vec::new(),
            stats: Snapshot::default(),
        };
        let liveness = Liveness::new(Instant::now(), msg.timeout);
        self.by_client.insert(key.clone(), id);
        let channel = msg.channel;
        let cancel = CancellationToken::new();
        let entry = TunnelEntry {
            info,
            key,
            channel,
            relay: msg.relay,
            liveness,
            cancel: cancel.clone(),
            counters: msg.counters,
            services: Vec::new(),
        };
        self.tunnels.insert(id, entry);
        Ok((id, cancel))
    }
}

impl Handler<ReportAlive> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ReportAlive, _: &mut Self::Context) {
        if let Some(entry) = self.tunnels.get_mut(&msg.tunnel_id) {
            entry.liveness.seen(Instant::now());
        }
    }
}

impl Handler<TunnelClosed> for Registry {
    type Result = ();

    fn handle(&mut self, msg: TunnelClosed, _: &mut Self::Context) {
        self.forget(msg.tunnel_id);
    }
}

impl Handler<ListTunnels> for Registry {
    type Result = Vec<TunnelInfo>;

    fn handle(&mut self, _: ListTunnels, _: &mut Self::Context) -> Self::Result {
        self.tunnels.values().map(TunnelEntry::status).collect()
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: CloseAll, _: &mut Self::Context) -> usize {
        let ids: Vec<Uuid> = self.tunnels.keys().copied().collect();
        ids.iter().for_each(|id| self.close(*id, &msg.reason));
        ids.len()
    }
}

impl Registry {
    /// A registry of the ports in `range`; [`TunnelRegistry::new`] starts it.
    pub(crate) fn new(range: (u16, u16)) -> Self {
        Self {
            ports: PortPool::new(range),
            tunnels: HashMap::new(),
            by_client: HashMap::new(),
        }
    }

    /// Drops tunnels whose channel stopped reporting (a frozen WebSocket actor).
    fn drop_silent(&mut self, now: Instant) {
        let silent: Vec<Uuid> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.liveness.is_expired(now))
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            tracing::warn!(tunnel_id = %id, "tunnel stopped reporting; dropped by the registry");
            self.close(id, "heartbeat timeout");
        }
    }

    fn close(&mut self, id: Uuid, reason: &str) {
        if let Some(entry) = self.forget(id) {
            entry.channel.do_send(CloseTunnel {
                reason: reason.into(),
            });
        }
    }

    fn forget(&mut self, id: Uuid) -> Option<TunnelEntry> {
        let entry = self.tunnels.remove(&id)?;
        entry.cancel.cancel();
        if self.by_client.get(&entry.key) == Some(&id) {
            self.by_client.remove(&entry.key);
        }
        if let Ok(pool) = self.ports.as_mut() {
            entry.info.ports.iter().for_each(|p| {
                pool.release(*p);
            });
        }
        tracing::info!(tunnel_id = %id, ports = ?entry.info.ports, "tunnel closed, ports released");
        Some(entry)
    }
}
