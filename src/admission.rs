//! Control connections awaiting authentication, counted in all and per
//! address, the oldest dropped first when a new one needs its place.
//!
//! Anyone who can reach the control port can open connections without a
//! token, and each holds a socket and a session until it authenticates or its
//! `auth_timeout` ends it. Without a bound, a few thousand idle connections
//! run the server out of file descriptors, which its tunnels' visitors need
//! too. A connection takes a place before its upgrade to a WebSocket (on a
//! raw socket, as soon as it is handed over) and gives it back when it
//! authenticates or ends.
//!
//! With every place taken, a newcomer is not refused: the connection that has
//! waited longest is dropped to make room. A genuine agent authenticates in a
//! round trip, so a flood of connections that never authenticate cannot keep
//! it out, however often the flood reconnects; it would have to open more
//! connections than there are places within that round trip. The
//! per-address share works the same way within one address (an IPv6 address
//! counts by its /64, what one host is usually given): one address cannot
//! take more than its share, and a newcomer from a full address drops that
//! address's oldest. Pure: no clock, no IO.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// A place, named in the order places were taken (a smaller one is older).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlaceId(u64);

/// A place taken, and what was dropped for it.
#[derive(Debug)]
pub struct Entered<T> {
    /// The newcomer's place, to give back with [`PendingAuth::leave`].
    pub place: PlaceId,
    /// What the connection dropped to make room had left with its place.
    pub evicted: Option<T>,
}

/// Places for connections awaiting authentication; each holds a `T` (what
/// it takes to drop its connection).
#[derive(Debug)]
pub struct PendingAuth<T> {
    places: BTreeMap<PlaceId, (IpAddr, T)>,
    per_address: HashMap<IpAddr, BTreeSet<PlaceId>>,
    next: u64,
    max_total: usize,
    max_per_address: usize,
}

impl<T> PendingAuth<T> {
    /// At most `max_total` places, `max_per_address` of them per address
    /// (at least one each).
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            places: BTreeMap::new(),
            per_address: HashMap::new(),
            next: 0,
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
        }
    }

    /// Takes a place for a connection from `addr`, holding `value`; when
    /// the address has its share, or every place is taken, the oldest of
    /// that address, or of all, is dropped and its value returned.
    pub fn enter(&mut self, addr: IpAddr, value: T) -> Entered<T> {
        let key = address_key(addr);
        let address_full = self
            .per_address
            .get(&key)
            .is_some_and(|places| places.len() >= self.max_per_address);
        let oldest = if address_full {
            self.per_address
                .get(&key)
                .and_then(|places| places.first().copied())
        } else if self.places.len() >= self.max_total {
            self.places.keys().next().copied()
        } else {
            None
        };
        let evicted = oldest.and_then(|oldest| self.leave(oldest));
        let place = PlaceId(self.next);
        self.next += 1;
        self.places.insert(place, (key, value));
        self.per_address.entry(key).or_default().insert(place);
        Entered { place, evicted }
    }

    /// Gives back `place`; its value, unless it was dropped already.
    pub fn leave(&mut self, place: PlaceId) -> Option<T> {
        let (key, value) = self.places.remove(&place)?;
        if let Some(places) = self.per_address.get_mut(&key) {
            places.remove(&place);
            if places.is_empty() {
                self.per_address.remove(&key);
            }
        }
        Some(value)
    }

    /// Places taken.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    /// Whether no place is taken.
    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }
}

/// What an address counts as: itself (IPv4, or IPv4 mapped into IPv6), or
/// its /64 (IPv6), what one host is usually given.
pub fn address_key(addr: IpAddr) -> IpAddr {
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
    fn a_full_address_drops_its_own_oldest_and_a_full_server_the_oldest_of_all() {
        let mut pending = PendingAuth::new(3, 2);
        assert!(pending.enter(ip("10.0.0.1"), "a1").evicted.is_none());
        assert!(pending.enter(ip("10.0.0.2"), "b1").evicted.is_none());
        assert!(pending.enter(ip("10.0.0.1"), "a2").evicted.is_none());
        // 10.0.0.1 has its share: its oldest goes, not 10.0.0.2's older one
        assert_eq!(pending.enter(ip("10.0.0.1"), "a3").evicted, Some("a1"));
        assert_eq!(pending.len(), 3);
        // every place taken: the oldest of all goes
        assert_eq!(pending.enter(ip("10.0.0.3"), "c1").evicted, Some("b1"));
        assert_eq!(pending.enter(ip("10.0.0.3"), "c2").evicted, Some("a2"));
        assert_eq!(pending.len(), 3);
    }

    #[test]
    fn leaving_gives_the_place_back_once() {
        let mut pending = PendingAuth::new(2, 2);
        let first = pending.enter(ip("10.0.0.1"), 1).place;
        let second = pending.enter(ip("10.0.0.1"), 2).place;
        assert_eq!(pending.leave(first), Some(1));
        assert_eq!(pending.leave(first), None);
        assert!(pending.enter(ip("10.0.0.2"), 3).evicted.is_none());
        // a place dropped to make room has nothing left to give back
        assert_eq!(pending.enter(ip("10.0.0.3"), 4).evicted, Some(2));
        assert_eq!(pending.leave(second), None);
        assert_eq!(pending.len(), 2);
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let mut pending = PendingAuth::new(10, 1);
        assert!(pending.enter(ip("2001:db8::1"), 1).evicted.is_none());
        assert_eq!(pending.enter(ip("2001:db8::ffff:1"), 2).evicted, Some(1));
        assert!(pending.enter(ip("2001:db8:0:1::1"), 3).evicted.is_none());
        assert!(pending.enter(ip("192.0.2.7"), 4).evicted.is_none());
        assert_eq!(pending.enter(ip("::ffff:192.0.2.7"), 5).evicted, Some(4));
    }

    #[test]
    fn nothing_is_left_behind_once_every_place_is_given_back() {
        let mut pending = PendingAuth::new(8, 3);
        let places: Vec<_> = (0..100u8)
            .map(|last| {
                pending
                    .enter(IpAddr::from([10, 0, 0, last % 5]), last)
                    .place
            })
            .collect();
        assert_eq!(pending.len(), 8);
        for place in places {
            pending.leave(place);
        }
        assert!(pending.is_empty());
        assert!(pending.per_address.is_empty(), "addresses left behind");
    }

    #[test]
    fn no_limit_is_below_one_place() {
        let mut pending = PendingAuth::new(0, 0);
        assert!(pending.enter(ip("10.0.0.1"), 1).evicted.is_none());
        assert_eq!(pending.enter(ip("10.0.0.1"), 2).evicted, Some(1));
    }
}
