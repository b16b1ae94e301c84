//! The etcd store's port leases: a service's entry and its port's, created
//! together only if neither exists (docs/CLUSTER.md, "Ports").

use super::*;

/// A service's entry: its port and the lease that keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ServicePort {
    port: u16,
    lease: i64,
}

impl EtcdStore {
    /// The service's port lease, if it has one.
    async fn service_port(
        &self,
        client: &mut Client,
        name: &str,
    ) -> Result<Option<PortLease>, StoreError> {
        let key = self.keys.service(name);
        let found = client
            .get(key.clone(), None)
            .await
            .map_err(|e| self.lost(e))?;
        let Some(kv) = found.kvs().first() else {
            return Ok(None);
        };
        let entry: ServicePort =
            serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                key,
                reason: e.to_string(),
            })?;
        Ok(Some(PortLease {
            port: entry.port,
            lease: entry.lease,
        }))
    }

    /// Every leased port, with its service's name.
    async fn leased_ports(&self, client: &mut Client) -> Result<Vec<(u16, String)>, StoreError> {
        let prefix = self.keys.ports();
        let found = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.lost(e))?;
        let ports = found.kvs().iter().filter_map(|kv| {
            let port = kv.key().get(prefix.len()..)?;
            let port = std::str::from_utf8(port).ok()?.parse().ok()?;
            Some((port, String::from_utf8_lossy(kv.value()).into_owned()))
        });
        Ok(ports.collect())
    }

    /// One try: the service's port if it has one, else a new lease created
    /// only if neither its name nor the port is taken meanwhile (`None`:
    /// another server won the race; try again).
    pub(super) async fn try_lease(
        &self,
        client: &mut Client,
        claim: &PortClaim,
    ) -> Result<Option<PortLease>, LeaseError> {
        if let Some(held) = self.service_port(client, &claim.name).await? {
            if claim.requested != 0 && claim.requested != held.port {
                return Err(LeaseError::ServiceHasPort {
                    name: claim.name.clone(),
                    port: held.port,
                });
            }
            return Ok(Some(held));
        }
        let leased = self.leased_ports(client).await?;
        if let Some((_, owner)) = leased.iter().find(|(p, _)| *p == claim.requested) {
            return Err(LeaseError::PortTaken {
                port: claim.requested,
                owner: owner.clone(),
            });
        }
        let taken: Vec<u16> = leased.iter().map(|(p, _)| *p).collect();
        let port = choose_port(claim, &taken).ok_or_else(|| LeaseError::Exhausted {
            ranges: crate::ports::format_ranges(&claim.ranges),
        })?;
        let ttl = i64::try_from(claim.hold.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.lost(e))?
            .id();
        let (service_key, port_key) = (self.keys.service(&claim.name), self.keys.port(port));
        let entry = serde_json::to_vec(&ServicePort { port, lease }).unwrap_or_default();
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([
                Compare::create_revision(service_key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(port_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(service_key, entry, with_lease()),
                TxnOp::put(port_key, claim.name.clone(), with_lease()),
            ]);
        if client.txn(txn).await.map_err(|e| self.lost(e))?.succeeded() {
            return Ok(Some(PortLease { port, lease }));
        }
        // lost the race: the lease holds nothing; give it back
        let _ = client.lease_revoke(lease).await;
        Ok(None)
    }
}
