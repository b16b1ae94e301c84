//! The connection's read side: a stream that reads only while the peer's
//! credit and the tunnel's read gate allow, straight behind a `Data` header
//! into a per-thread arena, so an idle connection holds no buffer.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};

use bytes::{BufMut, BytesMut};
use futures::Stream;
use std::future::Future;

use tokio::io::Interest;

use super::*;
use crate::protocol::{DATA_FRAME_OVERHEAD, Message};

/// Read credit shared between the actor and its reader stream.
pub(super) struct Credit {
    bytes: Cell<usize>,
    waker: RefCell<Option<Waker>>,
}

impl Credit {
    pub(super) fn new(initial: usize) -> Self {
        Self {
            bytes: Cell::new(initial),
            waker: RefCell::new(None),
        }
    }

    pub(super) fn grant(&self, n: u32) {
        self.bytes.set(self.bytes.get() + n as usize);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// Capacity of a thread's first read arena block: a few full frames, or many
/// small ones.
const ARENA_CAPACITY: usize = 256 * 1024;

/// The least room a read takes from what is left of the arena's block; below
/// it, the block is reclaimed (its frames all gone) or a new one started.
const ARENA_MIN_READ: usize = 16 * 1024;

thread_local! {
    /// One read arena per thread, shared by every connection on it: frames are
    /// read straight into it behind their header and split off, so an idle
    /// connection keeps no buffer and a frame costs no copy. Its memory is
    /// reused once the frames cut from it have been written out.
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(ARENA_CAPACITY));
}

/// Makes room in `arena` for a `Data` frame of up to `want` payload bytes and
/// says how many a read may take. A read takes what is left of the block,
/// even less than `want`, rather than a block of its own: reserving `want`
/// (up to 64 KiB) for every 64-byte message started a new 64 KiB block per
/// read while earlier frames were in flight (measured: 8-11 % of the server's
/// CPU in malloc, heap trims and page faults under 64-connection ping-pong).
fn make_room(arena: &mut BytesMut, want: usize) -> usize {
    arena.clear();
    let needed = DATA_FRAME_OVERHEAD + want;
    if arena.capacity() >= needed || arena.try_reclaim(needed) {
        return want;
    }
    if arena.capacity() >= DATA_FRAME_OVERHEAD + ARENA_MIN_READ {
        return arena.capacity() - DATA_FRAME_OVERHEAD;
    }
    // a block of one full frame, as `reserve` would allocate: larger ones
    // (256 KiB) cost a single upload a page fault per 4 KiB again
    *arena = BytesMut::with_capacity(needed);
    want
}

/// Reads at most `want` bytes (at most a frame's payload) from `socket`
/// straight behind a `Data` header in `arena`: the frame, its payload length
/// (`(empty, 0)` at end of stream), and how many bytes the read could take.
fn read_frame(
    socket: &TcpStream,
    arena: &mut BytesMut,
    id: Uuid,
    want: usize,
) -> io::Result<(Bytes, usize, usize)> {
    let room = make_room(arena, want);
    arena.put_bytes(0, DATA_FRAME_OVERHEAD);
    let read = socket.try_read_buf(&mut (&mut *arena).limit(room));
    let header = match read {
        Ok(0) => None,
        Ok(n) => Message::data_frame_header(id, n),
        Err(e) => {
            arena.clear();
            return Err(e);
        }
    };
    match header {
        Some(header) => {
            arena[..DATA_FRAME_OVERHEAD].copy_from_slice(&header);
            let n = arena.len() - DATA_FRAME_OVERHEAD;
            Ok((arena.split().freeze(), n, room))
        }
        None => {
            arena.clear();
            Ok((Bytes::new(), 0, room))
        }
    }
}

/// Reads at most `want` bytes as a `Data` frame, as [`read_frame`] does, into
/// this thread's arena. A short read means the socket is drained for now: its
/// read readiness is cleared then (as tokio's own `AsyncRead` does), which
/// spares the `EAGAIN` read that would follow every small message.
pub(super) fn read_now(socket: &TcpStream, id: Uuid, want: usize) -> io::Result<(Bytes, usize)> {
    let mut read = None;
    let outcome = socket.try_io(Interest::READABLE, || {
        let (frame, n, room) =
            ARENA.with(|arena| read_frame(socket, &mut arena.borrow_mut(), id, want))?;
        let drained = n > 0 && n < room;
        read = Some((frame, n));
        if drained {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (read, outcome) {
        (Some(read), _) => Ok(read),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// The payload bytes a read carried, as its thread's turns count them.
pub(super) fn payload_read(read: &io::Result<(Bytes, usize)>) -> usize {
    read.as_ref().map_or(0, |(_, n)| *n)
}

/// The socket's read side, gated by credit, by the tunnel's read gate and
/// by its service's bandwidth, if limited: returns `Pending` at zero
/// credit, while the gate is closed, or until the bandwidth allows a read.
pub(super) struct CreditedReader<P> {
    pub(super) id: Uuid,
    pub(super) socket: Rc<TcpStream>,
    pub(super) credit: Rc<Credit>,
    pub(super) gate: Arc<ReadGate>,
    /// `Unpaced` (compiled away) or a service's `Pace`.
    pub(super) pace: P,
}

/// How much a read may take beyond credit and gate.
pub(super) trait Pacer: Unpin {
    /// How much of `want` a read may take now; `None` (woken later) for nothing.
    fn allowance(&mut self, want: usize, cx: &mut TaskContext<'_>) -> Option<usize>;
    /// `n` bytes were read.
    fn taken(&self, n: usize);
}

/// No bandwidth limit: every read takes what credit allows.
pub(super) struct Unpaced;

impl Pacer for Unpaced {
    #[inline]
    fn allowance(&mut self, want: usize, _: &mut TaskContext<'_>) -> Option<usize> {
        Some(want)
    }

    #[inline]
    fn taken(&self, _: usize) {}
}

/// A stream's share of its service's bandwidth: the bucket, and the wait
/// for it to refill.
pub(super) struct Pace {
    bucket: SharedBandwidth,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Pace {
    pub(super) fn new(bucket: SharedBandwidth) -> Self {
        Self {
            bucket,
            sleep: None,
        }
    }
}

impl Pacer for Pace {
    /// How much of `want` a read may take now; `None` (woken when it may
    /// take some) while the bucket is empty.
    fn allowance(&mut self, want: usize, cx: &mut TaskContext<'_>) -> Option<usize> {
        loop {
            let now = std::time::Instant::now();
            let wait = {
                let mut bucket = self
                    .bucket
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match bucket.available(now) {
                    0 => bucket.wait(want, now),
                    n => return Some(n.min(want)),
                }
            };
            let sleep = self.sleep.insert(Box::pin(tokio::time::sleep(wait)));
            if sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }

    /// `n` bytes were read.
    fn taken(&self, n: usize) {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bucket.take(n);
    }
}

impl<P: Pacer> Stream for CreditedReader<P> {
    /// A `Data` frame and the payload bytes in it.
    type Item = io::Result<(Bytes, usize)>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let credit = this.credit.bytes.get();
        if credit == 0 {
            *this.credit.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if !this.gate.is_open(this.id, cx) {
            return Poll::Pending;
        }
        // invariant: `want` is at most MAX_DATA_PAYLOAD, so a header is always built
        let Some(want) = this.pace.allowance(credit.min(MAX_DATA_PAYLOAD), cx) else {
            return Poll::Pending;
        };
        loop {
            if let Err(e) = futures::ready!(this.socket.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            match read_now(&this.socket, this.id, want) {
                Ok((_, 0)) => return Poll::Ready(None),
                Ok((frame, n)) => {
                    this.credit.bytes.set(credit - n);
                    this.pace.taken(n);
                    return Poll::Ready(Some(Ok((frame, n))));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small reads while their frames are still in flight share blocks: a
    /// new block only every few hundred reads, not one per read.
    #[test]
    fn small_reads_share_the_arena_blocks_while_their_frames_live() {
        let mut arena = BytesMut::with_capacity(ARENA_CAPACITY);
        let mut in_flight = Vec::new();
        let mut blocks = 0;
        for _ in 0..5000 {
            let before = arena.as_ptr() as usize + arena.len();
            let room = make_room(&mut arena, MAX_DATA_PAYLOAD);
            assert!((ARENA_MIN_READ..=MAX_DATA_PAYLOAD).contains(&room));
            assert!(arena.capacity() >= DATA_FRAME_OVERHEAD + room);
            if arena.as_ptr() as usize != before {
                blocks += 1;
            }
            arena.put_bytes(7, DATA_FRAME_OVERHEAD + 64);
            in_flight.push(arena.split().freeze());
        }
        assert!(blocks < 20, "{blocks} blocks for 5000 small reads");
    }

    /// Once its frames are gone, a block is reused from its start.
    #[test]
    fn a_block_whose_frames_are_gone_is_reclaimed() {
        let mut arena = BytesMut::with_capacity(DATA_FRAME_OVERHEAD + MAX_DATA_PAYLOAD);
        let start = arena.as_ptr();
        let room = make_room(&mut arena, MAX_DATA_PAYLOAD);
        arena.put_bytes(7, DATA_FRAME_OVERHEAD + room);
        drop(arena.split());
        assert_eq!(make_room(&mut arena, MAX_DATA_PAYLOAD), MAX_DATA_PAYLOAD);
        assert_eq!(arena.as_ptr(), start);
    }
}
