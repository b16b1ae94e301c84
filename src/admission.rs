//! Control connections awaiting authentication, counted in all and per
//! address.
//!
//! Anyone who can reach the control port can open connections without a
//! token, and each holds a socket and a session until it authenticates or its
//! `auth_timeout` ends it. Without a bound, a few thousand idle connections
//! run the server out of file descriptors, which its tunnels' visitors need
//! too. A connection takes a place before its upgrade to a WebSocket (on a
//! raw socket, as soon as it is handed over) and gives it back when it
//! authenticates or ends; with no place free, it is answered `503`. The per-address share keeps one address from
//! taking every place (an IPv6 address counts by its /64, what one host is
//! usually given); agents behind one NAT still get in, a few at a time.
//! Pure: no clock, no IO.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Refusals are logged at most once in this long (an attack would flood the log).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Why a connection gets no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PendingRefused {
    /// Every place is taken.
    #[error("too many connections awaiting authentication ({max}); retry later")]
    Full {
        /// The server's limit.
        max: usize,
    },
    /// The address has its share.
    #[error("too many connections awaiting authentication from this address ({max}); retry later")]
    AddressFull {
        /// The per-address limit.
        max: usize,
    },
}

/// Places for connections awaiting authentication.
#[derive(Debug)]
pub struct PendingAuth {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    max_total: usize,
    max_per_address: usize,
    refused_unlogged: u64,
    logged_at: Option<Instant>,
}

impl PendingAuth {
    /// At most `max_total` places, `max_per_address` of them per address.
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            total: 0,
            per_address: HashMap::new(),
            max_total,
            max_per_address,
            refused_unlogged: 0,
            logged_at: None,
        }
    }

    /// Counts a refusal at `now`; when a log line is due, the refusals it
    /// reports (this one and those not logged since the last line).
    pub fn note_refusal(&mut self, now: Instant) -> Option<u64> {
        self.refused_unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFUSAL_LOG_INTERVAL);
        if !due {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.refused_unlogged))
    }

    /// Takes a place for a connection from `addr`.
    pub fn enter(&mut self, addr: IpAddr) -> Result<(), PendingRefused> {
        if self.total >= self.max_total {
            return Err(PendingRefused::Full {
                max: self.max_total,
            });
        }
        let key = address_key(addr);
        if self.per_address.get(&key).copied().unwrap_or(0) >= self.max_per_address {
            return Err(PendingRefused::AddressFull {
                max: self.max_per_address,
            });
        }
        *self.per_address.entry(key).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a place `enter` gave for `addr`.
    pub fn leave(&mut self, addr: IpAddr) {
        let key = address_key(addr);
        let Some(taken) = self.per_address.get_mut(&key) else {
            return;
        };
        *taken -= 1;
        if *taken == 0 {
            self.per_address.remove(&key);
        }
        self.total = self.total.saturating_sub(1);
    }

    /// Places taken.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether no place is taken.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// What an address counts as: itself (IPv4, or IPv4 mapped into IPv6), or
/// its /64 (IPv6).
fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn places_are_bounded_in_all_and_per_address() {
        let mut pending = PendingAuth::new(3, 2);
        assert_eq!(pending.enter(ip("10.0.0.1")), Ok(()));
        assert_eq!(pending.enter(ip("10.0.0.1")), Ok(()));
        assert_eq!(
            pending.enter(ip("10.0.0.1")),
            Err(PendingRefused::AddressFull { max: 2 })
        );
        assert_eq!(pending.enter(ip("10.0.0.2")), Ok(()));
        assert_eq!(
            pending.enter(ip("10.0.0.3")),
            Err(PendingRefused::Full { max: 3 })
        );
        pending.leave(ip("10.0.0.1"));
        assert_eq!(pending.len(), 2);
        assert_eq!(pending.enter(ip("10.0.0.3")), Ok(()));
        for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            pending.leave(ip(a));
        }
        assert!(pending.is_empty());
        assert!(pending.per_address.is_empty(), "addresses left behind");
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let mut pending = PendingAuth::new(10, 1);
        assert_eq!(pending.enter(ip("2001:db8::1")), Ok(()));
        assert_eq!(
            pending.enter(ip("2001:db8::ffff:1")),
            Err(PendingRefused::AddressFull { max: 1 })
        );
        assert_eq!(pending.enter(ip("2001:db8:0:1::1")), Ok(()));
        assert_eq!(pending.enter(ip("192.0.2.7")), Ok(()));
        assert_eq!(
            pending.enter(ip("::ffff:192.0.2.7")),
            Err(PendingRefused::AddressFull { max: 1 })
        );
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second_with_their_count() {
        let mut pending = PendingAuth::new(1, 1);
        let t0 = Instant::now();
        assert_eq!(pending.note_refusal(t0), Some(1));
        assert_eq!(pending.note_refusal(t0 + Duration::from_millis(10)), None);
        assert_eq!(pending.note_refusal(t0 + Duration::from_millis(500)), None);
        assert_eq!(pending.note_refusal(t0 + REFUSAL_LOG_INTERVAL), Some(3));
    }

    #[test]
    fn a_refused_address_leaves_nothing_behind() {
        let mut pending = PendingAuth::new(10, 0);
        for last in 0..100u8 {
            let addr = IpAddr::from([10, 0, 0, last]);
            assert!(pending.enter(addr).is_err());
        }
        assert!(pending.per_address.is_empty());
    }

    #[test]
    fn leaving_an_unknown_address_changes_nothing() {
        let mut pending = PendingAuth::new(2, 2);
        pending.enter(ip("10.0.0.1")).unwrap();
        pending.leave(ip("10.0.0.9"));
        assert_eq!(pending.len(), 1);
    }
}
