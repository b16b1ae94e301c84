//! The connection table, alone and as a pair of tunnel sides driven in memory.

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

fn frames(out: &[ConnectionAction]) -> Vec<Message> {
    out.iter()
        .filter_map(|a| match a {
            ConnectionAction::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// One side of a tunnel with a pretend socket on each stream.
struct Side {
    table: ConnectionTable,
    written: Vec<u8>,
    shut: bool,
    reset: bool,
}

impl Side {
    fn new() -> Self {
        Self {
            table: ConnectionTable::new(settings()),
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
                ConnectionAction::Deliver { id, data } => {
                    self.written.extend_from_slice(&data);
                    if !stalled {
                        replies.extend(self.table.on_delivered(id, data.len()));
                    }
                }
                ConnectionAction::ShutdownWrite { .. } => self.shut = true,
                ConnectionAction::Reset { .. } => self.reset = true,
                ConnectionAction::Send(m) => replies.push(m),
                _ => {}
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
    let mut t = ConnectionTable::new(settings());
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
    let mut t = ConnectionTable::new(settings());
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
    assert!(out.contains(&ConnectionAction::Reset {
        id: id(2),
        reason: "peer's window increment overflowed"
    }));
}

#[test]
fn limits_and_local_misuse_are_errors() {
    let mut t = ConnectionTable::new(settings());
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
    left.sort_by_key(|(id, _)| *id);
    let streams = vec![
        (id(0), ConnectionKind::Stream),
        (id(2), ConnectionKind::Stream),
    ];
    assert_eq!(left, streams);
}

#[test]
fn relayed_streams_start_without_credit_and_grant_their_window() {
    let mut table = ConnectionTable::new(StreamSettings {
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
    assert!(matches!(out.last(), Some(ConnectionAction::Deliver { .. })));
}

#[test]
fn one_id_space_one_dispatch_for_streams_flows_and_relays() {
    let mut t = ConnectionTable::new(settings());
    let (stream, flow, relay) = (id(1), id(2), id(3));
    t.open(stream).unwrap();
    t.open_flow(flow).unwrap();
    t.open_relay(relay).unwrap();
    // an id is one connection, whatever its kind
    assert_eq!(t.open_flow(stream), Err(StreamError::Duplicate(stream)));
    assert_eq!(t.open(relay), Err(StreamError::Duplicate(relay)));
    assert_eq!((t.len(), t.connections()), (1, 3));
    let mut out = Vec::new();
    let datagram = Message::Datagram {
        connection_id: flow,
        data: Bytes::from_static(b"dns"),
    };
    t.on_frame(datagram, &mut out);
    assert_eq!(
        out.pop(),
        Some(ConnectionAction::Datagram {
            id: flow,
            data: Bytes::from_static(b"dns")
        })
    );
    let data = Message::data(relay, Bytes::from_static(b"x")).unwrap();
    t.on_frame(data, &mut out);
    assert_eq!(
        out.pop(),
        Some(ConnectionAction::Relay {
            id: relay,
            last: false
        })
    );
    // the peer closes the flow; a datagram after it is a counted drop
    let close = Message::Close {
        connection_id: flow,
        kind: CloseKind::Abort,
    };
    t.on_frame(close, &mut out);
    assert_eq!(out.pop(), Some(ConnectionAction::ForgetFlow { id: flow }));
    let late = Message::Datagram {
        connection_id: flow,
        data: Bytes::new(),
    };
    t.on_frame(late, &mut out);
    assert_eq!(out.pop(), Some(ConnectionAction::DatagramDropped));
    // a flow that ends on its own tells the peer with an abort, once
    t.open_flow(id(4)).unwrap();
    assert!(t.local_reset(id(4)).is_some());
    assert!(t.local_reset(id(4)).is_none());
    // a refused stream is reset
    let refused = Message::connect_fail(stream, "down").unwrap();
    t.on_frame(refused, &mut out);
    assert!(matches!(out.pop(), Some(ConnectionAction::Reset { id, .. }) if id == stream));
    assert_eq!(t.connections(), 1, "only the relay is left");
}

#[test]
fn a_relay_is_over_at_an_abort_a_refusal_or_eof_both_ways() {
    let mut t = ConnectionTable::new(settings());
    let eof = |n| Message::Close {
        connection_id: id(n),
        kind: CloseKind::Eof,
    };
    t.open_relay(id(1)).unwrap();
    let mut out = Vec::new();
    t.on_frame(eof(1), &mut out);
    assert_eq!(
        out.pop(),
        Some(ConnectionAction::Relay {
            id: id(1),
            last: false
        })
    );
    // the other end's eof, arriving from its channel, ends it
    let last = t.relay_from_other(id(1), MessageType::Close, Some(CloseKind::Eof));
    assert_eq!(last, Some(true));
    assert!(t.is_empty());
    assert_eq!(t.relay_from_other(id(1), MessageType::Data, None), None);
    t.open_relay(id(2)).unwrap();
    t.on_frame(Message::connect_fail(id(2), "no").unwrap(), &mut out);
    assert_eq!(
        out.pop(),
        Some(ConnectionAction::Relay {
            id: id(2),
            last: true
        })
    );
    t.open_relay(id(3)).unwrap();
    assert_eq!(
        t.relay_from_other(id(3), MessageType::Close, Some(CloseKind::Abort)),
        Some(true)
    );
    assert!(t.is_empty());
}

mod interleavings {
    use proptest::prelude::*;

    use super::*;

    /// One step of two sides moving streams both ways.
    #[derive(Debug, Clone)]
    enum Step {
        /// Side `a` (true) or `b` reads up to `n` bytes of stream `s` and sends them.
        Send { a: bool, s: u8, n: usize },
        /// The frames in flight toward side `a` (true) or `b` arrive.
        Arrive { a: bool },
        /// Side `a` (true) or `b` writes what it holds of stream `s` to its socket.
        Drain { a: bool, s: u8 },
        /// Side `a` (true) or `b` ends its sending half of stream `s`.
        Eof { a: bool, s: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (any::<bool>(), 0..3u8, 1..40_000usize).prop_map(|(a, s, n)| Step::Send { a, s, n }),
            any::<bool>().prop_map(|a| Step::Arrive { a }),
            (any::<bool>(), 0..3u8).prop_map(|(a, s)| Step::Drain { a, s }),
            (any::<bool>(), 0..3u8).prop_map(|(a, s)| Step::Eof { a, s }),
        ]
    }

    /// One side: its table, what each stream has to send, what it received
    /// and has not written yet, what it wrote.
    struct End {
        table: ConnectionTable,
        to_send: Vec<Vec<u8>>,
        held: Vec<Vec<u8>>,
        written: Vec<Vec<u8>>,
        eof_sent: Vec<bool>,
        inbox: Vec<Message>,
    }

    impl End {
        fn new(seed: u8) -> Self {
            let mut table = ConnectionTable::new(settings());
            let mut to_send = Vec::new();
            for s in 0..3u8 {
                table.open(id(s)).unwrap();
                let len = 50_000 + usize::from(s) * 70_000 + usize::from(seed) * 13;
                to_send.push((0..len).map(|i| (i as u8) ^ s ^ seed).collect());
            }
            Self {
                table,
                to_send,
                held: vec![Vec::new(); 3],
                written: vec![Vec::new(); 3],
                eof_sent: vec![false; 3],
                inbox: Vec::new(),
            }
        }

        /// Frames for the peer.
        fn send(&mut self, s: u8, n: usize) -> Vec<Message> {
            let i = usize::from(s);
            let credit = self.table.send_credit(id(s)) as usize;
            let n = n.min(credit).min(self.to_send[i].len()).min(16 * 1024);
            if n == 0 || self.eof_sent[i] {
                return Vec::new();
            }
            let chunk: Vec<u8> = self.to_send[i].drain(..n).collect();
            vec![self.table.send_data(id(s), Bytes::from(chunk)).unwrap()]
        }

        /// Frames arrive; delivered bytes are held until drained.
        fn arrive(&mut self) -> Vec<Message> {
            let mut out = Vec::new();
            for frame in std::mem::take(&mut self.inbox) {
                self.table.on_frame(frame, &mut out);
            }
            let mut replies = Vec::new();
            for action in out {
                match action {
                    ConnectionAction::Deliver { id, data } => {
                        self.held[usize::from(id.as_bytes()[0])].extend_from_slice(&data);
                    }
                    ConnectionAction::Reset { reason, .. } => {
                        panic!("a stream was reset: {reason}")
                    }
                    ConnectionAction::Send(m) => replies.push(m),
                    _ => {}
                }
            }
            replies
        }

        fn drain(&mut self, s: u8) -> Vec<Message> {
            let i = usize::from(s);
            let held = std::mem::take(&mut self.held[i]);
            self.written[i].extend_from_slice(&held);
            self.table
                .on_delivered(id(s), held.len())
                .into_iter()
                .collect()
        }

        fn eof(&mut self, s: u8) -> Vec<Message> {
            let i = usize::from(s);
            if !self.to_send[i].is_empty() || self.eof_sent[i] {
                return Vec::new();
            }
            self.eof_sent[i] = true;
            self.table.local_eof(id(s)).into_iter().collect()
        }
    }

    proptest! {
        /// Whatever the interleaving of sends, arrivals, socket writes and
        /// half-closes on two sides: no window is ever exceeded (a reset
        /// would panic), every byte arrives in order, and once both sides
        /// have sent and received everything and closed, no entry is left
        /// and the growth budget is whole again.
        #[test]
        fn every_byte_in_order_no_window_exceeded_no_entry_leaked(
            steps in prop::collection::vec(step(), 0..400)
        ) {
            let (mut a, mut b) = (End::new(1), End::new(2));
            let (data_a, data_b) = (a.to_send.clone(), b.to_send.clone());
            let run = |step: Step, a: &mut End, b: &mut End| {
                let (me, peer) = match step {
                    Step::Send { a: true, .. } | Step::Arrive { a: true } |
                    Step::Drain { a: true, .. } | Step::Eof { a: true, .. } => (a, b),
                    _ => (b, a),
                };
                let frames = match step {
                    Step::Send { s, n, .. } => me.send(s, n),
                    Step::Arrive { .. } => me.arrive(),
                    Step::Drain { s, .. } => me.drain(s),
                    Step::Eof { s, .. } => me.eof(s),
                };
                peer.inbox.extend(frames);
            };
            for step in steps {
                run(step, &mut a, &mut b);
            }
            // then everything finishes
            for _ in 0..10_000 {
                for s in 0..3 {
                    for side in [true, false] {
                        run(Step::Send { a: side, s, n: 16 * 1024 }, &mut a, &mut b);
                        run(Step::Arrive { a: !side }, &mut a, &mut b);
                        run(Step::Drain { a: !side, s }, &mut a, &mut b);
                        run(Step::Arrive { a: side }, &mut a, &mut b);
                        run(Step::Eof { a: side, s }, &mut a, &mut b);
                    }
                }
                if a.table.is_empty() && b.table.is_empty() {
                    break;
                }
            }
            prop_assert_eq!(&b.written, &data_a);
            prop_assert_eq!(&a.written, &data_b);
            prop_assert!(a.table.is_empty() && b.table.is_empty(), "entries leaked");
            prop_assert_eq!(a.table.budget_available(), settings().budget);
            prop_assert_eq!(b.table.budget_available(), settings().budget);
        }
    }
}
