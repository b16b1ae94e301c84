//! Reconnect delays: exponential from `initial` to `max`, jittered by a value
//! the caller draws, reset after a connection that stayed up.

use std::time::Duration;

/// Exponential backoff state for one reconnecting client.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    stable_after: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays double from `initial` up to `max`; a connection that lasted
    /// `stable_after` resets them. `initial` of zero is raised to 1 ms.
    pub fn new(initial: Duration, max: Duration, stable_after: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            stable_after,
            attempt: 0,
        }
    }

    /// Failed attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt, and counts the attempt.
    ///
    /// `jitter` is a random draw; the delay is spread over the upper half of the
    /// exponential step ("equal jitter"), so clients that lost the same server
    /// do not come back in lockstep, and never wait more than `max`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use zlayer_tunnel::backoff::Backoff;
    /// let s = Duration::from_secs(1);
    /// let mut b = Backoff::new(s, 8 * s, 10 * s);
    /// assert_eq!(b.next_delay(0), Duration::from_millis(500));
    /// assert_eq!(b.next_delay(0), Duration::from_secs(1));
    /// ```
    pub fn next_delay(&mut self, jitter: u64) -> Duration {
        let step = self.step(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(jitter % spread)
    }

    /// Records that a connection ended after lasting `uptime`; a long one resets the delays.
    pub fn connection_ended(&mut self, uptime: Duration) {
        if uptime >= self.stable_after {
            self.reset();
        }
    }

    /// Starts again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn step(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_up_to_max_within_jitter_bounds() {
        let mut b = Backoff::new(S, 8 * S, 10 * S);
        for step in [1, 2, 4, 8, 8, 8] {
            let d = b.next_delay(u64::MAX - 7);
            assert!(d >= step * S / 2 && d < step * S, "{d:?} for step {step}");
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut a = Backoff::new(S, 8 * S, 10 * S);
        let mut b = a.clone();
        assert_ne!(a.next_delay(1), b.next_delay(123_456_789));
    }

    #[test]
    fn resets_only_after_a_stable_connection() {
        let mut b = Backoff::new(S, 60 * S, 10 * S);
        b.next_delay(0);
        b.next_delay(0);
        b.connection_ended(3 * S);
        assert_eq!(b.attempt(), 2);
        b.connection_ended(10 * S);
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(0), S / 2);
    }

    #[test]
    fn survives_huge_attempt_counts() {
        let mut b = Backoff::new(S, 60 * S, 10 * S);
        for _ in 0..100 {
            assert!(b.next_delay(u64::MAX) <= 60 * S);
        }
    }
}
