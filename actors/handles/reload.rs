//! `Reloader`: a server's configuration re-read while it runs (`SIGHUP`, or
//! `POST /reload` on the admin listener). New tokens are accepted at once,
//! changed scopes apply to the next authentications, the tunnels of a
//! removed token are closed with a `Disconnect` that says so, and changed
//! `[tunnel]` limits apply to the tunnels that connect after it. What
//! cannot be read changes nothing. Not an actor.

use std::sync::{Arc, Mutex, PoisonError};

use crate::actors::TunnelRegistry;
use crate::actors::registry::CloseTokens;
use crate::auth::{LiveTokens, TokenStore};
use crate::config::{LiveServerConfig, TunnelServerConfig};

/// A server's configuration read again.
#[derive(Debug, Clone)]
pub struct ReloadedConfig {
    /// The tunnel settings (`[tunnel]` under the flags).
    pub settings: TunnelServerConfig,
    /// The accepted tokens; none where they do not come from files (a
    /// cluster's live in its store).
    pub tokens: Option<TokenStore>,
}

/// Reads the server's configuration again (its flags, config file and
/// token files); an error names what is wrong, by key.
pub type ConfigReload = Arc<dyn Fn() -> Result<ReloadedConfig, String> + Send + Sync>;

/// What the agents of a removed token are told.
const REMOVED: &str = "the token was removed from the server's configuration";

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Tokens accepted now (none when tokens are not reloaded).
    pub tokens: Option<usize>,
    /// Tokens no longer accepted.
    pub removed: usize,
    /// Tunnels closed for them.
    pub tunnels_closed: usize,
    /// Changed keys that keep their running value until a restart
    /// (see [`crate::config::RESTART_ONLY`]).
    pub restart_needed: Vec<&'static str>,
}

/// The tokens a reload replaces.
#[derive(Clone)]
pub(crate) struct ReloadedTokens {
    /// What sessions check.
    pub(crate) live: LiveTokens,
    /// What was read last.
    pub(crate) current: Arc<Mutex<TokenStore>>,
}

impl ReloadedTokens {
    /// `live`, which holds `current` now.
    pub(crate) fn new(live: LiveTokens, current: TokenStore) -> Self {
        Self {
            live,
            current: Arc::new(Mutex::new(current)),
        }
    }

    /// Takes `newer`; the hashes of the tokens it no longer has.
    fn replace(&self, newer: TokenStore) -> Vec<String> {
        let removed = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            let removed = current.removed_in(&newer);
            *current = newer.clone();
            removed
        };
        self.live.replace(newer);
        removed
    }
}

/// Re-reads and applies a server's configuration.
#[derive(Clone)]
pub(crate) struct Reloader {
    pub(crate) read: ConfigReload,
    pub(crate) settings: LiveServerConfig,
    /// None: tokens are not reloaded (any is accepted, or the cluster's).
    pub(crate) tokens: Option<ReloadedTokens>,
    pub(crate) registry: TunnelRegistry,
}

impl Reloader {
    /// Reads the configuration again and applies it; why not, if it cannot
    /// be read.
    pub(crate) async fn reload(&self) -> Result<ReloadReport, String> {
        let newer = (self.read)()?;
        let restart_needed = self.settings.replace(newer.settings);
        let (tokens, removed) = match (&self.tokens, newer.tokens) {
            (Some(tokens), Some(store)) => (Some(store.len()), tokens.replace(store)),
            _ => (None, Vec::new()),
        };
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
        if !restart_needed.is_empty() {
            tracing::warn!(
                keys = restart_needed.join(", "),
                "these changed keys keep their running values until a restart"
            );
        }
        match tokens {
            Some(tokens) => tracing::info!(
                tokens,
                removed = count,
                tunnels_closed,
                "configuration reloaded"
            ),
            None => tracing::info!("configuration reloaded (its tokens are not read from files)"),
        }
        Ok(ReloadReport {
            tokens,
            removed: count,
            tunnels_closed,
            restart_needed,
        })
    }
}
