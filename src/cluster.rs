//! A cluster of tunnel servers sharing state in a store (docs/CLUSTER.md):
//! the store's trait, what is kept in it, and where. No IO here: the etcd
//! implementation is `actors/io/etcd_store.rs` (feature `etcd`); a host with
//! a store of its own (ZLayer's Raft) implements [`ClusterStore`].
//!
//! Kept so far: **tokens**, as SHA-256 hashes with their scopes, one key
//! each (`<prefix>tokens/<hash>`, a JSON [`StoredToken`]). Every server
//! reads them all at start and watches the prefix; a token whose key goes is
//! revoked on every server. **Port leases**: a service's public port, one
//! for the whole cluster (`<prefix>services/<name>` holds its port,
//! `<prefix>ports/<port>` its name), both created at once only if neither
//! exists (compare-and-swap), under a store lease that every server with a
//! registration of the service keeps alive; `port_hold` after the last one
//! stops, the store frees them.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, TokenScope, TokenStore};
use crate::protocol::ServiceProtocol;

/// The default prefix of a cluster's keys.
pub const DEFAULT_PREFIX: &str = "/zlayer-tunnel/";

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer (down, unreachable, or refused us).
    #[error("the cluster store is unreachable: {0}")]
    Unreachable(String),
    /// A key holds something that is not what we keep there.
    #[error("the cluster store's key {key} holds no valid entry: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// What was asked is not valid (a malformed hash, an empty prefix).
    #[error("{0}")]
    Invalid(String),
}

/// A token as the store keeps it: its hash, never the token, and its scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    /// Lowercase hex SHA-256 of the token.
    pub hash: String,
    /// What it may do.
    #[serde(default)]
    pub scope: TokenScope,
}

impl StoredToken {
    /// Checks the hash (64 hex digits) and lowercases it.
    pub fn new(hash: &str, scope: TokenScope) -> Result<Self, StoreError> {
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Invalid(format!(
                "a token hash is 64 hex digits (zlayer-tunnel token hash TOKEN); got {:?}",
                hash
            )));
        }
        Ok(Self { hash, scope })
    }

    /// The entry's value in the store.
    pub fn to_value(&self) -> Vec<u8> {
        // a struct of strings and numbers always serializes
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses the value at `key`.
    pub fn from_value(key: &str, value: &[u8]) -> Result<Self, StoreError> {
        let token: Self = serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        Self::new(&token.hash, token.scope)
    }
}

/// A service's claim of a public port across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortClaim {
    /// The service's name.
    pub name: String,
    /// The port asked for; 0: the service's port if it has one, else the
    /// lowest free one of `ranges`.
    pub requested: u16,
    /// Where a new port may come from (the server's range, within the
    /// token's scope).
    pub ranges: Vec<(u16, u16)>,
    /// How long the reservation outlives its last keep-alive.
    pub hold: std::time::Duration,
}

/// A service's public port in the cluster, and the store lease that keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortLease {
    /// The port.
    pub port: u16,
    /// The store's lease id (keep it alive with [`ClusterStore::keep_lease`]).
    pub lease: i64,
}

/// Why a port could not be leased.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The store could not be asked.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The service already has another port in the cluster.
    #[error("service {name:?} has public port {port} in this cluster; ask for {port} or 0")]
    ServiceHasPort {
        /// The service.
        name: String,
        /// Its port.
        port: u16,
    },
    /// The port asked for is another service's in the cluster.
    #[error("public port {port} belongs to service {owner:?} in this cluster")]
    PortTaken {
        /// The port.
        port: u16,
        /// Its service.
        owner: String,
    },
    /// Every port of the ranges is leased.
    #[error("no free public port left in {ranges} across the cluster")]
    Exhausted {
        /// The ranges, as `LOW-HIGH,...`.
        ranges: String,
    },
}

/// The ports this server leased, by port (so at most one entry a port, the
/// latest): while the store is unreachable, a service registering again here
/// (a reconnecting agent) gets the port it had, as the store would give it.
#[derive(Debug, Clone, Default)]
pub struct KnownPorts {
    by_port: std::collections::HashMap<u16, (String, PortLease)>,
}

impl KnownPorts {
    /// Service `name` was given `lease`.
    pub fn remember(&mut self, name: &str, lease: PortLease) {
        self.by_port.insert(lease.port, (name.to_owned(), lease));
    }

