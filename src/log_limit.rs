//! Log lines a remote party can trigger, held to one per kind per second
//! with the count of what was held back, so that a flood of wrong tokens,
//! refused visitors or broken frames cannot fill the operator's disk. Every
//! event is counted all the same (`/metrics`).

use std::time::{Duration, Instant};

/// What a remote party made happen, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoteEvent {
    /// A token refused.
    AuthRefused,
    /// An `Auth` refused unchecked: its address is locked out.
    AuthLockedOut,
    /// A connection that did not authenticate in time.
    AuthTimeout,
    /// A session closed for breaking the protocol.
    ProtocolError,
    /// A visitor of a public port refused (a limit, a legacy agent).
    VisitorRefused,
    /// A visitor the agent refused (its service down, its policy).
    AgentRefusedVisitor,
    /// An access stream refused (scope, no such service).
    AccessRefused,
    /// A connection awaiting authentication dropped to make room for a newer one.
    AuthEvicted,
    /// An agent's health checks of a replica changed their verdict.
    ReplicaHealth,
    /// An admin request without the right token.
    AdminRefused,
}

impl RemoteEvent {
    /// Every kind, in the order of their counters.
    pub const ALL: [Self; 10] = [
        Self::AuthRefused,
        Self::AuthLockedOut,
        Self::AuthTimeout,
        Self::ProtocolError,
        Self::VisitorRefused,
        Self::AgentRefusedVisitor,
        Self::AccessRefused,
        Self::AuthEvicted,
        Self::ReplicaHealth,
        Self::AdminRefused,
    ];

    /// Its name, as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AuthRefused => "auth_refused",
            Self::AuthLockedOut => "auth_locked_out",
            Self::AuthTimeout => "auth_timeout",
            Self::ProtocolError => "protocol_error",
            Self::VisitorRefused => "visitor_refused",
            Self::AgentRefusedVisitor => "agent_refused_visitor",
            Self::AccessRefused => "access_refused",
            Self::AuthEvicted => "auth_evicted",
            Self::ReplicaHealth => "replica_health",
            Self::AdminRefused => "admin_refused",
        }
    }

    /// Its place in [`RemoteEvent::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The longest a kind of event stays unlogged while it keeps happening.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Whether one kind of line may be logged now: at most one per
/// [`LOG_INTERVAL`], with the count of those held back.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogGate {
    /// When the last line was logged.
    last: Option<Instant>,
    /// Lines held back since.
    held: u64,
}

impl LogGate {
    /// A line at `now`: `Some(held_back)` when it may be logged (with the
    /// count of those not logged since the last one), `None` when it is
    /// held back.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.saturating_duration_since(at) < LOG_INTERVAL => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// Which remote events may be logged now.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// One gate per kind.
    kinds: [LogGate; RemoteEvent::ALL.len()],
}

impl LogLimiter {
    /// Nothing logged yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// An event of `kind` at `now`: `Some(held_back)` when a line may be
    /// logged (with the count of those not logged since the last one),
    /// `None` when it is held back.
    pub fn admit(&mut self, kind: RemoteEvent, now: Instant) -> Option<u64> {
        self.kinds[kind.index()].admit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_second_with_what_was_held_back() {
        let mut limiter = LogLimiter::new();
        let t0 = Instant::now();
        assert_eq!(limiter.admit(RemoteEvent::AuthRefused, t0), Some(0));
        for _ in 0..999 {
            assert_eq!(limiter.admit(RemoteEvent::AuthRefused, t0), None);
        }
        // another kind has its own allowance
        assert_eq!(limiter.admit(RemoteEvent::VisitorRefused, t0), Some(0));
        let later = t0 + LOG_INTERVAL;
        assert_eq!(limiter.admit(RemoteEvent::AuthRefused, later), Some(999));
        assert_eq!(limiter.admit(RemoteEvent::AuthRefused, later), None);
    }

    #[test]
    fn names_are_distinct_and_indexes_match() {
        for (i, kind) in RemoteEvent::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
        let names: std::collections::HashSet<_> =
            RemoteEvent::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), RemoteEvent::ALL.len());
    }
}
