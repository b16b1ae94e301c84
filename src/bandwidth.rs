//! A service's bandwidth limit: a token bucket of bytes, `per_second` a
//! second with a burst of one second's worth, shared by every stream of the
//! service on one side of the tunnel. Streams read at most what it allows
//! and wait for it to refill: traffic is slowed by reading less, never by
//! dropping bytes. Pure: the caller passes the time.

use std::time::{Duration, Instant};

/// The bucket.
#[derive(Debug, Clone)]
pub struct Bandwidth {
    per_second: u64,
    tokens: f64,
    at: Instant,
}

impl Bandwidth {
    /// `per_second` bytes a second (at least 1), full at `now`.
    pub fn new(per_second: u64, now: Instant) -> Self {
        let per_second = per_second.max(1);
        Self {
            per_second,
            tokens: per_second as f64,
            at: now,
        }
    }

    /// The rate, bytes a second.
    pub fn per_second(&self) -> u64 {
        self.per_second
    }

    fn refill(&mut self, now: Instant) {
        let rate = self.per_second as f64;
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.at = now;
    }

    /// Bytes a read may take at `now` (whole bytes only).
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.max(0.0) as usize
    }

    /// `n` bytes were read.
    pub fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// How long until at least `want` bytes (at most a second's worth) may
    /// be read, from `now`.
    pub fn wait(&mut self, want: usize, now: Instant) -> Duration {
        self.refill(now);
        let want = (want as f64).min(self.per_second as f64).max(1.0);
        let missing = want - self.tokens;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.per_second as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seconds_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = Bandwidth::new(1000, t);
        assert_eq!(b.available(t), 1000);
        b.take(1000);
        assert_eq!(b.available(t), 0);
        assert_eq!(b.wait(500, t), Duration::from_millis(500));
        assert_eq!(b.available(t + Duration::from_millis(250)), 250);
        assert_eq!(
            b.available(t + Duration::from_secs(10)),
            1000,
            "never more than a burst"
        );
    }

    #[test]
    fn a_wait_never_asks_for_more_than_a_second() {
        let t = Instant::now();
        let mut b = Bandwidth::new(100, t);
        b.take(100);
        assert_eq!(b.wait(1_000_000, t), Duration::from_secs(1));
    }
}
