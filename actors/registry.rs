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
use super::control_channel::RelayEnd;
use crate::accounting::{Counters, Snapshot};
pub use crate::status::{ServiceInfo, TunnelInfo};
use crate::tunnels::{ClosedTunnel, TunnelTable};
pub(crate) use ports::{AllocatePort, CountFreePorts, PortGrant, ReleasePort};
pub(crate) use services::{
    FindService, FlowView, PublicListener, ServiceEntry, ServiceHealthChanged, ServiceRegistered,
};

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
    pub(crate) relay: RelayEnd,
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

/// What the registry keeps of a tunnel beside the core's `TunnelTable`:
/// where its channel is, what stops it, its counters, for status pages.
struct TunnelIo {
    info: TunnelInfo,
    channel: Recipient<CloseTunnel>,
    relay: RelayEnd,
    cancel: CancellationToken,
    counters: Arc<Counters>,
    /// Live views of its services, by service id.
    views: HashMap<Uuid, (Arc<Counters>, Option<FlowView>)>,
    /// Its services whose agent's health checks fail now.
    unhealthy: std::collections::HashSet<Uuid>,
    /// The listeners of its services, by port (shared with replicas).
    listeners: HashMap<u16, PublicListener>,
}

/// The registry actor.
pub(crate) struct Registry {
    tunnels: TunnelTable<TunnelIo>,
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
        let id = Uuid::new_v4();
        let cancel = CancellationToken::new();
        let io = TunnelIo {
            info: TunnelInfo {
                id,
                client_id: msg.client_id,
                client_addr: msg.peer,
                connected_since: SystemTime::now(),
                ports: Vec::new(),
                services: Vec::new(),
                stats: Snapshot::default(),
            },
            channel: msg.channel,
            relay: msg.relay,
            cancel: cancel.clone(),
            counters: msg.counters,
            views: HashMap::new(),
            unhealthy: std::collections::HashSet::new(),
            listeners: HashMap::new(),
        };
        let agent = (msg.token_hash, msg.client_id);
        let liveness = (Instant::now(), msg.timeout);
        let opened = self.tunnels.open(id, agent, io, liveness, msg.max_tunnels);
        if let Some(old) = opened.taken_over {
            tracing::info!(tunnel_id = %old.id, peer = %msg.peer, "session taken over by a reconnecting agent");
            ended(old, Some("taken over by a new session of the same agent"));
        }
        if let Some(extra) = opened.displaced {
            let max = msg.max_tunnels;
            tracing::info!(tunnel_id = %extra.id, peer = %msg.peer, max, "an agent's extra link gives way to an agent without one (at the limit of tunnels)");
            ended(
                extra,
                Some(
                    "the server is at its limit of tunnels: an agent's extra link gives way to an agent without one (raise max_tunnels)",
                ),
            );
        }
        opened.result?;
        Ok((id, cancel))
    }
}

impl Handler<ReportAlive> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ReportAlive, _: &mut Self::Context) {
        self.tunnels.alive(msg.tunnel_id, Instant::now());
    }
}

impl Handler<TunnelClosed> for Registry {
    type Result = ();

    fn handle(&mut self, msg: TunnelClosed, _: &mut Self::Context) {
        if let Some(closed) = self.tunnels.close(msg.tunnel_id) {
            ended(closed, None);
        }
    }
}

impl Handler<ListTunnels> for Registry {
    type Result = Vec<TunnelInfo>;

    fn handle(&mut self, _: ListTunnels, _: &mut Self::Context) -> Self::Result {
        (self.tunnels.iter())
            .map(|(_, io, ports, services)| io.status(ports, services))
            .collect()
    }
}

/// Closes the tunnels of revoked tokens (by hash), telling their agents why.
#[derive(Message)]
#[rtype(result = "usize")]
pub(crate) struct CloseTokens {
    pub(crate) hashes: Vec<String>,
    pub(crate) reason: String,
}

impl Handler<CloseTokens> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: CloseTokens, _: &mut Self::Context) -> usize {
        let closed = self.tunnels.close_of_tokens(&msg.hashes);
        let count = closed.len();
        closed.into_iter().for_each(|c| ended(c, Some(&msg.reason)));
        count
    }
}

impl Handler<CloseAll> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: CloseAll, _: &mut Self::Context) -> usize {
        let closed = self.tunnels.close_all();
        let count = closed.len();
        closed.into_iter().for_each(|c| ended(c, Some(&msg.reason)));
        count
    }
}

impl Registry {
    /// A registry of the ports in `range`; [`TunnelRegistry::new`] starts it.
    pub(crate) fn new(range: (u16, u16)) -> Self {
        Self {
            tunnels: TunnelTable::new(range),
        }
    }

    /// Drops tunnels whose channel stopped reporting (a frozen WebSocket actor).
    fn drop_silent(&mut self, now: Instant) {
        for closed in self.tunnels.close_silent(now) {
            tracing::warn!(tunnel_id = %closed.id, "tunnel stopped reporting; dropped by the registry");
            ended(closed, Some("heartbeat timeout"));
        }
    }
}

/// A tunnel the table closed: everything it owns stops, and its channel, if
/// it did not end the tunnel itself, is told why.
fn ended(closed: ClosedTunnel<TunnelIo>, reason: Option<&str>) {
    closed.io.cancel.cancel();
    tracing::info!(tunnel_id = %closed.id, ports = ?closed.ports, "tunnel closed, ports released");
    if let Some(reason) = reason {
        closed.io.channel.do_send(CloseTunnel {
            reason: reason.into(),
        });
    }
}
