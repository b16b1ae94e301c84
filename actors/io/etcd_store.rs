//! `EtcdStore`: the cluster store on etcd (feature `etcd`), through the
//! `etcd-client` crate (gRPC). Not an actor: a cloneable client handle; every
//! call is bounded by a request timeout, so an unreachable etcd is an error
//! within seconds, never a hang.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};

use crate::auth::Secret;
use crate::cluster::{ClusterKeys, ClusterStore, StoreError, StoredToken};

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

/// A handle to the cluster's etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
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
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(unreachable)?;
        Ok(Self {
            client,
            keys: options.keys,
        })
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
    fn tokens(&self) -> BoxFuture<'_, Result<Vec<StoredToken>, StoreError>> {
        let mut client = self.client.clone();
        let prefix = self.keys.tokens();
        Box::pin(async move {
            let options = GetOptions::new().with_prefix();
            let found = client
                .get(prefix, Some(options))
                .await
                .map_err(unreachable)?;
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
        let mut client = self.client.clone();
        let key = self.keys.token(&token.hash);
        Box::pin(async move {
            client
                .put(key, token.to_value(), None)
                .await
                .map_err(unreachable)?;
            Ok(())
        })
    }

    fn revoke_token(&self, hash: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let mut client = self.client.clone();
        let key = self.keys.token(&hash.to_ascii_lowercase());
        Box::pin(async move {
            let deleted = client.delete(key, None).await.map_err(unreachable)?;
            Ok(deleted.deleted() > 0)
        })
    }

    fn watch_tokens(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<(), StoreError>>, StoreError>> {
        let mut client = self.client.clone();
        let prefix = self.keys.tokens();
        Box::pin(async move {
            let options = WatchOptions::new().with_prefix();
            let stream = client
                .watch(prefix, Some(options))
                .await
                .map_err(unreachable)?;
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
