//! Credit-based flow control per stream and direction (as HTTP/2 or yamux).
//!
//! The sender may have at most the peer's credit in flight; the receiver
//! returns credit with `Window` once bytes have left for their socket, in
//! batches of half a window. A stream that keeps draining grows its window,
//! doubling up to a maximum, paid from a budget shared by the whole tunnel, so
//! that memory held for stalled streams is at most
//! `streams x initial window + budget`, whatever the peers do.

use crate::protocol::MAX_WINDOW;

/// A flow-control violation by the peer; the stream is aborted, not the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The peer sent more than the credit it had.
    #[error("peer sent {len} bytes with only {credit} bytes of credit")]
    Overrun {
        /// Bytes received.
        len: usize,
        /// Credit the peer had.
        credit: u32,
    },
    /// A window increment took the credit past 2^31-1.
    #[error("window increment of {increment} overflows credit {credit}")]
    Overflow {
        /// The increment.
        increment: u32,
        /// The credit before it.
        credit: u32,
    },
}

/// Credit this side may still spend sending on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindow {
    credit: u32,
}

impl SendWindow {
    /// Starts with the peer's announced initial window.
    pub fn new(initial: u32) -> Self {
        Self { credit: initial }
    }

    /// Bytes that may be sent now.
    pub fn credit(&self) -> u32 {
        self.credit
    }

    /// How many of `wanted` bytes may go now.
    pub fn allowance(&self, wanted: usize) -> usize {
        wanted.min(self.credit as usize)
    }

    /// Spends credit for `len` bytes sent; never more than [`allowance`](Self::allowance).
    pub fn spend(&mut self, len: usize) {
        // invariant: callers send at most `allowance()` bytes, so len <= credit
        self.credit -= self.allowance(len) as u32;
    }

    /// Adds credit from a `Window` message.
    pub fn grant(&mut self, increment: u32) -> Result<(), FlowError> {
        match self.credit.checked_add(increment) {
            Some(credit) if credit <= MAX_WINDOW => {
                self.credit = credit;
                Ok(())
            }
            _ => Err(FlowError::Overflow {
                increment,
                credit: self.credit,
            }),
        }
    }
}

/// Credit shared by a tunnel's streams for growing their windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowBudget {
    available: u64,
}

impl WindowBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Self { available: bytes }
    }

    /// Bytes still available for growth.
    pub fn available(&self) -> u64 {
        self.available
    }

    fn take(&mut self, wanted: u32) -> u32 {
        let granted = u64::from(wanted).min(self.available);
        self.available -= granted;
        // invariant: granted <= wanted, a u32
        granted as u32
    }

    fn give_back(&mut self, bytes: u32) {
        self.available += u64::from(bytes);
    }
}

/// The receiving side of one stream direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    initial: u32,
    max: u32,
    window: u32,
    credit: u32,
    delivered: u32,
}

impl RecvWindow {
    /// A window that starts at `initial` (what we announced) and may grow to `max`.
    pub fn new(initial: u32, max: u32) -> Self {
        Self {
            initial,
            max: max.max(initial),
            window: initial,
            credit: initial,
            delivered: 0,
        }
    }

    /// The current window size.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Bytes received and not yet delivered to the socket.
    pub fn buffered(&self) -> u32 {
        self.window - self.credit - self.delivered
    }

    /// Accounts for `len` bytes received; more than the peer's credit is an overrun.
    pub fn on_data(&mut self, len: usize) -> Result<(), FlowError> {
        match u32::try_from(len) {
            Ok(n) if n <= self.credit => {
                self.credit -= n;
                Ok(())
            }
            _ => Err(FlowError::Overrun {
                len,
                credit: self.credit,
            }),
        }
    }

    /// Accounts for `len` bytes written to the socket; returns the `Window`
    /// increment to send, if half a window has accumulated.
    pub fn on_delivered(&mut self, len: usize, budget: &mut WindowBudget) -> Option<u32> {
        let len = u32::try_from(len)
            .unwrap_or(u32::MAX)
            .min(self.undelivered());
        self.delivered += len;
        if self.delivered < self.window / 2 || self.delivered == 0 {
            return None;
        }
        let growth = budget.take(self.window.min(self.max - self.window));
        self.window += growth;
        let increment = self.delivered + growth;
        self.credit += increment;
        self.delivered = 0;
        Some(increment)
    }

    /// Returns this stream's growth to the budget when the stream ends.
    pub fn release(&mut self, budget: &mut WindowBudget) {
        budget.give_back(self.window - self.initial);
        self.window = self.initial;
    }

    fn undelivered(&self) -> u32 {
        self.window - self.credit - self.delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u32 = 1024;

    #[test]
    fn sender_is_gated_by_credit() {
        let mut w = SendWindow::new(10);
        assert_eq!(w.allowance(64), 10);
        w.spend(10);
        assert_eq!(w.allowance(64), 0);
        w.grant(5).unwrap();
        assert_eq!(w.credit(), 5);
        assert!(w.grant(MAX_WINDOW).is_err());
    }

    #[test]
    fn overrun_is_refused() {
        let mut r = RecvWindow::new(64 * K, 64 * K);
        r.on_data(64 * K as usize).unwrap();
        assert_eq!(r.on_data(1), Err(FlowError::Overrun { len: 1, credit: 0 }));
    }

    #[test]
    fn credit_returns_in_half_window_batches() {
        let mut budget = WindowBudget::new(0);
        let mut r = RecvWindow::new(64 * K, 64 * K);
        r.on_data(40 * K as usize).unwrap();
        assert_eq!(r.on_delivered(16 * K as usize, &mut budget), None);
        assert_eq!(r.buffered(), 24 * K);
        assert_eq!(r.on_delivered(16 * K as usize, &mut budget), Some(32 * K));
        assert_eq!(r.buffered(), 8 * K);
    }

    #[test]
    fn windows_grow_from_the_budget_and_give_it_back() {
        let mut budget = WindowBudget::new(96 * K as u64);
        let mut r = RecvWindow::new(64 * K, 1024 * K);
        r.on_data(64 * K as usize).unwrap();
        // delivered 64K, window doubles to 128K: increment = 64K + 64K growth
        assert_eq!(r.on_delivered(64 * K as usize, &mut budget), Some(128 * K));
        assert_eq!(r.window(), 128 * K);
        r.on_data(128 * K as usize).unwrap();
        // only 32K of budget left
        assert_eq!(r.on_delivered(128 * K as usize, &mut budget), Some(160 * K));
        assert_eq!(budget.available(), 0);
        r.release(&mut budget);
        assert_eq!(budget.available(), 96 * K as u64);
    }

    #[test]
    fn delivering_more_than_received_is_clamped() {
        let mut budget = WindowBudget::new(0);
        let mut r = RecvWindow::new(100, 100);
        r.on_data(10).unwrap();
        assert_eq!(r.on_delivered(1000, &mut budget), None);
        assert_eq!(r.buffered(), 0);
    }
}
