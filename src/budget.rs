//! Byte budgets: bytes in transit between two parts of the runtime, counted
//! against a limit, so that a queue the peer controls stays bounded whatever
//! the peer announces. Pure counting: what to do when a budget is spent (drop
//! a datagram, park a reader and wake it later) is the runtime's.
//!
//! * [`Budget`]: datagrams between a UDP listener and its control channel
//!   (one thread): a datagram that does not fit is refused.
//! * [`SharedBudget`]: what a tunnel side's sockets have read and its
//!   WebSocket has not yet taken (the read gate): a read is let in while
//!   the budget is not spent and counts whatever it read, and giving bytes
//!   back says when the budget reopened.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes in flight against a limit, shared by clones (on one thread in
/// practice; atomic so that a clone may travel in a message); over the
/// limit, a take is refused.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            used: Arc::default(),
            limit,
        }
    }

    /// Takes `n` bytes if they fit.
    pub(crate) fn take(&self, n: usize) -> bool {
        let fits = |used: usize| (used + n <= self.limit).then_some(used + n);
        (self.used)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits)
            .is_ok()
    }

    /// Gives `n` bytes back.
    pub(crate) fn give(&self, n: usize) {
        let _ = (self.used).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            Some(used.saturating_sub(n))
        });
    }
}

/// Bytes in transit against a limit, shared across threads. Open while fewer
/// than `limit` bytes are held; a holder checks first and then holds what it
/// got, so the count may pass the limit by one holder's bytes.
#[derive(Debug)]
pub(crate) struct SharedBudget {
    limit: usize,
    held: AtomicUsize,
}

impl SharedBudget {
    /// A budget that closes at `limit` bytes held.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Bytes held now.
    #[inline]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// True while fewer than `limit` bytes are held.
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        self.held() < self.limit
    }

    /// Holds `n` more bytes.
    #[inline]
    pub(crate) fn hold(&self, n: usize) {
        self.held.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives back `n` held bytes; true if that reopened the budget (it was
    /// closed and is open now), when those waiting for it are to be woken.
    #[inline]
    pub(crate) fn release(&self, n: usize) -> bool {
        let before = self.held.fetch_sub(n, Ordering::AcqRel);
        before >= self.limit && before - n < self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_does_not_fit_and_is_shared_by_its_clones() {
        let budget = Budget::new(100);
        let other = budget.clone();
        assert!(budget.take(60));
        assert!(!other.take(41), "60 + 41 is over 100");
        assert!(other.take(40));
        assert!(!budget.take(1));
        budget.give(30);
        assert!(other.take(30));
        assert!(!other.take(1));
    }

    #[test]
    fn giving_back_more_than_was_taken_stops_at_zero() {
        let budget = Budget::new(10);
        assert!(budget.take(5));
        budget.give(50);
        assert!(budget.take(10));
        assert!(!budget.take(1));
    }

    #[test]
    fn a_shared_budget_closes_at_its_limit_and_says_when_it_reopens() {
        let budget = SharedBudget::new(100);
        assert!(budget.is_open());
        budget.hold(60);
        assert!(budget.is_open());
        budget.hold(60);
        assert!(!budget.is_open());
        assert_eq!(budget.held(), 120);
        assert!(!budget.release(10), "110 held: still closed");
        assert!(budget.release(20), "90 held: reopened");
        assert!(budget.is_open());
        assert!(!budget.release(90), "it was open already");
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_shared_budget_at_exactly_its_limit_is_closed() {
        let budget = SharedBudget::new(100);
        budget.hold(100);
        assert!(!budget.is_open());
        assert!(budget.release(1));
        assert!(budget.is_open());
    }
}
