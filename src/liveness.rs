//! Heartbeat bookkeeping: when a peer was last heard from and whether it is
//! overdue. Callers pass `now`; nothing here reads a clock.

use std::time::{Duration, Instant};

/// Tracks a peer that must show life at least every `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    timeout: Duration,
    last_seen: Instant,
}

impl Liveness {
    /// A peer that was just heard from at `now`.
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Self {
            timeout,
            last_seen: now,
        }
    }

    /// The peer showed life at `now` (a later call never moves time backwards).
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = self.last_seen.max(now);
    }

    /// When the peer is due to be declared dead.
    pub fn deadline(&self) -> Instant {
        self.last_seen + self.timeout
    }

    /// True once the peer has been silent for the whole timeout.
    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// How long the peer has been silent at `now`.
    pub fn silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_seen)
    }
}

/// Milliseconds since the Unix epoch for a `Heartbeat`, from a wall-clock reading passed in.
pub fn heartbeat_timestamp(since_epoch: Duration) -> u64 {
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_after_a_silent_timeout_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut live = Liveness::new(t0, 10 * s);
        assert!(!live.is_expired(t0 + 9 * s));
        live.seen(t0 + 5 * s);
        assert!(!live.is_expired(t0 + 14 * s));
        assert!(live.is_expired(t0 + 15 * s));
        live.seen(t0); // late report of an older event
        assert_eq!(live.deadline(), t0 + 15 * s);
        assert_eq!(live.silence(t0 + 7 * s), 2 * s);
    }

    #[test]
    fn timestamps_are_milliseconds() {
        assert_eq!(
            heartbeat_timestamp(Duration::from_secs(1_764_000_000)),
            1_764_000_000_000
        );
    }
}
