//! `EtcdStore`: the cluster store on etcd (feature `etcd`), through the
//! `etcd-client` crate (gRPC). Not an actor: a cloneable client handle; every
//! call is bounded by a request timeout, so an unreachable etcd is an error
//! within seconds, never a hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};

use crate::auth::Secret;
use crate::cluster::{
    ClusterKeys, ClusterStore, LeaseError, PortClaim, PortLease, Route, StoreError, StoredToken,
    choose_port,
};
use crate::protocol::ServiceProtocol;

mod ports;

/// Tries at leasing a port when other servers lease at the same instant.
const LEASE_TRIES: usize = 8;

/// How long one request to etcd may take before the store counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How etcd is reached: its endpoints and, if it asks for them, credentials.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Client URLs of etcd's members, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The cluster's key prefix (see [`ClusterKeys`]).
    pub keys: ClusterKeys,
    /// User name and password, for an etcd with authentication on.
    pub user: Option<(String, Secret)>,
    /// PEM of the CA that signed etcd's certificate (`https://` endpoints).
    pub ca_pem: Option<Vec<u8>>,
}

/// A handle to the cluster's etcd: a client per member, the one in use
/// replaced by the next whenever etcd cannot be asked through it (the
/// `etcd-client` crate's own balancer keeps sending requests to a member
/// that is gone: etcd-client#39).
#[derive(Clone)]
pub struct EtcdStore {
    clients: Arc<[Client]>,
    current: Arc<AtomicUsize>,
    keys: ClusterKeys,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd (which need not be up yet: requests fail until it is,
    /// unless credentials are given, which are checked at once).
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Invalid("--etcd needs at least one URL".into()));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), REQUEST_TIMEOUT);
        if let Some((name, password)) = &options.user {
            connect = connect.with_user(name.clone(), password.expose());
        }
        if let Some(pem) = &options.ca_pem {
            let ca = etcd_client::Certificate::from_pem(pem);
            connect = connect.with_tls(etcd_client::TlsOptions::new().ca_certificate(ca));
        }
        let mut clients = Vec::with_capacity(options.endpoints.len());
        for endpoint in &options.endpoints {
            // one endpoint: connected lazily, so a member down now is no error
            let client = Client::connect([endpoint], Some(connect.clone()))
                .await
                .map_err(unreachable)?;
            clients.push(client);
        }
        Ok(Self {
            clients: clients.into(),
            current: Arc::default(),
            keys: options.keys,
        })
    }

    /// The client of the member in use.
    fn client(&self) -> Client {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len().max(1);
        self.clients[i].clone()
    }

    /// etcd could not be asked through the member in use: the next one is
    /// used from now on; the error as the store's.
    fn lost(&self, e: etcd_client::Error) -> StoreError {
        if self.clients.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
        unreachable(e)
    }

    /// Every key under `prefix`, with its value.
    async fn under(
        &self,
        client: &mut Client,
        prefix: String,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        let options = GetOptions::new().with_prefix();
        client
            .get(prefix, Some(options))
            .await
            .map_err(|e| self.lost(e))
    }

    /// How many members there are to try.
    fn members(&self) -> usize {
        self.clients.len()
    }

    /// The cluster's keys.
    pub fn keys(&self) -> &ClusterKeys {
        &self.keys
    }
}

/// An etcd error as the store's: etcd could not be asked.
fn unreachable(e: etcd_client::Error) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

