//! The control channel in a cluster: a service's public port leased in the
//! cluster's store (one per service across the cluster) and kept alive while
//! the service's tunnel lives.

use super::*;
use crate::cluster::{ClusterStore, LeaseError, PortClaim, PortLease, StoreError};

/// Service `claim.name`'s port: leased in the store, or, while the store is
/// unreachable, the one last leased for it here (a reconnecting agent keeps
/// its port through an outage); otherwise why not.
pub(super) async fn lease(
    store: &dyn ClusterStore,
    claim: PortClaim,
    shared: &ServerShared,
) -> Result<PortLease, String> {
    let (name, requested) = (claim.name.clone(), claim.requested);
    let known = || {
        shared
            .known_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    match store.lease_port(claim).await {
        Ok(lease) => {
            known().remember(&name, lease);
            Ok(lease)
        }
        Err(LeaseError::Store(error @ StoreError::Unreachable(_))) => {
            let last = known()
                .of(&name)
                .filter(|l| requested == 0 || requested == l.port);
            let Some(lease) = last else {
                return Err(error.to_string());
            };
            tracing::warn!(service = %name, port = lease.port, %error, "cluster store unreachable; the service gets the port it was last leased here");
            Ok(lease)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A port the cluster gave a service must be in this server's range.
pub(super) fn outside_range(port: u16, (low, high): (u16, u16)) -> Result<(), String> {
    if (low..=high).contains(&port) {
        return Ok(());
    }
    Err(format!(
        "the cluster gave this service public port {port}, outside this server's range {low}-{high}: the servers of a cluster need the same --port-range"
    ))
}

/// Keeps a service's port lease alive while its tunnel lives (every third
/// of the hold); once it ends, the store frees the port `hold` later unless
/// another server keeps it.
pub(super) async fn keep_port(
    store: Arc<dyn ClusterStore>,
    lease: PortLease,
    hold: Duration,
    tunnel: CancellationToken,
) {
    let every = (hold / 3).max(Duration::from_millis(200));
    let mut failing = false;
    loop {
        tokio::select! {
            () = tunnel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match store.keep_lease(lease.lease).await {
            Ok(true) => failing = false,
            Ok(false) => {
                return tracing::warn!(
                    port = lease.port,
                    "the port's lease expired in the cluster store (the store was away longer than port_hold); another service may be given it"
                );
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(port = lease.port, %error, "cannot renew the port's lease; retrying");
            }
            Err(_) => {}
        }
    }
}

impl ControlChannel {
    /// In a cluster, the store and the claim of service `name`'s port.
    pub(super) fn cluster_claim(
        &self,
        name: &str,
        requested: u16,
        allowed: Option<&[(u16, u16)]>,
    ) -> Option<(Arc<dyn ClusterStore>, PortClaim)> {
        let store = self.shared.cluster.clone()?;
        let config = &self.config;
        let claim = PortClaim {
            name: name.to_owned(),
            requested,
            ranges: allowed.map_or_else(|| vec![config.data_port_range], <[_]>::to_vec),
            hold: config.port_hold,
        };
        Some((store, claim))
    }
}
