//! Codec unit tests: a round trip per type, header bytes, and property tests
//! that decoding an encoding is the identity and that no input panics.

use bytes::Bytes;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

fn id(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn one_of_each() -> Vec<Message> {
    let caps = Some(Capabilities::new(Features::ALL));
    vec![
        Message::auth("tok", id(1), None).unwrap(),
        Message::auth("tok", id(1), caps).unwrap(),
        Message::AuthOk {
            tunnel_id: id(2),
            capabilities: caps,
        },
        Message::auth_fail("no").unwrap(),
        Message::register_fail("busy").unwrap(),
        Message::probe(id(9), "ssh").unwrap(),
        Message::register_refused("out of scope", RegisterRefusal::Lasting).unwrap(),
        Message::register_refused("port taken", RegisterRefusal::Later).unwrap(),
        Message::register("ssh", ServiceProtocol::Tcp, 22, 2222).unwrap(),
        Message::register_with_visitors(
            "ssh",
            ServiceProtocol::Tcp,
            (22, 0),
            (("10.0.0.0/8".into(), String::new()), 0, 0),
        )
        .unwrap(),
        Message::register_with_visitors(
            "dns",
            ServiceProtocol::Udp,
            (53, 0),
            ((String::new(), String::new()), 100, 0),
        )
        .unwrap(),
        Message::register_with_visitors(
            "web",
            ServiceProtocol::Tcp,
            (80, 0),
            ((String::new(), String::new()), 0, 1 << 20),
        )
        .unwrap(),
        Message::RegisterOk {
            service_id: id(3),
            port: Some(30000),
        },
        Message::register_fail("busy").unwrap(),
        Message::probe(id(9), "ssh").unwrap(),
        Message::connect(id(3), id(4), "127.0.0.1:5").unwrap(),
        Message::connect_to(id(3), id(4), "[::1]:5", "[::1]:30000").unwrap(),
        Message::ConnectAck {
            connection_id: id(4),
        },
        Message::connect_fail(id(4), "refused").unwrap(),
        Message::Heartbeat { timestamp: 7 },
        Message::HeartbeatAck { timestamp: 7 },
        Message::Unregister { service_id: id(3) },
        Message::disconnect("bye").unwrap(),
        Message::data(id(4), Bytes::from_static(b"abc")).unwrap(),
        Message::Close {
            connection_id: id(4),
            kind: CloseKind::Eof,
        },
        Message::window(id(4), 65536).unwrap(),
        Message::datagram(id(5), Bytes::from_static(&[0; 9000])).unwrap(),
        Message::open(id(6), "db", "10.0.0.1:5432").unwrap(),
        Message::open_forwarded(
            id(6),
            "dns",
            ServiceProtocol::Udp,
            ("192.0.2.1:53".into(), "198.51.100.1:53".into()),
        )
        .unwrap(),
        Message::health(id(3), false),
        Message::health(id(3), true),
    ]
}

#[test]
fn every_type_round_trips_with_its_header() {
    for m in one_of_each() {
        let bytes = m.encode();
        assert_eq!(bytes[0], m.message_type() as u8);
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len + HEADER_SIZE, bytes.len());
        assert_eq!(Message::decode(&bytes), Ok((m.clone(), bytes.len())));
        assert_eq!(m.to_bytes(), Bytes::from(bytes));
    }
}

