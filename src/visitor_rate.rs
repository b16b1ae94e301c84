//! How often one visitor address may open connections (or UDP flows) to a
//! service: a token bucket per address (an IPv6 address counts by its /64,
//! what one host is usually given), `per_second` tokens a second, a burst
//! of one second's worth. The buckets are bounded: past `MAX_ADDRESSES`,
//! the full ones (idle addresses) are forgotten first, then the oldest.
//! Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::admission::address_key;

/// Addresses tracked at once per service.
pub const MAX_ADDRESSES: usize = 4096;

/// One address's bucket: tokens left, as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of one service.
#[derive(Debug, Clone)]
pub struct VisitorRate {
    per_second: u32,
    buckets: HashMap<IpAddr, Bucket>,
}

impl VisitorRate {
    /// `per_second` new connections a second per address (at least 1).
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: per_second.max(1),
            buckets: HashMap::new(),
        }
    }

    /// The rate.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Whether a visitor from `ip` may open one more connection at `now`
    /// (it takes a token if so).
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = address_key(ip);
        let burst = f64::from(self.per_second);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_ADDRESSES {
            self.make_room(now);
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * burst;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets the addresses whose buckets have refilled (they are as if
    /// new), else the half least recently seen.
    fn make_room(&mut self, now: Instant) {
        let burst = f64::from(self.per_second);
        let full = |b: &Bucket| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * burst >= burst
        };
        self.buckets.retain(|_, b| !full(b));
        if self.buckets.len() >= MAX_ADDRESSES {
            let mut seen: Vec<Instant> = self.buckets.values().map(|b| b.at).collect();
            seen.sort_unstable();
            let cut = seen[seen.len() / 2];
            self.buckets.retain(|_, b| b.at > cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let mut rate = VisitorRate::new(5);
        let t = Instant::now();
        let admitted = (0..8).filter(|_| rate.admit(ip("192.0.2.1"), t)).count();
        assert_eq!(admitted, 5);
        assert!(
            rate.admit(ip("192.0.2.2"), t),
            "another address has its own"
        );
        assert!(!rate.admit(ip("192.0.2.1"), t + Duration::from_millis(100)));
        assert!(rate.admit(ip("192.0.2.1"), t + Duration::from_millis(200)));
        let later = t + Duration::from_secs(10);
        assert_eq!(
            (0..8)
                .filter(|_| rate.admit(ip("192.0.2.1"), later))
                .count(),
            5
        );
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let mut rate = VisitorRate::new(1);
        let t = Instant::now();
        assert!(rate.admit(ip("2001:db8:1:2::1"), t));
        assert!(!rate.admit(ip("2001:db8:1:2::ffff"), t), "the same /64");
        assert!(rate.admit(ip("2001:db8:1:3::1"), t));
    }

    #[test]
    fn the_buckets_stay_bounded() {
        let mut rate = VisitorRate::new(1);
        let t = Instant::now();
        for i in 0..(3 * MAX_ADDRESSES as u32) {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(rate.admit(addr, t + Duration::from_micros(u64::from(i))));
        }
        assert!(rate.buckets.len() <= MAX_ADDRESSES);
    }
}
