//! The codec against the golden vectors: `tests/data/protocol-vectors.json`
//! (made by the original crate's own encoder; a byte-for-byte copy of
//! `../shared/protocol-vectors.json`, which `.ci/run` compares it with when
//! present) and `tests/data/extension-vectors.json` (our data-plane extension,
//! same schema). Read at test time, so the files stay the single source of
//! truth; every group's count is asserted so that a renamed key cannot leave
//! a loop empty.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use serde_json::{Value, json};
use uuid::Uuid;
use zlayer_tunnel::MAX_MESSAGE_SIZE;
use zlayer_tunnel::protocol::{
    BuildError, Capabilities, CloseKind, DecodeError, Features, Message, MessageType,
    ServiceProtocol,
};

const SEED_VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/protocol-vectors.json"
);
const EXT_VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/extension-vectors.json"
);

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn group<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc[key].as_array().map_or(&[], Vec::as_slice)
}

fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex {hex}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn tohex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A string field: either text or `{ "repeat": s, "count": n }`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o["repeat"]
            .as_str()
            .unwrap()
            .repeat(o["count"].as_u64().unwrap() as usize),
        other => panic!("not a string field: {other}"),
    }
}

fn uuid(v: &Value) -> Uuid {
    Uuid::parse_str(v.as_str().unwrap()).unwrap()
}

fn port(v: &Value) -> u16 {
    v.as_u64().unwrap().try_into().unwrap()
}

fn caps(f: &Value) -> Option<Capabilities> {
    f.get("capabilities").map(|c| Capabilities {
        features: Features::from_bits(c["features"].as_u64().unwrap() as u32),
        initial_window: c["initial_window"].as_u64().unwrap() as u32,
    })
}

fn protocol(v: &Value) -> ServiceProtocol {
    match v.as_str().unwrap() {
        "tcp" => ServiceProtocol::Tcp,
        "udp" => ServiceProtocol::Udp,
        other => panic!("protocol {other}"),
    }
}

/// Builds the message a vector's fields describe; it must be buildable.
fn message_from(f: &Value) -> Message {
    build(f).unwrap_or_else(|e| panic!("{} cannot be built: {e}", f["type"]))
}

/// Builds the message a vector's fields describe, through the checked constructors.
fn build(f: &Value) -> Result<Message, BuildError> {
    match f["type"].as_str().unwrap() {
        "Auth" => Message::auth(text(&f["token"]), uuid(&f["client_id"]), caps(f)),
        "AuthOk" => Ok(Message::AuthOk {
            tunnel_id: uuid(&f["tunnel_id"]),
            capabilities: caps(f),
        }),
        "AuthFail" => Message::auth_fail(text(&f["reason"])),
        "Register" => Message::register(
            text(&f["name"]),
            protocol(&f["protocol"]),
            port(&f["local_port"]),
            port(&f["remote_port"]),
        ),
        "RegisterOk" => Ok(Message::RegisterOk {
            service_id: uuid(&f["service_id"]),
            port: f.get("port").map(port),
        }),
        "RegisterFail" => Message::register_fail(text(&f["reason"])),
        "Connect" => Message::connect(
            uuid(&f["service_id"]),
            uuid(&f["connection_id"]),
            text(&f["client_addr"]),
        ),
        "ConnectAck" => Ok(Message::ConnectAck {
            connection_id: uuid(&f["connection_id"]),
        }),
        "ConnectFail" => Message::connect_fail(uuid(&f["connection_id"]), text(&f["reason"])),
        "Heartbeat" => Ok(Message::Heartbeat {
            timestamp: f["timestamp"].as_u64().unwrap(),
        }),
        "HeartbeatAck" => Ok(Message::HeartbeatAck {
            timestamp: f["timestamp"].as_u64().unwrap(),
        }),
        "Unregister" => Ok(Message::Unregister {
            service_id: uuid(&f["service_id"]),
        }),
        "Disconnect" => Message::disconnect(text(&f["reason"])),
        "Data" => Message::data(
            uuid(&f["connection_id"]),
            Bytes::from(unhex(&text(&f["data_hex"]))),
        ),
        "Datagram" => Message::datagram(
            uuid(&f["connection_id"]),
            Bytes::from(unhex(&text(&f["data_hex"]))),
        ),
        "Close" => Ok(Message::Close {
            connection_id: uuid(&f["connection_id"]),
            kind: match f["kind"].as_str().unwrap() {
                "eof" => CloseKind::Eof,
                "abort" => CloseKind::Abort,
                other => panic!("kind {other}"),
            },
        }),
        "Window" => Message::window(
            uuid(&f["connection_id"]),
            f["increment"].as_u64().unwrap() as u32,
        ),
        "Open" => Message::open(
            uuid(&f["connection_id"]),
            text(&f["service"]),
            text(&f["target"]),
        ),
        "Health" => Ok(Message::health(
            uuid(&f["service_id"]),
            f["healthy"].as_bool().unwrap(),
        )),
        other => panic!("unknown type {other}"),
    }
}