#[test]
fn trailing_fields_of_the_extension_are_sent_only_when_set() {
    // an original agent's Connect, and ours to an agent that did not ask
    let plain = Message::connect(id(3), id(4), "127.0.0.1:5")
        .unwrap()
        .encode();
    let to = Message::connect_to(id(3), id(4), "127.0.0.1:5", "")
        .unwrap()
        .encode();
    assert_eq!(plain, to);
    let with = Message::connect_to(id(3), id(4), "127.0.0.1:5", "127.0.0.1:30000").unwrap();
    assert_eq!(
        with.encode().len(),
        plain.len() + 2 + "127.0.0.1:30000".len()
    );
    // an Open of a stream is the original 0x54 layout; a forwarded flow adds
    // its protocol and addresses
    let stream = Message::open(id(6), "dns", "x").unwrap().encode();
    let visitor = ("1.2.3.4:5".to_owned(), "6.7.8.9:10".to_owned());
    let flow = Message::open_forwarded(id(6), "dns", ServiceProtocol::Udp, visitor).unwrap();
    let flow = flow.encode();
    // the flow's target is the visitor; then its protocol and both addresses
    let target_grows = "1.2.3.4:5".len() - "x".len();
    let added = 1 + 2 + "1.2.3.4:5".len() + 2 + "6.7.8.9:10".len();
    assert_eq!(flow.len(), stream.len() + target_grows + added);
}

