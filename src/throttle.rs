//! Slowing down token guessing: failed authentications counted per address.
//!
//! The first few failures from an address are answered at once (a mistyped
//! token should say so quickly). After that, each failure locks the address
//! out for a delay that doubles, up to a maximum; while locked out, an `Auth`
//! from it is refused without its token being looked at, so that parallel
//! connections gain nothing. A success, or a quiet period, forgets the
//! address. The table is bounded. Pure: the caller passes `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures answered without delay.
pub const FREE_FAILURES: u32 = 3;
/// The first lockout; each further failure doubles it.
pub const FIRST_LOCKOUT: Duration = Duration::from_secs(1);
/// The longest lockout.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(60);
/// An address without a failure for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses tracked at most; past this, the oldest entries are dropped.
pub const MAX_ADDRESSES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// What to do with an `Auth` from an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Check the token.
    Check,
    /// Refuse without checking; the lockout ends in this long.
    LockedOut(Duration),
}

/// Failed authentications per address.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    records: HashMap<IpAddr, Record>,
}

impl AuthThrottle {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an `Auth` from `addr` may be checked now.
    pub fn admit(&self, addr: IpAddr, now: Instant) -> Admission {
        match self.records.get(&addr).and_then(|r| r.locked_until) {
            Some(until) if until > now => Admission::LockedOut(until - now),
            _ => Admission::Check,
        }
    }

    /// Records a failure; returns the lockout it starts, if any, and the
    /// failures counted so far.
    pub fn failed(&mut self, addr: IpAddr, now: Instant) -> (Option<Duration>, u32) {
        self.make_room(now);
        let record = self.records.entry(addr).or_insert(Record {
            failures: 0,
            last: now,
            locked_until: None,
        });
        if now.saturating_duration_since(record.last) >= FORGET_AFTER {
            record.failures = 0;
        }
        record.failures = record.failures.saturating_add(1);
        record.last = now;
        let lockout = lockout_after(record.failures);
        record.locked_until = lockout.map(|d| now + d);
        (lockout, record.failures)
    }

    /// A success from `addr` forgets its failures.
    pub fn succeeded(&mut self, addr: IpAddr) {
        self.records.remove(&addr);
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Before adding an entry to a full table: drops the forgotten, then the oldest.
    fn make_room(&mut self, now: Instant) {
        if self.records.len() < MAX_ADDRESSES {
            return;
        }
        self.records
            .retain(|_, r| now.saturating_duration_since(r.last) < FORGET_AFTER);
        while self.records.len() >= MAX_ADDRESSES {
            let oldest = self.records.iter().min_by_key(|(_, r)| r.last);
            let Some(addr) = oldest.map(|(a, _)| *a) else {
                break;
            };
            self.records.remove(&addr);
        }
    }
}

/// The lockout after the `failures`-th failure in a row.
pub fn lockout_after(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_FAILURES + 1)?;
    let factor = 1u32.checked_shl(over.min(16)).unwrap_or(u32::MAX);
    Some(FIRST_LOCKOUT.saturating_mul(factor).min(MAX_LOCKOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn lockouts_start_after_the_free_failures_and_double_to_the_cap() {
        let got: Vec<_> = (1..=12).map(lockout_after).collect();
        assert_eq!(&got[..3], &[None, None, None]);
        assert_eq!(got[3], Some(S));
        assert_eq!(got[4], Some(2 * S));
        assert_eq!(got[5], Some(4 * S));
        assert_eq!(got[11], Some(MAX_LOCKOUT));
        assert_eq!(lockout_after(u32::MAX), Some(MAX_LOCKOUT));
    }

    #[test]
    fn a_locked_out_address_is_not_checked_until_its_lockout_ends() {
        let mut t = AuthThrottle::new();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.failed(A, now).0, None);
            assert_eq!(t.admit(A, now), Admission::Check);
        }
        assert_eq!(t.failed(A, now), (Some(S), 4));
        assert_eq!(t.admit(A, now), Admission::LockedOut(S));
        assert_eq!(
            t.admit(B, now),
            Admission::Check,
            "other addresses are not affected"
        );
        assert_eq!(t.admit(A, now + S / 2), Admission::LockedOut(S / 2));
        assert_eq!(t.admit(A, now + S), Admission::Check);
        assert_eq!(t.failed(A, now + S).0, Some(2 * S));
    }

    #[test]
    fn success_and_quiet_forget() {
        let mut t = AuthThrottle::new();
        let now = Instant::now();
        for _ in 0..5 {
            t.failed(A, now);
        }
        t.succeeded(A);
        assert!(t.is_empty());
        for _ in 0..5 {
            t.failed(B, now);
        }
        assert_eq!(t.failed(B, now + FORGET_AFTER), (None, 1));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = AuthThrottle::new();
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            let addr = IpAddr::V6(std::net::Ipv6Addr::from(u128::from(i)));
            t.failed(addr, now + Duration::from_micros(u64::from(i)));
        }
        assert!(t.len() <= MAX_ADDRESSES);
        // the newest survive
        let newest = IpAddr::V6(std::net::Ipv6Addr::from(u128::from(
            MAX_ADDRESSES as u32 + 9,
        )));
        assert!(t.records.contains_key(&newest));
    }
}
