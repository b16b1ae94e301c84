//! Token authentication: SHA-256 hashing, a masked `Secret`, validators, and a
//! store of hashes compared in constant time. The token travels raw inside
//! `Auth` (as in the original) and is hashed on arrival; only hashes are kept.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A seed-compatible token check: `Ok(())` admits the token.
pub type TokenValidator = Arc<dyn Fn(&str) -> crate::Result<()> + Send + Sync>;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is empty.
    #[error("token cannot be empty")]
    EmptyToken,
    /// No configured hash matches the token.
    #[error("invalid tunnel token")]
    InvalidToken,
    /// A configured hash is not 64 hex digits.
    #[error("token hash #{index} is not 64 hex digits")]
    BadHash {
        /// Position of the bad hash in the list given.
        index: usize,
    },
    /// The token may not register this service.
    #[error("token may not register service {0:?}")]
    RegisterDenied(String),
    /// The token may not open access streams to this service.
    #[error("token may not access service {0:?}")]
    AccessDenied(String),
    /// The token may not be given this public port.
    #[error("token may not use port {port} (its ports: {ranges})")]
    PortDenied {
        /// The port asked for.
        port: u16,
        /// The token's ports, as `low-high` ranges.
        ranges: String,
    },
}

/// Lowercase hex SHA-256 of the token's UTF-8 bytes: what servers store.
///
/// ```
/// assert_eq!(
///     zlayer_tunnel::hash_token("test"),
///     "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
/// );
/// ```
#[must_use]
pub fn hash_token(token: &str) -> String {
    to_hex(&digest(token))
}

/// Admits any non-empty token (the seed's validator, for development).
pub fn accept_all_tokens(token: &str) -> crate::Result<()> {
    if token.is_empty() {
        return Err(AuthError::EmptyToken.into());
    }
    Ok(())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
}

fn from_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// A token or key: `Debug` and `Display` print a mask, never the value.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the few places that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// What a token may do. `None` in a list means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenScope {
    /// Services the token may register; `None` allows any.
    pub register: Option<Vec<String>>,
    /// Services the token may open access streams to; `None` allows any.
    pub access: Option<Vec<String>>,
    /// Public ports its services may be given, as inclusive ranges; `None`
    /// allows any of the server's range. A registration asking for port 0
    /// gets the lowest free one of these.
    pub ports: Option<Vec<(u16, u16)>>,
    /// Who may visit its services (`visitors_allow`, `visitors_deny`),
    /// besides what each registration says.
    #[serde(
        default,
        skip_serializing_if = "crate::visitor_rules::VisitorRules::is_empty"
    )]
    pub visitors: crate::visitor_rules::VisitorRules,
    /// The cluster's peer token: its `Open`s may carry a forwarded
    /// visitor's address, which the agent trusts (its PROXY header). Never
    /// stored: only a server's own peer token has it.
    #[serde(skip)]
    pub peer: bool,
}

impl TokenScope {
    /// A scope that allows everything.
    pub fn unrestricted() -> Self {
        Self::default()
    }

    /// Checks that the token may register `service`.
    pub fn check_register(&self, service: &str) -> Result<(), AuthError> {
        allowed(self.register.as_deref(), service)
            .then_some(())
            .ok_or_else(|| AuthError::RegisterDenied(service.to_owned()))
    }

    /// True when the token's register scope names `service` explicitly (not
    /// merely allows any): it may add replicas to another token's service.
    pub fn names_service(&self, service: &str) -> bool {
        (self.register.as_deref()).is_some_and(|names| names.iter().any(|n| n == service))
    }

    /// Checks that the token may be given public port `port` (0: any of its ports).
    pub fn check_port(&self, port: u16) -> Result<(), AuthError> {
        match &self.ports {
            Some(ranges) if port != 0 && !crate::ports::in_ranges(ranges, port) => {
                Err(AuthError::PortDenied {
                    port,
                    ranges: crate::ports::format_ranges(ranges),
                })
            }
            _ => Ok(()),
        }
    }

    /// Checks that the token may open access streams to `service`.
    pub fn check_access(&self, service: &str) -> Result<(), AuthError> {
        allowed(self.access.as_deref(), service)
            .then_some(())
            .ok_or_else(|| AuthError::AccessDenied(service.to_owned()))
    }
}

fn allowed(list: Option<&[String]>, service: &str) -> bool {
    list.is_none_or(|names| names.iter().any(|n| n == service))
}

/// A known token, by hash, with its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenEntry {
    hash: [u8; 32],
    scope: TokenScope,
}

/// Accepted tokens, kept only as SHA-256 hashes and compared in constant time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenStore {
    entries: Vec<TokenEntry>,
}

impl TokenStore {
    /// An empty store (refuses every token).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a raw token with an unrestricted scope (it is hashed at once).
    #[must_use]
    pub fn with_token(self, token: &str) -> Self {
        self.with_hash_bytes(digest(token), TokenScope::unrestricted())
    }

    /// Adds a token by its hex hash, with a scope.
    pub fn with_hash(self, hex: &str, scope: TokenScope) -> Result<Self, AuthError> {
        let index = self.entries.len();
        let hash = from_hex(&hex.to_ascii_lowercase()).ok_or(AuthError::BadHash { index })?;
        Ok(self.with_hash_bytes(hash, scope))
    }

    fn with_hash_bytes(mut self, hash: [u8; 32], scope: TokenScope) -> Self {
        self.entries.push(TokenEntry { hash, scope });
        self
    }

