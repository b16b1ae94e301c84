//! `ReadGate`: how many bytes a tunnel side's sockets may have read that its
//! channel has not yet handed to the WebSocket. Not an actor.
//!
//! Credit windows bound what a *truthful* peer lets us send, but a peer can
//! announce huge windows and stop reading: the WebSocket actor then freezes
//! (actix-web#2441) while its connections keep reading into its mailbox. The
//! gate bounds that queue whatever the peer says: every `ForwardedConnection`
//! of a tunnel reads only while the gate is open, each chunk it reads holds an
//! [`InTransit`] ticket, and the ticket gives its bytes back when the channel
//! has passed the frame on (or dropped it). Readers waiting on a closed gate
//! are woken when it opens again. The count is a [`SharedBudget`] (`src/`);
//! this file holds the wakers and the tickets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Waker};

use bytes::Bytes;
use uuid::Uuid;

use crate::budget::SharedBudget;

/// The read gate of one tunnel side (a control channel, or an agent's link).
#[derive(Debug)]
pub(crate) struct ReadGate {
    budget: SharedBudget,
    waiting: Mutex<HashMap<Uuid, Waker>>,
}

impl ReadGate {
    /// A gate that closes at `limit` bytes in transit.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            budget: SharedBudget::new(limit),
            waiting: Mutex::default(),
        })
    }

    /// True if a read may be taken now (without waiting to be woken).
    pub(crate) fn has_room(&self) -> bool {
        self.budget.is_open()
    }

    /// True if `stream` may read now; otherwise its task is woken when the
    /// gate opens again.
    pub(crate) fn is_open(&self, stream: Uuid, cx: &Context<'_>) -> bool {
        if self.budget.is_open() {
            return true;
        }
        self.waiters().insert(stream, cx.waker().clone());
        // the gate may have opened between the check and the registration
        if self.budget.is_open() {
            self.waiters().remove(&stream);
            return true;
        }
        false
    }

    /// A ticket for `bytes` just read; they count until the ticket is dropped.
    pub(crate) fn hold(self: &Arc<Self>, bytes: usize) -> InTransit {
        self.budget.hold(bytes);
        InTransit {
            gate: self.clone(),
            bytes,
        }
    }

    fn release(&self, bytes: usize) {
        if self.budget.release(bytes) {
            let woken: Vec<Waker> = self.waiters().drain().map(|(_, w)| w).collect();
            woken.into_iter().for_each(Waker::wake);
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Waker>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes read from a socket and not yet handed to the WebSocket; given back
/// to the gate when dropped.
#[derive(Debug)]
pub(crate) struct InTransit {
    gate: Arc<ReadGate>,
    bytes: usize,
}

impl InTransit {
    /// The frame these bytes were read into, holding this ticket until its
    /// last copy is dropped: once the WebSocket's encoder has copied it out
    /// (not when it is queued for the WebSocket), so the gate also bounds
    /// what waits in the WebSocket's own queue. No copy of the bytes.
    pub(crate) fn attach(self, frame: Bytes) -> Bytes {
        Bytes::from_owner(Ticketed {
            frame,
            _ticket: self,
        })
    }
}

/// A frame and its ticket (see [`InTransit::attach`]).
struct Ticketed {
    frame: Bytes,
    _ticket: InTransit,
}

impl AsRef<[u8]> for Ticketed {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl Drop for InTransit {
    fn drop(&mut self) {
        self.gate.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::Wake;

    use super::*;

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn closes_at_the_limit_and_wakes_readers_when_tickets_drop() {
        let gate = ReadGate::new(100);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let cx = Context::from_waker(&waker);
        let stream = Uuid::new_v4();

        assert!(gate.is_open(stream, &cx));
        let first = gate.hold(60);
        assert!(gate.is_open(stream, &cx));
        let second = gate.hold(60);
        assert!(!gate.is_open(stream, &cx));
        assert_eq!(gate.budget.held(), 120);

        drop(first);
        assert!(flag.0.load(Ordering::SeqCst), "the waiting reader is woken");
        assert!(gate.is_open(stream, &cx));
        drop(second);
        assert_eq!(gate.budget.held(), 0);
    }
}