/// The seed's fields of a message, as the vectors write them (extension fields left out).
fn seed_fields(m: &Message) -> Value {
    match m {
        Message::Auth {
            token, client_id, ..
        } => {
            json!({"type": "Auth", "token": token.expose(), "client_id": client_id.to_string()})
        }
        Message::AuthOk { tunnel_id, .. } => {
            json!({"type": "AuthOk", "tunnel_id": tunnel_id.to_string()})
        }
        Message::AuthFail { reason, .. } => json!({"type": "AuthFail", "reason": reason}),
        Message::Register {
            name,
            protocol,
            local_port,
            remote_port,
            ..
        } => json!({
            "type": "Register", "name": name, "protocol": protocol.to_string(),
            "local_port": local_port, "remote_port": remote_port
        }),
        Message::RegisterOk { service_id, .. } => {
            json!({"type": "RegisterOk", "service_id": service_id.to_string()})
        }
        Message::RegisterFail { reason, .. } => json!({"type": "RegisterFail", "reason": reason}),
        Message::Connect {
            service_id,
            connection_id,
            client_addr,
            ..
        } => json!({
            "type": "Connect", "service_id": service_id.to_string(),
            "connection_id": connection_id.to_string(), "client_addr": client_addr
        }),
        Message::ConnectAck { connection_id } => {
            json!({"type": "ConnectAck", "connection_id": connection_id.to_string()})
        }
        Message::ConnectFail {
            connection_id,
            reason,
            ..
        } => json!({
            "type": "ConnectFail", "connection_id": connection_id.to_string(), "reason": reason
        }),
        Message::Heartbeat { timestamp } => json!({"type": "Heartbeat", "timestamp": timestamp}),
        Message::HeartbeatAck { timestamp } => {
            json!({"type": "HeartbeatAck", "timestamp": timestamp})
        }
        Message::Unregister { service_id } => {
            json!({"type": "Unregister", "service_id": service_id.to_string()})
        }
        Message::Disconnect { reason, .. } => json!({"type": "Disconnect", "reason": reason}),
        other => panic!("not a seed message: {other:?}"),
    }
}

/// The error class a vector's `why` names.
fn matches_why(err: &DecodeError, why: &str) -> bool {
    match err {
        DecodeError::Truncated { need, .. } if why == "truncated header" => *need == 5,
        DecodeError::Truncated { .. } => why.starts_with("incomplete frame"),
        DecodeError::TooLarge { .. } => why.starts_with("declared payload length"),
        DecodeError::UnknownType(_) => why == "unknown message type",
        DecodeError::Malformed { .. } => {
            why == "payload too short for its type"
                || why == "string length exceeds declared payload"
        }
        DecodeError::BadUtf8 { .. } => why == "invalid UTF-8 in a string field",
        DecodeError::BadValue { field, .. } => why.starts_with(&format!("{field} ")),
    }
}

struct Counts {
    valid: usize,
    boundary: usize,
    invalid: usize,
    lenient: usize,
    hashes: usize,
}

fn check_valid(doc: &Value) -> usize {
    let vectors = group(doc, "valid");
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let bytes = unhex(v["hex"].as_str().unwrap());
        let expected = message_from(&v["fields"]);
        assert_eq!(
            tohex(&expected.encode()),
            v["hex"].as_str().unwrap(),
            "encode {name}"
        );
        assert_eq!(expected.encoded_len(), bytes.len(), "encoded_len {name}");
        let (decoded, used) =
            Message::decode(&bytes).unwrap_or_else(|e| panic!("decode {name}: {e}"));
        assert_eq!(decoded, expected, "decode {name}");
        assert_eq!(used, bytes.len(), "consumed {name}");
        let (zero_copy, _) = Message::decode_bytes(&Bytes::from(bytes)).unwrap();
        assert_eq!(zero_copy, expected, "decode_bytes {name}");
    }
    vectors.len()
}

fn check_invalid(doc: &Value) -> usize {
    let vectors = group(doc, "invalid");
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let why = v["why"].as_str().unwrap();
        let err = Message::decode(&unhex(v["hex"].as_str().unwrap()))
            .map(|(m, _)| m)
            .expect_err(name);
        assert!(matches_why(&err, why), "{name}: got {err:?} for {why:?}");
    }
    vectors.len()
}