impl ClusterStore for EtcdStore {
    fn lease_port(&self, claim: PortClaim) -> BoxFuture<'_, Result<PortLease, LeaseError>> {
        let mut client = self.client();
        Box::pin(async move {
            let mut retried = 0;
            for _ in 0..LEASE_TRIES {
                match self.try_lease(&mut client, &claim).await {
                    Ok(Some(lease)) => return Ok(lease),
                    Ok(None) => {}
                    // through the next member, each once
                    Err(LeaseError::Store(StoreError::Unreachable(_)))
                        if retried + 1 < self.members() =>
                    {
                        retried += 1;
                        client = self.client();
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(LeaseError::Store(StoreError::Unreachable(format!(
                "{LEASE_TRIES} servers leased a port at the same instant as this one; try again"
            ))))
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, StoreError>> {
        let mut client = self.client();
        Box::pin(async move {
            let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
            let granted = client
                .lease_grant(ttl, None)
                .await
                .map_err(|e| self.lost(e))?;
            Ok(granted.id())
        })
    }

    fn publish_route(&self, lease: i64, route: Route) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut client = self.client();
        let key = self
            .keys
            .route(&route.server, &route.service, route.protocol);
        Box::pin(async move {
            let value = serde_json::to_vec(&route).unwrap_or_default();
            let options = PutOptions::new().with_lease(lease);
            client
                .put(key, value, Some(options))
                .await
                .map_err(|e| self.lost(e))?;
            Ok(())
        })
    }

    fn withdraw_route(
        &self,
        server: &str,
        service: &str,
        protocol: ServiceProtocol,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut client = self.client();
        let key = self.keys.route(server, service, protocol);
        Box::pin(async move {
            client.delete(key, None).await.map_err(|e| self.lost(e))?;
            Ok(())
        })
    }

    fn routes(&self) -> BoxFuture<'_, Result<Vec<Route>, StoreError>> {
        let mut client = self.client();
        let prefix = self.keys.routes();
        Box::pin(async move {
            let found = self.under(&mut client, prefix).await?;
            let routes = found
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice(kv.value()).ok());
            Ok(routes.collect())
        })
    }

    fn keep_lease(&self, lease: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        let mut client = self.client();
        Box::pin(async move {
            let (mut keeper, mut answers) = client
                .lease_keep_alive(lease)
                .await
                .map_err(|e| self.lost(e))?;
            keeper.keep_alive().await.map_err(|e| self.lost(e))?;
            let answer = answers.message().await.map_err(|e| self.lost(e))?;
            Ok(answer.is_some_and(|a| a.ttl() > 0))
        })
    }

    fn tokens(&self) -> BoxFuture<'_, Result<Vec<StoredToken>, StoreError>> {
        let mut client = self.client();
        let prefix = self.keys.tokens();
        Box::pin(async move {
            let found = self.under(&mut client, prefix).await?;
            let mut tokens = Vec::with_capacity(found.kvs().len());
            for kv in found.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                match StoredToken::from_value(&key, kv.value()) {
                    Ok(token) => tokens.push(token),
                    Err(error) => tracing::warn!(%error, "token entry skipped"),
                }
            }
            Ok(tokens)
        })
    }

    fn put_token(&self, token: StoredToken) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut client = self.client();
        let key = self.keys.token(&token.hash);
        Box::pin(async move {
            client
                .put(key, token.to_value(), None)
                .await
                .map_err(|e| self.lost(e))?;
            Ok(())
        })
    }

    fn revoke_token(&self, hash: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let mut client = self.client();
        let key = self.keys.token(&hash.to_ascii_lowercase());
        Box::pin(async move {
            let deleted = client.delete(key, None).await.map_err(|e| self.lost(e))?;
            Ok(deleted.deleted() > 0)
        })
    }

    fn watch_tokens(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<(), StoreError>>, StoreError>> {
        let mut client = self.client();
        let prefix = self.keys.tokens();
        Box::pin(async move {
            let options = WatchOptions::new().with_prefix();
            let stream = client
                .watch(prefix, Some(options))
                .await
                .map_err(|e| self.lost(e))?;
            let changes = stream.filter_map(|response| async move {
                match response {
                    // the first answer (created) changes nothing; a change has events
                    Ok(r) if r.events().is_empty() && !r.canceled() => None,
                    Ok(r) if r.canceled() => Some(Err(StoreError::Unreachable(format!(
                        "the watch was cancelled: {}",
                        r.cancel_reason()
                    )))),
                    Ok(_) => Some(Ok(())),
                    Err(e) => Some(Err(unreachable(e))),
                }
            });
            Ok(changes.boxed())
        })
    }
}
