//! The stream table, alone and as a pair of tunnel sides driven in memory.

use super::*;

const K: u32 = 1024;

fn settings() -> StreamSettings {
    StreamSettings {
        max_streams: 4,
        recv_initial: 64 * K,
        recv_max: 1024 * K,
        send_initial: 64 * K,
        budget: 4096 * K as u64,
    }
}

fn id(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn frames(out: &[StreamAction]) -> Vec<Message> {
    out.iter()
        .filter_map(|a| match a {
            StreamAction::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// One side of a tunnel with a pretend socket on each stream.
struct Side {
    table: StreamTable,
    written: Vec<u8>,
    shut: bool,
    reset: bool,
}

impl Side {
    fn new() -> Self {
        Self {
            table: StreamTable::new(settings()),
            written: Vec::new(),
            shut: false,
            reset: false,
        }
    }

    /// Takes frames from the peer; writes delivered bytes at once unless `stalled`.
    fn receive(&mut self, frames: Vec<Message>, stalled: bool) -> Vec<Message> {
        let mut out = Vec::new();
        for f in frames {
            self.table.on_frame(f, &mut out);
        }
        let mut replies = Vec::new();
        for action in out {
            match action {
                StreamAction::Deliver { id, data } => {
                    self.written.extend_from_slice(&data);
                    if !stalled {
                        replies.extend(self.table.on_delivered(id, data.len()));
                    }
                }
                StreamAction::ShutdownWrite { .. } => self.shut = true,
                StreamAction::Reset { .. } => self.reset = true,
                StreamAction::Send(m) => replies.push(m),
                StreamAction::Credit { .. } => {}
            }
        }
        replies
    }

    /// Reads what the credit allows from `source`, in chunks of at most 16 KiB.
    fn send_from(&mut self, id: Uuid, source: &mut &[u8]) -> Vec<Message> {
        let mut frames = Vec::new();
        loop {
            let n = (self.table.send_credit(id) as usize)
                .min(source.len())
                .min(16 * 1024);
            if n == 0 {
                return frames;
            }
            let chunk = Bytes::copy_from_slice(&source[..n]);
            *source = &source[n..];
            frames.push(self.table.send_data(id, chunk).unwrap());
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

#[test]
fn a_pair_moves_a_large_transfer_byte_exact() {
    let (mut a, mut b) = (Side::new(), Side::new());
    a.table.open(id(1)).unwrap();
    b.table.open(id(1)).unwrap();
    let data = pattern(5 * 1024 * 1024 + 17);
    let mut source = &data[..];
    let mut rounds = 0;
    while !source.is_empty() {
        let sent = a.send_from(id(1), &mut source);
        let credit = b.receive(sent, false);
        a.receive(credit, false);
        rounds += 1;
        assert!(rounds < 10_000, "no progress");
    }
    assert_eq!(b.written, data);
    // the window grew from 64 KiB toward 1 MiB as the stream kept draining
    assert!(
        a.table.send_credit(id(1)) > 64 * K,
        "{}",
        a.table.send_credit(id(1))
    );
}

#[test]
fn a_stalled_receiver_caps_the_sender_at_the_window() {
    let (mut a, mut b) = (Side::new(), Side::new());
    a.table.open(id(1)).unwrap();
    b.table.open(id(1)).unwrap();
    let data = pattern(1024 * 1024);
    let mut source = &data[..];
    let sent = a.send_from(id(1), &mut source);
    assert!(b.receive(sent, true).is_empty());
    assert_eq!(b.written.len(), 64 * 1024);
    assert!(
        a.send_from(id(1), &mut source).is_empty(),
        "sender kept going"
    );
}

#[test]
fn half_close_lets_the_other_direction_finish() {
    let (mut a, mut b) = (Side::new(), Side::new());
    a.table.open(id(1)).unwrap();
    b.table.open(id(1)).unwrap();
    let eof = a.table.local_eof(id(1)).unwrap();
    assert!(b.receive(vec![eof], false).is_empty());
    assert!(b.shut);
    // b still sends its reply after a's eof
    let reply = pattern(100_000);
    let mut source = &reply[..];
    let mut rounds = 0;
    while !source.is_empty() {
        let sent = b.send_from(id(1), &mut source);
        let credit = a.receive(sent, false);
        b.receive(credit, false);
        rounds += 1;
        assert!(rounds < 100);
    }
    assert_eq!(a.written, reply);
    let eof = b.table.local_eof(id(1)).unwrap();
    a.receive(vec![eof], false);
    assert!(a.table.is_empty() && b.table.is_empty());
    assert_eq!(a.table.budget_available(), settings().budget);
}

#[test]
fn overrun_aborts_that_stream_only() {
    let mut b = Side::new();
    b.table.open(id(1)).unwrap();
    b.table.open(id(2)).unwrap();
    let too_much = Message::data(id(1), Bytes::from(vec![0; 8 * 1024])).unwrap();
    let first = Message::data(id(1), Bytes::from(vec![0; 60 * 1024])).unwrap();
    let replies = b.receive(vec![first, too_much], true);
    assert!(b.reset);
    assert_eq!(
        replies,
        vec![Message::Close {
            connection_id: id(1),
            kind: CloseKind::Abort
        }]
    );
    assert!(!b.table.contains(id(1)) && b.table.contains(id(2)));
}

#[test]
fn unknown_streams_get_an_abort_for_data_only() {
    let mut t = StreamTable::new(settings());
    let mut out = Vec::new();
    t.on_frame(
        Message::data(id(9), Bytes::from_static(b"x")).unwrap(),
        &mut out,
    );
    assert_eq!(
        frames(&out),
        vec![Message::Close {
            connection_id: id(9),
            kind: CloseKind::Abort
        }]
    );
    out.clear();
    t.on_frame(Message::window(id(9), 5).unwrap(), &mut out);
    t.on_frame(
        Message::Close {
            connection_id: id(9),
            kind: CloseKind::Abort,
        },
        &mut out,
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn data_after_eof_and_window_overflow_abort() {
    let mut t = StreamTable::new(settings());
    t.open(id(1)).unwrap();
    t.open(id(2)).unwrap();
    let mut out = Vec::new();
    t.on_frame(
        Message::Close {
            connection_id: id(1),
            kind: CloseKind::Eof,
        },
        &mut out,
    );
    t.on_frame(
        Message::data(id(1), Bytes::from_static(b"late")).unwrap(),
        &mut out,
    );
    assert!(!t.contains(id(1)));
    t.on_frame(
        Message::window(id(2), crate::protocol::MAX_WINDOW).unwrap(),
        &mut out,
    );
    assert!(!t.contains(id(2)));
    assert!(out.contains(&StreamAction::Reset {
        id: id(2),
        reason: "peer's window increment overflowed"
    }));
}

#[test]
fn limits_and_local_misuse_are_errors() {
    let mut t = StreamTable::new(settings());
    for n in 0..4 {
        t.open(id(n)).unwrap();
    }
    assert_eq!(t.open(id(9)), Err(StreamError::TooMany { max: 4 }));
    assert_eq!(t.open(id(0)), Err(StreamError::TooMany { max: 4 }));
    t.refused(id(3));
    assert_eq!(t.open(id(0)), Err(StreamError::Duplicate(id(0))));
    let big = Bytes::from(vec![0; 64 * 1024 + 1]);
    assert!(matches!(
        t.send_data(id(0), big),
        Err(StreamError::Refused { .. })
    ));
    assert!(matches!(
        t.send_data(id(7), Bytes::new()),
        Err(StreamError::Unknown(_))
    ));
    t.local_eof(id(0)).unwrap();
    assert!(t.local_eof(id(0)).is_none());
    assert!(t.send_data(id(0), Bytes::from_static(b"x")).is_err());
    assert_eq!(
        t.local_reset(id(1)),
        Some(Message::Close {
            connection_id: id(1),
            kind: CloseKind::Abort
        })
    );
    let mut left = t.drain();
    left.sort();
    assert_eq!(left, vec![id(0), id(2)]);
}

#[test]
fn relayed_streams_start_without_credit_and_grant_their_window() {
    let mut table = StreamTable::new(StreamSettings {
        max_streams: 4,
        recv_initial: 1000,
        recv_max: 1000,
        send_initial: 5000,
        budget: 0,
    });
    let id = Uuid::from_u128(7);
    let grant = table.open_relayed(id).unwrap();
    assert_eq!(
        grant,
        Message::Window {
            connection_id: id,
            increment: 1000
        }
    );
    assert_eq!(
        table.send_credit(id),
        0,
        "nothing may be sent before the peer's Window"
    );
    assert!(table.spend(id, 1).is_err());
    let mut out = Vec::new();
    table.on_frame(
        Message::Window {
            connection_id: id,
            increment: 300,
        },
        &mut out,
    );
    assert_eq!(table.send_credit(id), 300);
    // what we granted is what the peer may send
    table.on_frame(
        Message::data(id, Bytes::from(vec![0; 1000])).unwrap(),
        &mut out,
    );
    assert!(matches!(out.last(), Some(StreamAction::Deliver { .. })));
}
