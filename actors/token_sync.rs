//! `TokenSync`: one per server of a cluster. Keeps the server's accepted
//! tokens equal to those of its flags and files plus the cluster store's:
//! reads them all, watches the store's token keys, and reads them all again
//! on every change (a new token is accepted as soon as the watch reports it).
//! A token that leaves the store is revoked: the registry closes its tunnels
//! (`CloseTokens`, the agents told why in `Disconnect`). While the store is
//! unreachable, the tokens last read stay accepted, and the actor tries
//! again on a backoff of up to five seconds.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;

use super::TunnelRegistry;
use super::registry::CloseTokens;
use crate::auth::{LiveTokens, TokenStore};
use crate::backoff::Backoff;
use crate::cluster::{ClusterStore, StoreError, StoredToken, merged_tokens, revoked};

/// What an agent whose token left the store is told.
pub(crate) const REVOKED: &str = "the tunnel's token was revoked";

/// The actor; its work is one future, [`follow`].
pub(crate) struct TokenSync {
    follower: Option<Follower>,
}

/// What the follower keeps between reads of the store.
struct Follower {
    store: Arc<dyn ClusterStore>,
    live: LiveTokens,
    /// The tokens of the flags and files, always accepted.
    fixed: TokenStore,
    registry: TunnelRegistry,
    /// The store's tokens as last read (`None`: not yet).
    last: Option<Vec<StoredToken>>,
    /// The last read succeeded and no error came since.
    reachable: bool,
}

impl Actor for TokenSync {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(follower) = self.follower.take() {
            ctx.spawn(fut::wrap_future(follow(follower)));
        }
    }
}

impl TokenSync {
    /// Starts following `store`: `live` gets `fixed` plus the store's tokens.
    pub(crate) fn start(
        store: Arc<dyn ClusterStore>,
        live: LiveTokens,
        fixed: TokenStore,
        registry: TunnelRegistry,
    ) -> Addr<Self> {
        let follower = Follower {
            store,
            live,
            fixed,
            registry,
            last: None,
            reachable: false,
        };
        Self {
            follower: Some(follower),
        }
        .start()
    }
}

/// Watches, reads, and applies, for as long as the server runs.
async fn follow(mut follower: Follower) {
    let second = Duration::from_secs(1);
    let mut backoff = Backoff::new(Duration::from_millis(200), 5 * second, 30 * second);
    let mut warned = false;
    loop {
        let error = follower.watch().await;
        if follower.reachable || !warned {
            let kept = follower.last.as_ref().map_or(0, Vec::len);
            tracing::warn!(%error, kept, "cluster store: tokens not followed; the tokens last read stay accepted");
            warned = true;
        }
        if follower.reachable {
            backoff.reset();
        }
        follower.reachable = false;
        follower
            .registry
            .update_cluster(|c| c.store_reachable = false);
        let jitter = u64::from(uuid::Uuid::new_v4().as_fields().0);
        tokio::time::sleep(backoff.next_delay(jitter)).await;
    }
}

impl Follower {
    /// Opens a watch, reads every token, then reads again on each change;
    /// returns when the watch or a read fails.
    async fn watch(&mut self) -> StoreError {
        let mut changes = match self.store.watch_tokens().await {
            Ok(changes) => changes,
            Err(e) => return e,
        };
        if let Err(e) = self.read().await {
            return e;
        }
        while let Some(change) = changes.next().await {
            if let Err(e) = change {
                return e;
            }
            if let Err(e) = self.read().await {
                return e;
            }
        }
        StoreError::Unreachable("the watch ended".into())
    }

    /// Reads every token from the store and applies them.
    async fn read(&mut self) -> Result<(), StoreError> {
        let stored = self.store.tokens().await?;
        if !self.reachable && self.last.is_some() {
            tracing::info!("cluster store reachable again; tokens followed");
        }
        self.reachable = true;
        let count = stored.len();
        self.registry.update_cluster(|c| {
            c.store_reachable = true;
            c.stored_tokens = count;
        });
        self.apply(stored);
        Ok(())
    }

    /// Accepts `stored` (with the fixed tokens) from now on; the tunnels of
    /// tokens gone from the store since the last read are closed.
    fn apply(&mut self, stored: Vec<StoredToken>) {
        if self.last.as_ref() == Some(&stored) {
            return;
        }
        let merged = match merged_tokens(&self.fixed, &stored) {
            Ok(merged) => merged,
            // every stored hash was checked when it was read
            Err(error) => return tracing::error!(%error, "cluster store: tokens not applied"),
        };
        self.live.replace(merged);
        let gone = self.last.as_deref().map(|last| revoked(last, &stored));
        match gone {
            Some(hashes) if !hashes.is_empty() => {
                tracing::info!(
                    revoked = hashes.len(),
                    tokens = stored.len(),
                    "cluster store: tokens revoked; their tunnels close"
                );
                self.registry.addr().do_send(CloseTokens {
                    hashes,
                    reason: REVOKED.into(),
                });
            }
            _ => tracing::info!(tokens = stored.len(), "cluster store: tokens read"),
        }
        self.last = Some(stored);
    }
}
