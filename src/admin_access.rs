//! Who may use the admin listener: bearer tokens, kept as SHA-256 hashes
//! and compared in constant time. `/healthz` is always open; reading
//! (`/status`, `/metrics`) needs the read token if one is set (the admin
//! token reads too); anything that changes something needs the admin
//! token, and is refused while none is set. Pure: the handlers ask.

use subtle::ConstantTimeEq;

use crate::auth::hash_token;

/// What an endpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminNeed {
    /// It reports (`GET /status`, `GET /metrics`).
    Read,
    /// It changes something (`POST /reload`, `POST /services`, ...).
    Write,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    /// No bearer token, or not the right one (401).
    #[error("a valid admin bearer token is required (Authorization: Bearer ...)")]
    Unauthorized,
    /// A change was asked of a listener with no admin token set (403).
    #[error("this admin listener takes no changes: start it with --admin-token")]
    NoAdminToken,
}

/// The admin listener's tokens, as hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAccess {
    admin: Option<String>,
    read: Option<String>,
}

impl AdminAccess {
    /// Everything readable without a token; no changes (the default).
    pub fn open() -> Self {
        Self::default()
    }

    /// Changes need `token` (which reads too).
    #[must_use]
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin = Some(hash_token(token));
        self
    }

    /// Reading needs `token` (or the admin token).
    #[must_use]
    pub fn with_read_token(mut self, token: &str) -> Self {
        self.read = Some(hash_token(token));
        self
    }

    /// Whether a request with `authorization` (the header's value, if
    /// any) may do what `need` says.
    pub fn check(&self, need: AdminNeed, authorization: Option<&str>) -> Result<(), AdminRefusal> {
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| hash_token(t.trim()));
        let matches = |hash: &Option<String>| match (hash, &presented) {
            (Some(want), Some(got)) => bool::from(want.as_bytes().ct_eq(got.as_bytes())),
            _ => false,
        };
        match need {
            AdminNeed::Write if self.admin.is_none() => Err(AdminRefusal::NoAdminToken),
            AdminNeed::Write if matches(&self.admin) => Ok(()),
            AdminNeed::Read if self.read.is_none() => Ok(()),
            AdminNeed::Read if matches(&self.read) || matches(&self.admin) => Ok(()),
            _ => Err(AdminRefusal::Unauthorized),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_is_open_unless_a_read_token_is_set() {
        let open = AdminAccess::open();
        assert_eq!(open.check(AdminNeed::Read, None), Ok(()));
        assert_eq!(
            open.check(AdminNeed::Write, Some("Bearer x")),
            Err(AdminRefusal::NoAdminToken)
        );
        let admin_only = AdminAccess::open().with_admin_token("a");
        assert_eq!(admin_only.check(AdminNeed::Read, None), Ok(()));
        let guarded = AdminAccess::open()
            .with_admin_token("a")
            .with_read_token("r");
        assert_eq!(
            guarded.check(AdminNeed::Read, None),
            Err(AdminRefusal::Unauthorized)
        );
        assert_eq!(guarded.check(AdminNeed::Read, Some("Bearer r")), Ok(()));
        assert_eq!(
            guarded.check(AdminNeed::Read, Some("Bearer a")),
            Ok(()),
            "admin reads"
        );
        assert_eq!(
            guarded.check(AdminNeed::Read, Some("Bearer x")),
            Err(AdminRefusal::Unauthorized)
        );
    }

    #[test]
    fn changes_need_the_admin_token_itself() {
        let guarded = AdminAccess::open()
            .with_admin_token("a")
            .with_read_token("r");
        assert_eq!(guarded.check(AdminNeed::Write, Some("Bearer a")), Ok(()));
        assert_eq!(
            guarded.check(AdminNeed::Write, Some("Bearer r")),
            Err(AdminRefusal::Unauthorized)
        );
        assert_eq!(
            guarded.check(AdminNeed::Write, None),
            Err(AdminRefusal::Unauthorized)
        );
        assert_eq!(
            guarded.check(AdminNeed::Write, Some("a")),
            Err(AdminRefusal::Unauthorized)
        );
    }
}
