//! Stream frames waiting for the WebSocket, taken round-robin across streams:
//! a bulk transfer's queued chunks do not hold up a ping-pong on another
//! stream by more than one chunk each. Frames of one stream keep their order
//! (a stream's `Close` never overtakes its `Data`).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use uuid::Uuid;

/// Per-stream FIFO queues served in turn.
#[derive(Debug, Default)]
pub struct FairQueue {
    queues: HashMap<Uuid, VecDeque<Bytes>>,
    /// The streams with frames waiting, in the order they are served.
    turns: VecDeque<Uuid>,
    frames: usize,
}

impl FairQueue {
    /// Queues `frame` behind the earlier frames of `stream`.
    pub fn push(&mut self, stream: Uuid, frame: Bytes) {
        let queue = self.queues.entry(stream).or_default();
        if queue.is_empty() {
            self.turns.push_back(stream);
        }
        queue.push_back(frame);
        self.frames += 1;
    }

    /// The next frame of the stream whose turn it is.
    pub fn pop(&mut self) -> Option<Bytes> {
        let stream = self.turns.pop_front()?;
        let queue = self.queues.get_mut(&stream)?;
        let frame = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&stream);
        } else {
            self.turns.push_back(stream);
        }
        self.frames -= usize::from(frame.is_some());
        frame
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: &str) -> Bytes {
        Bytes::copy_from_slice(tag.as_bytes())
    }

    #[test]
    fn streams_take_turns_and_keep_their_own_order() {
        let (bulk, ping) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut queue = FairQueue::default();
        for i in 0..4 {
            queue.push(bulk, frame(&format!("bulk{i}")));
        }
        queue.push(ping, frame("ping"));
        queue.push(ping, frame("close"));
        assert_eq!(queue.len(), 6);
        let order: Vec<Bytes> = std::iter::from_fn(|| queue.pop()).collect();
        let expected = ["bulk0", "ping", "bulk1", "close", "bulk2", "bulk3"];
        assert_eq!(order, expected.map(frame));
        assert!(queue.is_empty());
    }

    #[test]
    fn a_stream_that_empties_rejoins_at_the_back() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut queue = FairQueue::default();
        queue.push(a, frame("a0"));
        queue.push(b, frame("b0"));
        queue.push(b, frame("b1"));
        assert_eq!(queue.pop(), Some(frame("a0")));
        queue.push(a, frame("a1"));
        let rest: Vec<Bytes> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(rest, ["b0", "a1", "b1"].map(frame)[..].to_vec());
    }
}