    /// The port lease service `name` was last given here, if any.
    pub fn of(&self, name: &str) -> Option<PortLease> {
        (self.by_port.values())
            .find(|(service, _)| service == name)
            .map(|(_, lease)| *lease)
    }
}

/// The port a claim gets, given the ports already leased in the cluster
/// (`taken`, ascending or not): the one asked for if free, else the lowest
/// free one of its ranges.
pub fn choose_port(claim: &PortClaim, taken: &[u16]) -> Option<u16> {
    if claim.requested != 0 {
        return (!taken.contains(&claim.requested)).then_some(claim.requested);
    }
    (claim.ranges.iter())
        .flat_map(|&(low, high)| low..=high)
        .find(|port| !taken.contains(port))
}

/// A server's route: it has a link for `service` (a registration of it),
/// and its peers reach it at `advertise`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    /// The server's id (`--server-id`).
    pub server: String,
    /// The server's control URL for its peers (`--advertise`).
    pub advertise: String,
    /// The service's name.
    pub service: String,
    /// The service's public port.
    pub port: u16,
    /// TCP or UDP (absent in a route stored before UDP was routed: TCP).
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// The address lists a visitor must pass (the registration's and its
    /// token's): a server that forwards the service checks them before
    /// passing a visitor on.
    #[serde(
        default,
        skip_serializing_if = "crate::visitor_rules::ServiceRules::is_empty"
    )]
    pub visitors: crate::visitor_rules::ServiceRules,
    /// New connections (or UDP flows) a second per visitor address: a
    /// server that forwards the service limits its visitors to it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_rate: Option<u32>,
    /// The service's bandwidth limit, bytes a second each way: a server
    /// that forwards the service reads its visitors no faster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

/// Where a cluster's entries live in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    prefix: String,
}

impl ClusterKeys {
    /// The keys under `prefix` (a trailing `/` is added if missing).
    pub fn new(prefix: &str) -> Result<Self, StoreError> {
        if prefix.is_empty() {
            return Err(StoreError::Invalid(
                "--cluster-prefix must not be empty".into(),
            ));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self { prefix })
    }

    /// The prefix of every token's key.
    pub fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }

    /// The key of the token whose hash is `hash`.
    pub fn token(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.prefix)
    }

    /// The key of service `name`'s port.
    pub fn service(&self, name: &str) -> String {
        format!("{}services/{name}", self.prefix)
    }

    /// The prefix of every route's key.
    pub fn routes(&self) -> String {
        format!("{}routes/", self.prefix)
    }

    /// The key of server `server`'s route to `service` over `protocol`.
    pub fn route(&self, server: &str, service: &str, protocol: ServiceProtocol) -> String {
        match protocol {
            ServiceProtocol::Tcp => format!("{}routes/{server}/{service}", self.prefix),
            ServiceProtocol::Udp => format!("{}routes/{server}/{service}/udp", self.prefix),
        }
    }

    /// The prefix of every leased port's key.
    pub fn ports(&self) -> String {
        format!("{}ports/", self.prefix)
    }

    /// The key of leased port `port` (its value: the service's name).
    pub fn port(&self, port: u16) -> String {
        format!("{}ports/{port}", self.prefix)
    }
}

impl Default for ClusterKeys {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// The store a cluster of servers shares. Implementations are cheap to
/// clone handles to one client; every call may fail with
/// [`StoreError::Unreachable`], and the caller keeps what it last saw.
pub trait ClusterStore: Send + Sync + 'static {
    /// Every stored token (an entry that does not parse is skipped and
    /// logged, not fatal: one bad key must not lock every agent out).
    fn tokens(&self) -> BoxFuture<'_, Result<Vec<StoredToken>, StoreError>>;

