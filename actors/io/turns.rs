//! `Turns`: a stream that gives its thread back after a turn's worth of
//! bytes, so that on a thread shared by many sockets a small exchange is not
//! held behind a bulk stream's reads (issue 17).
//!
//! Each side of a tunnel runs its sockets on one thread. A bulk stream whose
//! socket always has data read up to 1 MiB in one poll (its credit; actix
//! polls a stream 16 items at a time), and a 64-byte ping that became
//! readable meanwhile waited for all of it: 1.2-1.5 ms at p50 beside one bulk
//! transfer. After [`TURN_BYTES`] the stream yields as tokio's `yield_now`
//! does, and stays pending, however often it is polled, until the runtime
//! has looked at its sockets again: whatever became ready meanwhile runs
//! first (docs/BENCHMARKS.md).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::{ArcWake, AtomicWaker};

/// Bytes a stream yields before it gives its thread back. Measured
/// (`tcpload mixed`, probe p50 beside one download / one upload): 1 MiB (no
/// turns) 1,370 / 1,560 µs, 64 KiB 770 / 920, 32 KiB 410 / 650, 16 KiB
/// 380 / 590, 8 KiB 410 / 660; the bulk's own rate unchanged throughout.
pub(crate) const TURN_BYTES: usize = 16 * 1024;

/// A stream taking turns with the other tasks and sockets of its thread.
pub(crate) struct Turns<S: Stream> {
    inner: S,
    /// The bytes an item carries.
    weigh: fn(&S::Item) -> usize,
    /// Bytes yielded since the thread was last given back.
    taken: usize,
    /// The wake-up of the yield under way, if any.
    yielding: Option<Arc<Deferred>>,
}

/// A wake-up that tokio defers until it has polled the runtime's sockets
/// (what `yield_now` does), remembered, so that a yield lasts until then:
/// `yield_now` itself is over at its next poll, and a task polled again at
/// once (actix polls a context's items again when one of them queued work)
/// would end it before the thread was given back.
#[derive(Default)]
struct Deferred {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for Deferred {
    fn wake_by_ref(deferred: &Arc<Self>) {
        deferred.fired.store(true, Ordering::Release);
        deferred.task.wake();
    }
}

impl<S: Stream> Turns<S> {
    /// `inner`, giving its thread back after every [`TURN_BYTES`] as `weigh`
    /// counts them.
    pub(crate) fn new(inner: S, weigh: fn(&S::Item) -> usize) -> Self {
        Self {
            inner,
            weigh,
            taken: 0,
            yielding: None,
        }
    }

    /// `Pending` while the thread's other work goes first: until tokio has
    /// polled its sockets and fired the deferred wake-up.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.yielding {
            None if self.taken < TURN_BYTES => Poll::Ready(()),
            None => {
                let deferred = Arc::new(Deferred::default());
                deferred.task.register(cx.waker());
                let waker = futures::task::waker(deferred.clone());
                // invariant: `yield_now` is pending at its first poll (it
                // defers `waker`, or wakes it at once outside a runtime)
                let _ = pin!(tokio::task::yield_now()).poll(&mut Context::from_waker(&waker));
                self.yielding = Some(deferred);
                Poll::Pending
            }
            Some(deferred) => {
                deferred.task.register(cx.waker());
                if !deferred.fired.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
                self.yielding = None;
                self.taken = 0;
                Poll::Ready(())
            }
        }
    }
}

impl<S: Stream + Unpin> Stream for Turns<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        futures::ready!(this.poll_turn(cx));
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(item)) => {
                this.taken += (this.weigh)(&item);
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // nothing more to read: the thread is given back anyway
                this.taken = 0;
                Poll::Pending
            }
        }
    }
}

/// The bytes of a chunk of a WebSocket's incoming byte stream.
pub(crate) fn chunk_len<E>(chunk: &Result<bytes::Bytes, E>) -> usize {
    chunk.as_ref().map_or(0, bytes::Bytes::len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A stream that always has a full frame ready gives its thread back
    /// once per turn, and loses nothing doing so.
    #[test]
    fn a_busy_stream_gives_its_thread_back_each_turn() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let frames = futures::stream::iter((0..64u32).map(|i| vec![i as u8; TURN_BYTES / 4]));
            let mut turns = Turns::new(frames, Vec::len);
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            let (mut got, mut pendings) = (Vec::new(), 0);
            loop {
                match Pin::new(&mut turns).poll_next(&mut cx) {
                    Poll::Ready(Some(frame)) => got.push(frame[0]),
                    Poll::Ready(None) => break,
                    Poll::Pending => {
                        pendings += 1;
                        tokio::task::yield_now().await;
                    }
                }
            }
            assert_eq!(got, (0..64u8).collect::<Vec<_>>());
            // 64 frames of a quarter turn each: a yield after every 4 (the
            // last 4 included, before the end is seen)
            assert_eq!(pendings, 16);
            assert!(turns.next().await.is_none());
        });
    }

    /// A yield lasts until the runtime has polled its sockets, however
    /// often the stream is polled meanwhile (actix polls a context's items
    /// again, in the same task poll, when one of them queued work).
    #[test]
    fn a_yield_holds_until_the_runtime_has_polled_its_sockets() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let frames = futures::stream::iter((0..2u8).map(|i| vec![i; TURN_BYTES]));
            let mut turns = Turns::new(frames, Vec::len);
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            let first = Pin::new(&mut turns).poll_next(&mut cx);
            assert!(matches!(first, Poll::Ready(Some(ref f)) if f[0] == 0));
            for _ in 0..5 {
                assert!(Pin::new(&mut turns).poll_next(&mut cx).is_pending());
            }
            tokio::task::yield_now().await;
            let second = Pin::new(&mut turns).poll_next(&mut cx);
            assert!(matches!(second, Poll::Ready(Some(ref f)) if f[0] == 1));
        });
    }
}