#[test]
fn every_truncation_is_an_error() {
    for m in one_of_each() {
        let bytes = m.encode();
        for cut in 0..bytes.len() {
            assert!(
                Message::decode(&bytes[..cut]).is_err(),
                "{m:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn extension_types_need_their_feature() {
    assert_eq!(MessageType::Data.required_feature(), Features::STREAMS);
    assert_eq!(
        MessageType::Datagram.required_feature(),
        Features::DATAGRAMS
    );
    assert_eq!(MessageType::Open.required_feature(), Features::ACCESS);
    assert_eq!(MessageType::Health.required_feature(), Features::HEALTH);
    assert!(MessageType::Connect.required_feature().is_empty());
}

#[test]
fn a_health_report_is_a_service_id_and_one_byte_of_zero_or_one() {
    let frame = Message::health(id(3), true).encode();
    assert_eq!(frame[0], 0x55);
    assert_eq!(&frame[5..21], id(3).as_bytes());
    assert_eq!(frame[21], 1);
    let mut bad = frame.clone();
    bad[21] = 2;
    assert!(Message::decode(&bad).is_err(), "only 0 and 1");
}

#[test]
fn oversized_content_is_refused_where_built() {
    let max = Bytes::from(vec![0; MAX_DATA_PAYLOAD]);
    let frame = Message::data(id(1), max.clone()).unwrap().encode();
    assert_eq!(frame.len(), MAX_MESSAGE_SIZE);
    let over = Bytes::from(vec![0; MAX_DATA_PAYLOAD + 1]);
    assert!(matches!(
        Message::data(id(1), over.clone()),
        Err(BuildError::TooLarge { .. })
    ));
    assert!(Message::datagram(id(1), over).is_err());
    assert!(Message::connect(id(1), id(2), "a".repeat(65535)).is_err());
    assert!(Message::open(id(1), "s".repeat(256), "").is_err());
    assert_eq!(Message::window(id(1), 0), Err(BuildError::BadIncrement(0)));
}

#[test]
fn a_data_frame_header_and_its_payload_are_the_data_frame() {
    for len in [0, 1, 1000, MAX_DATA_PAYLOAD] {
        let payload = vec![0xa5; len];
        let mut frame = Message::data_frame_header(id(7), len).unwrap().to_vec();
        frame.extend_from_slice(&payload);
        assert_eq!(frame, Message::data_frame(id(7), &payload).unwrap());
    }
    assert!(Message::data_frame_header(id(7), MAX_DATA_PAYLOAD + 1).is_none());
}

#[test]
fn debug_masks_the_token() {
    let m = Message::auth("super-secret", id(1), None).unwrap();
    assert!(!format!("{m:?}").contains("super-secret"));
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect())
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn caps() -> impl Strategy<Value = Option<Capabilities>> {
    proptest::option::of(
        (any::<u32>(), 0..=MAX_WINDOW).prop_map(|(f, w)| Capabilities {
            features: Features::from_bits(f),
            initial_window: w,
        }),
    )
}

fn data() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
}

fn protocol() -> impl Strategy<Value = ServiceProtocol> {
    prop_oneof![Just(ServiceProtocol::Tcp), Just(ServiceProtocol::Udp)]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (text(64), uuid(), caps()).prop_map(|(t, c, x)| Message::auth(t, c, x).unwrap()),
        (uuid(), caps()).prop_map(|(t, c)| Message::AuthOk {
            tunnel_id: t,
            capabilities: c
        }),
        text(64).prop_map(|r| Message::auth_fail(r).unwrap()),
        (text(60), protocol(), any::<u16>(), any::<u16>())
            .prop_map(|(n, p, l, r)| Message::register(n, p, l, r).unwrap()),
        (uuid(), any::<Option<u16>>()).prop_map(|(s, p)| Message::RegisterOk {
            service_id: s,
            port: p
        }),
        text(64).prop_map(|r| Message::register_fail(r).unwrap()),
        (uuid(), uuid(), text(64)).prop_map(|(s, c, a)| Message::connect(s, c, a).unwrap()),
        uuid().prop_map(|c| Message::ConnectAck { connection_id: c }),
        (uuid(), text(64)).prop_map(|(c, r)| Message::connect_fail(c, r).unwrap()),
        any::<u64>().prop_map(|t| Message::Heartbeat { timestamp: t }),
        any::<u64>().prop_map(|t| Message::HeartbeatAck { timestamp: t }),
        uuid().prop_map(|s| Message::Unregister { service_id: s }),
        text(64).prop_map(|r| Message::disconnect(r).unwrap()),
        (uuid(), data()).prop_map(|(c, d)| Message::data(c, d).unwrap()),
        (uuid(), any::<bool>()).prop_map(|(c, eof)| Message::Close {
            connection_id: c,
            kind: if eof {
                CloseKind::Eof
            } else {
                CloseKind::Abort
            },
        }),
        (uuid(), 1..=MAX_WINDOW).prop_map(|(c, i)| Message::window(c, i).unwrap()),
        (uuid(), data()).prop_map(|(c, d)| Message::datagram(c, d).unwrap()),
        (uuid(), text(60), text(64)).prop_map(|(c, s, t)| Message::open(c, s, t).unwrap()),
        (uuid(), any::<bool>()).prop_map(|(s, h)| Message::health(s, h)),
    ]
}

proptest! {
    #[test]
    fn decode_of_encode_is_identity(m in message()) {
        let bytes = m.encode();
        prop_assert_eq!(bytes.len(), m.encoded_len());
        prop_assert_eq!(Message::decode(&bytes), Ok((m.clone(), bytes.len())));
        prop_assert_eq!(Message::decode_bytes(&Bytes::from(bytes)).map(|(d, _)| d), Ok(m));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((m, used)) = Message::decode(&bytes) {
            prop_assert!(used <= bytes.len());
            prop_assert_eq!(m.message_type() as u8, bytes[0]);
            // whatever decodes re-encodes, no longer than it came, to the same message
            prop_assert!(m.encoded_len() <= used);
            prop_assert_eq!(Message::decode(&m.encode()), Ok((m.clone(), m.encoded_len())));
        }
    }

    #[test]
    fn mutated_frames_never_panic(m in message(), pos in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = m.encode();
        let i = pos % bytes.len();
        bytes[i] = byte;
        if let Ok((d, used)) = Message::decode(&bytes) {
            prop_assert!(d.encoded_len() <= used);
            prop_assert_eq!(Message::decode(&d.encode()).map(|(x, _)| x), Ok(d));
        }
    }

    #[test]
    fn a_full_auth_frame_with_a_short_block_re_encodes(extra in 0usize..12) {
        // the tightest case: a maximal Auth whose extension block is 5 bytes
        let token = "a".repeat(65531 - 2 - 16 - 5 - extra);
        let mut bytes = Message::auth(token, Uuid::nil(), None).unwrap().encode();
        bytes.extend_from_slice(&[1, 0, 0, 0, 3]);
        let len = (bytes.len() - HEADER_SIZE) as u32;
        bytes[1..5].copy_from_slice(&len.to_be_bytes());
        let (m, _) = Message::decode(&bytes).unwrap();
        prop_assert_eq!(m.encode(), bytes);
    }
}