    /// Adds `token`, or replaces the scope of the same hash.
    fn put_token(&self, token: StoredToken) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Removes the token whose hash is `hash`; false if there was none.
    fn revoke_token(&self, hash: &str) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// A stream that yields once per change to the tokens (then read them
    /// all again with [`ClusterStore::tokens`]); it ends, or yields an
    /// error, when the store is lost.
    fn watch_tokens(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<(), StoreError>>, StoreError>>;

    /// The service's public port in the cluster: its own if it has one,
    /// else a new one leased (never one another service holds, even when
    /// two servers ask at the same instant).
    fn lease_port(&self, claim: PortClaim) -> BoxFuture<'_, Result<PortLease, LeaseError>>;

    /// Keeps a store lease (a port's, a server's) alive for another of its
    /// TTLs; false if it expired.
    fn keep_lease(&self, lease: i64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// A new store lease of `ttl` (a server's, for its routes).
    fn grant_lease(&self, ttl: std::time::Duration) -> BoxFuture<'_, Result<i64, StoreError>>;

    /// Publishes `route` under `lease` (it goes when the lease does).
    fn publish_route(&self, lease: i64, route: Route) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Withdraws server `server`'s route to `service` over `protocol`.
    fn withdraw_route(
        &self,
        server: &str,
        service: &str,
        protocol: ServiceProtocol,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Every server's routes.
    fn routes(&self) -> BoxFuture<'_, Result<Vec<Route>, StoreError>>;
}

/// The tokens a server accepts: those of its flags and files, and the
/// store's, as last read.
pub fn merged_tokens(fixed: &TokenStore, stored: &[StoredToken]) -> Result<TokenStore, AuthError> {
    stored.iter().try_fold(fixed.clone(), |store, t| {
        store.with_hash(&t.hash, t.scope.clone())
    })
}

/// The hashes in `before` that are not in `after`: revoked tokens.
pub fn revoked(before: &[StoredToken], after: &[StoredToken]) -> Vec<String> {
    before
        .iter()
        .filter(|b| !after.iter().any(|a| a.hash == b.hash))
        .map(|b| b.hash.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_token;

    #[test]
    fn a_stored_token_round_trips_and_keeps_only_its_hash() {
        let scope = TokenScope {
            register: Some(vec!["web".into()]),
            access: None,
            ports: Some(vec![(30000, 30010)]),
            visitors: crate::visitor_rules::VisitorRules::from_wire("10.0.0.0/8", "").unwrap(),
            peer: false,
        };
        let token = StoredToken::new(&hash_token("secret").to_uppercase(), scope).unwrap();
        let value = token.to_value();
        assert!(!String::from_utf8_lossy(&value).contains("secret"));
        let back = StoredToken::from_value("k", &value).unwrap();
        assert_eq!(back, token);
        assert_eq!(back.hash, hash_token("secret"));
    }

    #[test]
    fn malformed_entries_name_their_key() {
        let err = StoredToken::from_value("/p/tokens/x", b"{\"hash\":\"zz\"}").unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        let err = StoredToken::from_value("/p/tokens/x", b"not json").unwrap_err();
        assert!(err.to_string().contains("/p/tokens/x"), "{err}");
    }

    #[test]
    fn a_claim_gets_its_port_or_the_lowest_free_one() {
        let claim = |requested| PortClaim {
            name: "svc".into(),
            requested,
            ranges: vec![(100, 102), (200, 200)],
            hold: std::time::Duration::from_secs(1),
        };
        assert_eq!(choose_port(&claim(0), &[100, 101]), Some(102));
        assert_eq!(choose_port(&claim(0), &[100, 101, 102]), Some(200));
        assert_eq!(choose_port(&claim(0), &[100, 101, 102, 200]), None);
        assert_eq!(choose_port(&claim(150), &[100]), Some(150));
        assert_eq!(choose_port(&claim(100), &[100]), None);
    }

    #[test]
    fn known_ports_keep_the_latest_service_of_each_port() {
        let mut known = KnownPorts::default();
        known.remember("a", PortLease { port: 1, lease: 10 });
        known.remember("b", PortLease { port: 1, lease: 11 });
        assert_eq!(known.of("a"), None);
        assert_eq!(known.of("b"), Some(PortLease { port: 1, lease: 11 }));
    }

    #[test]
    fn keys_live_under_the_prefix() {
        let keys = ClusterKeys::new("/c").unwrap();
        assert_eq!(keys.tokens(), "/c/tokens/");
        assert_eq!(keys.token("ab"), "/c/tokens/ab");
        assert!(ClusterKeys::new("").is_err());
        assert_eq!(ClusterKeys::default().tokens(), "/zlayer-tunnel/tokens/");
    }

    #[test]
    fn merged_tokens_accept_both_and_revoked_names_the_gone() {
        let fixed = TokenStore::new().with_token("flag");
        let stored = vec![StoredToken::new(&hash_token("stored"), TokenScope::default()).unwrap()];
        let merged = merged_tokens(&fixed, &stored).unwrap();
        assert!(merged.verify("flag").is_ok());
        assert!(merged.verify("stored").is_ok());
        assert_eq!(revoked(&stored, &[]), vec![hash_token("stored")]);
        assert!(revoked(&stored, &stored).is_empty());
    }
}