/// Seed vectors compare the original's fields; extension vectors the whole message.
fn check_lenient(doc: &Value, whole_message: bool) -> usize {
    let vectors = group(doc, "lenient");
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let (decoded, used) = Message::decode(&unhex(v["hex"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("decode {name}: {e}"));
        if whole_message {
            assert_eq!(decoded, message_from(&v["decodes_to"]), "message {name}");
        } else {
            assert_eq!(seed_fields(&decoded), v["decodes_to"], "fields {name}");
        }
        assert_eq!(
            used as u64,
            v["consumed"].as_u64().unwrap(),
            "consumed {name}"
        );
    }
    vectors.len()
}

fn check_boundary(doc: &Value) -> usize {
    let vectors = group(doc, "boundary");
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let fill = v["fill_hex"]
            .as_str()
            .unwrap()
            .repeat(v["fill_count"].as_u64().unwrap() as usize);
        let hex = format!(
            "{}{fill}{}",
            v["hex_head"].as_str().unwrap(),
            v["hex_tail"].as_str().unwrap()
        );
        let bytes = unhex(&hex);
        assert_eq!(
            bytes.len() as u64,
            v["frame_len"].as_u64().unwrap(),
            "frame_len {name}"
        );
        match v["decode"].as_str().unwrap() {
            "ok" => {
                let (decoded, used) =
                    Message::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(used, bytes.len(), "{name}");
                let expected = message_from(&v["fields"]);
                assert_eq!(decoded, expected, "{name}");
                assert_eq!(expected.encode(), bytes, "encode {name}");
            }
            "error" => {
                let err = Message::decode(&bytes).map(|(m, _)| m).expect_err(name);
                let why = v["why"].as_str().unwrap();
                if bytes.len() > MAX_MESSAGE_SIZE {
                    assert!(
                        matches!(err, DecodeError::TooLarge { .. }),
                        "{name}: {err:?}"
                    );
                } else {
                    assert!(matches_why(&err, why), "{name}: got {err:?} for {why:?}");
                }
                // and the same content cannot even be built: refused where it is built
                assert_eq!(
                    build(&v["fields"]).map(|m| m.message_type()),
                    Err(refusal(&v["fields"], &bytes)),
                    "{name}"
                );
            }
            other => panic!("{name}: decode {other}"),
        }
    }
    vectors.len()
}

/// The error a checked constructor gives for a refused boundary vector: too
/// large past `MAX_MESSAGE_SIZE`, else the out-of-range field.
fn refusal(fields: &Value, frame: &[u8]) -> BuildError {
    if frame.len() > MAX_MESSAGE_SIZE {
        return BuildError::TooLarge {
            kind: MessageType::try_from(frame[0]).unwrap(),
            len: frame.len(),
        };
    }
    match fields["type"].as_str().unwrap() {
        "Window" => BuildError::BadIncrement(fields["increment"].as_u64().unwrap() as u32),
        other => panic!("no refusal within the size limit is known for {other}"),
    }
}

fn check_hashes(doc: &Value) -> usize {
    let vectors = group(doc, "token_hashes");
    for v in vectors {
        assert_eq!(
            zlayer_tunnel::hash_token(v["token"].as_str().unwrap()),
            v["sha256_hex"].as_str().unwrap()
        );
    }
    vectors.len()
}

fn check_all(doc: &Value, whole_message: bool) -> Counts {
    Counts {
        valid: check_valid(doc),
        boundary: check_boundary(doc),
        invalid: check_invalid(doc),
        lenient: check_lenient(doc, whole_message),
        hashes: check_hashes(doc),
    }
}

#[test]
fn seed_vectors_agree_with_the_original() {
    let doc = load(SEED_VECTORS);
    let n = check_all(&doc, false);
    assert_eq!(
        (n.valid, n.boundary, n.invalid, n.lenient, n.hashes),
        (42, 4, 67, 15, 5),
        "vector counts changed: update this assertion together with the file"
    );
    let c = &doc["constants"];
    assert_eq!(c["HEADER_SIZE"], zlayer_tunnel::HEADER_SIZE);
    assert_eq!(c["MAX_MESSAGE_SIZE"], MAX_MESSAGE_SIZE);
    assert_eq!(c["PROTOCOL_VERSION"], zlayer_tunnel::PROTOCOL_VERSION);
    assert_eq!(c["max_payload"], zlayer_tunnel::protocol::MAX_PAYLOAD_SIZE);
}

#[test]
fn seed_message_type_codes() {
    let doc = load(SEED_VECTORS);
    let types = doc["message_types"].as_object().unwrap();
    assert_eq!(types.len(), 13);
    for (name, code) in types {
        let ty = MessageType::try_from(code.as_u64().unwrap() as u8).unwrap();
        assert_eq!(&format!("{ty:?}"), name);
    }
}

#[test]
fn extension_vectors() {
    let doc = load(EXT_VECTORS);
    let n = check_all(&doc, true);
    assert_eq!(
        (n.valid, n.boundary, n.invalid, n.lenient, n.hashes),
        (17, 6, 14, 5, 0),
        "extension vector counts changed: update this assertion together with the file"
    );
}

#[test]
fn the_original_encoder_quirk_is_refused_where_built() {
    // the original casts a 256-byte name's length to u8 and emits a corrupt frame
    let err = Message::register("n".repeat(256), ServiceProtocol::Tcp, 8080, 0).unwrap_err();
    assert_eq!(err, BuildError::NameTooLong { len: 256 });
}
