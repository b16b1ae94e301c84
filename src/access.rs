//! On-demand access sessions (the seed's `AccessManager` data): a temporary
//! local port for a remote service, with a time to live. Plain data and the
//! TTL arithmetic; the runtime's `AccessManager` runs the sessions.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use uuid::Uuid;

use crate::accounting::Snapshot;

/// The default time to live of a session: one hour.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// How long open connections may finish after their session expired.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A session as listed: where it listens, what it reaches, how long it has left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessSessionInfo {
    /// The session's id.
    pub id: Uuid,
    /// The endpoint name it was started for.
    pub endpoint: String,
    /// The local address to connect to.
    pub local_addr: SocketAddr,
    /// What each local connection reaches.
    pub remote_addr: String,
    /// When it started (seconds since the Unix epoch in JSON).
    #[serde(serialize_with = "unix_seconds")]
    pub started: SystemTime,
    /// Time left; `None` once expired.
    pub remaining: Option<Duration>,
    /// True once the TTL has passed (until `cleanup_expired`).
    pub expired: bool,
    /// Bytes each way (in: local client toward the remote) and connections, live.
    pub stats: Snapshot,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// The lifetime of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// When it started.
    pub started: SystemTime,
    /// How long it lives.
    pub ttl: Duration,
}

impl Lifetime {
    /// Time left at `now`; `None` once expired.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        let age = now.duration_since(self.started).unwrap_or_default();
        self.ttl.checked_sub(age).filter(|left| !left.is_zero())
    }

    /// True once the TTL has passed at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.remaining(now).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_counts_down_to_expiry() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let life = Lifetime {
            started,
            ttl: Duration::from_secs(60),
        };
        assert_eq!(life.remaining(started), Some(Duration::from_secs(60)));
        assert_eq!(
            life.remaining(started + Duration::from_secs(59)),
            Some(Duration::from_secs(1))
        );
        assert!(life.is_expired(started + Duration::from_secs(60)));
        // a clock that went backwards does not extend the session
        assert_eq!(
            life.remaining(started - Duration::from_secs(5)),
            Some(Duration::from_secs(60))
        );
    }
}
