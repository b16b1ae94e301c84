//! Reconnect delays: exponential from `initial` to `max` (every delay within
//! those bounds), jittered by a value the caller draws, reset after a
//! connection that stayed up.

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
    /// Every delay lies in `[initial, max]`. The step doubles from `initial`
    /// and stops at `max`; the delay is drawn by `jitter` (a random value the
    /// caller passes in) from a window half a step wide that ends at
    /// `min(1.5 * step, max)`. So the first delay is between `initial` and
    /// `1.5 * initial`, and once the step reaches `max` delays spread over
    /// `[max / 2, max]` (never below `initial`): agents that lost the same
    /// server do not come back in lockstep, even at the cap.
    ///
    /// ```
    /// use std::time::Duration;
    /// use zlayer_tunnel::backoff::Backoff;
    /// let s = Duration::from_secs(1);
    /// let mut b = Backoff::new(s, 8 * s, 10 * s);
    /// assert_eq!(b.next_delay(0), s); // window [1 s, 1.5 s]
    /// assert_eq!(b.next_delay(0), 2 * s); // window [2 s, 3 s]
    /// ```
    pub fn next_delay(&mut self, jitter: u64) -> Duration {
        let (low, high) = self.window(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        // whole milliseconds: what a person reads in the log and the status
        let span = u64::try_from(high.saturating_sub(low).as_millis()).unwrap_or(u64::MAX);
        let offset = span.checked_add(1).map_or(jitter, |n| jitter % n);
        low + Duration::from_millis(offset)
    }

    /// The delay before the next attempt after a failure that retrying soon
    /// cannot fix (a certificate not trusted, a token's scope): at the cap,
    /// drawn from `[max / 2, max]` as any delay there. The steps are left
    /// where they were: once the fault is fixed, a passing one is retried
    /// as soon as before.
    ///
    /// ```
    /// use std::time::Duration;
    /// use zlayer_tunnel::backoff::Backoff;
    /// let s = Duration::from_secs(1);
    /// let mut b = Backoff::new(s, 60 * s, 10 * s);
    /// assert!(b.next_delay_at_max(0) >= 30 * s);
    /// ```
    pub fn next_delay_at_max(&mut self, jitter: u64) -> Duration {
        // the step saturates at `max` from 2^31 * initial on
        let attempt = self.attempt;
        self.attempt = 31;
        let delay = self.next_delay(jitter);
        self.attempt = attempt;
        delay
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

    /// The inclusive range the delay of `attempt` is drawn from.
    fn window(&self, attempt: u32) -> (Duration, Duration) {
        let step = self.step(attempt);
        let high = step.saturating_add(step / 2).min(self.max);
        let low = high.saturating_sub(step / 2).max(self.initial);
        (low, high)
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
    const JITTERS: [u64; 6] = [0, 1, 499_999_999, 123_456_789_012, u64::MAX - 7, u64::MAX];

    #[test]
    fn the_first_delay_is_at_least_the_reconnect_interval() {
        for jitter in JITTERS {
            let d = Backoff::new(S, 60 * S, 10 * S).next_delay(jitter);
            assert!(d >= S && d <= S * 3 / 2, "{d:?} for jitter {jitter}");
        }
    }

    #[test]
    fn doubles_up_to_max_within_jitter_bounds() {
        let mut b = Backoff::new(S, 8 * S, 10 * S);
        let ms = Duration::from_millis;
        let windows = [
            (1000, 1500),
            (2000, 3000),
            (4000, 6000),
            (4000, 8000),
            (4000, 8000),
        ];
        for (low, high) in windows {
            let d = b.next_delay(u64::MAX - 7);
            assert!(
                d >= ms(low) && d <= ms(high),
                "{d:?} outside {low}..={high} ms"
            );
        }
    }

    #[test]
    fn every_delay_lies_between_the_bounds() {
        let ms = Duration::from_millis;
        for (initial, max) in [(S, 60 * S), (S, S), (S, S * 6 / 5), (ms(50), ms(500))] {
            for jitter in JITTERS {
                let mut b = Backoff::new(initial, max, 10 * S);
                for _ in 0..40 {
                    let d = b.next_delay(jitter);
                    assert!(
                        d >= initial && d <= max,
                        "{d:?} outside {initial:?}..={max:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn reaches_max_and_still_spreads_there() {
        let mut b = Backoff::new(S, 8 * S, 10 * S);
        for _ in 0..3 {
            b.next_delay(0);
        }
        // the step is now 8 s: the window is [4 s, 8 s]
        // (jitter in whole milliseconds: 4,000 of them from the window's start)
        assert_eq!(b.next_delay(4_000), 8 * S);
        assert_eq!(b.next_delay(0), 4 * S);
        assert!(b.next_delay(u64::MAX) <= 8 * S);
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
        assert_eq!(b.next_delay(0), 4 * S);
        b.connection_ended(10 * S);
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(0), S);
    }

    #[test]
    fn survives_huge_attempt_counts() {
        let mut b = Backoff::new(S, 60 * S, 10 * S);
        for _ in 0..100 {
            let d = b.next_delay(u64::MAX);
            assert!(d >= S && d <= 60 * S, "{d:?}");
        }
    }
}
