//! `Reloader`: a server's tokens re-read while it runs (`SIGHUP`, or
//! `POST /reload` on the admin listener). New tokens are accepted at once,
//! changed scopes apply to the next authentications, and the tunnels of a
//! removed token are closed with a `Disconnect` that says so. What cannot
//! be read changes nothing. Not an actor.

use std::sync::{Arc, Mutex, PoisonError};

use crate::actors::TunnelRegistry;
use crate::actors::registry::CloseTokens;
use crate::auth::{LiveTokens, TokenStore};

/// Reads the server's tokens again (its flags, config file and token
/// files); an error names what is wrong, by key.
pub type TokenReload = Arc<dyn Fn() -> Result<TokenStore, String> + Send + Sync>;

/// What the agents of a removed token are told.
const REMOVED: &str = "the token was removed from the server's configuration";

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Tokens accepted now.
    pub tokens: usize,
    /// Tokens no longer accepted.
    pub removed: usize,
    /// Tunnels closed for them.
    pub tunnels_closed: usize,
}

/// Re-reads and applies a server's tokens.
#[derive(Clone)]
pub(crate) struct Reloader {
    read: TokenReload,
    live: LiveTokens,
    current: Arc<Mutex<TokenStore>>,
    registry: TunnelRegistry,
}

impl Reloader {
    /// Applies what `read` gives to `live`, which holds `current` now.
    pub(crate) fn new(
        read: TokenReload,
        live: LiveTokens,
        current: TokenStore,
        registry: TunnelRegistry,
    ) -> Self {
        Self {
            read,
            live,
            current: Arc::new(Mutex::new(current)),
            registry,
        }
    }

    /// Reads the tokens again and applies them; why not, if they cannot be read.
    pub(crate) async fn reload(&self) -> Result<ReloadReport, String> {
        let newer = (self.read)()?;
        let removed = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            let removed = current.removed_in(&newer);
            *current = newer.clone();
            removed
        };
        let tokens = newer.len();
        self.live.replace(newer);
        let count = removed.len();
        let tunnels_closed = if removed.is_empty() {
            0
        } else {
            let close = CloseTokens {
                hashes: removed,
                reason: REMOVED.into(),
            };
            self.registry.addr().send(close).await.unwrap_or(0)
        };
        let report = ReloadReport {
            tokens,
            removed: count,
            tunnels_closed,
        };
        tracing::info!(
            tokens,
            removed = count,
            tunnels_closed,
            "configuration reloaded"
        );
        Ok(report)
    }
}
