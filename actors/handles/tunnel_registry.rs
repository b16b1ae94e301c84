//! `TunnelRegistry` (the seed's type): the public handle to the server's
//! [`Registry`] actor, which it starts on the library's runtime thread. Not an
//! actor: its methods send the registry a query and await the answer.

use std::sync::Arc;

use actix::prelude::*;

use crate::accounting::{GuardCounters, GuardSnapshot};
use crate::actors::io::runtime;
use crate::actors::registry::{CloseAll, CountFreePorts, ListTunnels, Registry};
use crate::status::{ClusterStatus, TunnelInfo};

/// The server's registry of tunnels and public ports (the seed's type): a
/// handle to the registry actor, which runs on the library's runtime thread.
#[derive(Debug, Clone)]
pub struct TunnelRegistry {
    addr: Addr<Registry>,
    range: (u16, u16),
    guards: Arc<GuardCounters>,
    /// The cluster as its followers last saw it (a server of one).
    cluster: Arc<std::sync::Mutex<Option<ClusterStatus>>>,
}

impl TunnelRegistry {
    /// A registry handing out public ports from `range` (inclusive). An
    /// invalid range refuses every registration with a clear error.
    pub fn new(range: (u16, u16)) -> Self {
        let addr = Registry::start_in_arbiter(runtime::arbiter(), move |_| Registry::new(range));
        Self {
            addr,
            range,
            guards: Arc::default(),
            cluster: Arc::default(),
        }
    }

    /// Connections awaiting authentication, and what the admission limits
    /// turned away (connections refused, public ports that paused accepting).
    pub fn guards(&self) -> GuardSnapshot {
        self.guards.snapshot()
    }

    /// The admission counters, for the handler and listeners to count into.
    pub(crate) fn guard_counters(&self) -> &Arc<GuardCounters> {
        &self.guards
    }

    /// The port range.
    pub fn port_range(&self) -> (u16, u16) {
        self.range
    }

    /// The connected tunnels.
    pub async fn list_tunnels(&self) -> Vec<TunnelInfo> {
        self.addr.send(ListTunnels).await.unwrap_or_default()
    }

    /// Number of connected tunnels.
    pub async fn tunnel_count(&self) -> usize {
        self.list_tunnels().await.len()
    }

    /// Tells every agent the server is going away (`Disconnect { reason }`),
    /// closes their sessions and frees their ports; answers how many there were.
    pub async fn close_all(&self, reason: &str) -> usize {
        let reason = reason.to_owned();
        self.addr.send(CloseAll { reason }).await.unwrap_or(0)
    }

    /// Number of free public ports.
    pub async fn available_ports(&self) -> usize {
        self.addr.send(CountFreePorts).await.unwrap_or(0)
    }

    /// The cluster as this server sees it; none: not a server of one.
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.cluster
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Updates what `/status` and `/metrics` say of the cluster.
    pub(crate) fn update_cluster(&self, update: impl FnOnce(&mut ClusterStatus)) {
        let mut cluster = self
            .cluster
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        update(cluster.get_or_insert_with(ClusterStatus::default));
    }

    pub(crate) fn addr(&self) -> &Addr<Registry> {
        &self.addr
    }
}

impl Default for TunnelRegistry {
    fn default() -> Self {
        Self::new((30000, 31000))
    }
}