    /// Number of tokens known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no token is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks `token` against every hash (no early exit) and returns its scope.
    pub fn verify(&self, token: &str) -> Result<&TokenScope, AuthError> {
        if token.is_empty() {
            return Err(AuthError::EmptyToken);
        }
        let hash = digest(token);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(&entry.scope);
            }
        }
        found.ok_or(AuthError::InvalidToken)
    }

    /// The hashes (lowercase hex) of `self` that `newer` does not have:
    /// the tokens a reload removes.
    pub fn removed_in(&self, newer: &Self) -> Vec<String> {
        (self.entries.iter())
            .filter(|e| !newer.entries.iter().any(|n| n.hash == e.hash))
            .map(|e| to_hex(&e.hash))
            .collect()
    }

    /// This store as a seed-style [`TokenValidator`].
    pub fn into_validator(self) -> TokenValidator {
        Arc::new(move |token: &str| self.verify(token).map(|_| ()).map_err(Into::into))
    }
}

/// The accepted tokens of a server whose tokens change while it runs (a
/// cluster's, from its store): a [`TokenStore`] behind a lock, replaced
/// whole. Cheap to clone; every clone sees the same tokens.
#[derive(Debug, Clone, Default)]
pub struct LiveTokens {
    current: Arc<std::sync::RwLock<TokenStore>>,
}

impl LiveTokens {
    /// Starts with `store`.
    pub fn new(store: TokenStore) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new(store)),
        }
    }

    /// Replaces the tokens: later authentications see `store`.
    pub fn replace(&self, store: TokenStore) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = store;
    }

    /// Checks `token` as [`TokenStore::verify`] does; its scope.
    pub fn verify(&self, token: &str) -> Result<TokenScope, AuthError> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.verify(token).cloned()
    }

    /// Tokens known now.
    pub fn len(&self) -> usize {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.len()
    }

    /// True when no token is known now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// These tokens as a seed-style [`TokenValidator`] that follows them.
    pub fn validator(&self) -> TokenValidator {
        let live = self.clone();
        Arc::new(move |token: &str| live.verify(token).map(|_| ()).map_err(Into::into))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_tokens_follow_their_replacement() {
        let live = LiveTokens::new(TokenStore::new().with_token("old"));
        let validator = live.validator();
        assert!(validator("old").is_ok());
        live.replace(TokenStore::new().with_token("new"));
        assert!(validator("old").is_err());
        assert!(validator("new").is_ok());
        assert_eq!(live.verify("new"), Ok(TokenScope::default()));
    }

    #[test]
    fn hashes_are_lowercase_hex() {
        let h = hash_token("tun_secret_token");
        assert_eq!(
            h,
            "7b0ae9b2fbe54b98d1b7b10cdac4b33d9dc5ac0ef1e765303d3c034846a3111f"
        );
    }

    #[test]
    fn store_accepts_known_and_refuses_others() {
        let store = TokenStore::new()
            .with_token("alpha")
            .with_hash(&hash_token("beta").to_uppercase(), TokenScope::default())
            .unwrap();
        assert!(store.verify("alpha").is_ok());
        assert!(store.verify("beta").is_ok());
        assert_eq!(store.verify("gamma"), Err(AuthError::InvalidToken));
        assert_eq!(store.verify(""), Err(AuthError::EmptyToken));
    }

    #[test]
    fn bad_hash_names_its_position() {
        let err = TokenStore::new()
            .with_token("a")
            .with_hash("xyz", TokenScope::default())
            .unwrap_err();
        assert_eq!(err, AuthError::BadHash { index: 1 });
    }

    #[test]
    fn scopes_limit_register_and_access() {
        let scope = TokenScope {
            register: Some(vec!["ssh".into()]),
            access: Some(vec![]),
            ports: None,
            visitors: Default::default(),
            peer: false,
        };
        let store = TokenStore::new()
            .with_hash(&hash_token("t"), scope)
            .unwrap();
        let scope = store.verify("t").unwrap();
        assert!(scope.check_register("ssh").is_ok());
        assert_eq!(
            scope.check_register("db"),
            Err(AuthError::RegisterDenied("db".into()))
        );
        assert!(scope.check_access("ssh").is_err());
        assert!(TokenScope::unrestricted().check_access("any").is_ok());
    }

    #[test]
    fn a_port_scope_allows_its_ranges_and_any_port_request() {
        let scope = TokenScope {
            ports: Some(vec![(30000, 30009), (30100, 30100)]),
            ..TokenScope::default()
        };
        assert!(scope.check_port(0).is_ok());
        assert!(scope.check_port(30009).is_ok());
        assert!(scope.check_port(30100).is_ok());
        assert_eq!(
            scope.check_port(30010).unwrap_err().to_string(),
            "token may not use port 30010 (its ports: 30000-30009, 30100)"
        );
        assert!(TokenScope::unrestricted().check_port(1).is_ok());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "**** Secret(****)");
        assert_eq!(s, Secret::new("hunter2"));
        assert_ne!(s, Secret::new("hunter3"));
    }

    #[test]
    fn validators_refuse_empty_and_unknown() {
        assert!(accept_all_tokens("x").is_ok());
        assert!(accept_all_tokens("").is_err());
        let v = TokenStore::new().with_token("ok").into_validator();
        assert!(v("ok").is_ok());
        assert!(v("no").is_err());
    }
}
