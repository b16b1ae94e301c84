//! Message <-> bytes: `type(1) | len(4, BE) | payload`, lengths checked before allocation.

use bytes::{BufMut, Bytes, BytesMut};
use uuid::Uuid;

use super::message::UUID_LEN;
use super::{
    AuthRefusal, Capabilities, CloseKind, DEFAULT_INITIAL_WINDOW, EXT_VERSION, Features,
    HEADER_SIZE, MAX_MESSAGE_SIZE, MAX_WINDOW, Message, MessageType, RegisterRefusal,
    ServiceProtocol,
};
use crate::auth::Secret;

/// Largest payload a frame may declare.
pub const MAX_PAYLOAD_SIZE: usize = MAX_MESSAGE_SIZE - HEADER_SIZE;

/// The extension block after `Auth` / `AuthOk`: version and features, then the
/// initial window, left out when it is the default (so that re-encoding a
/// decoded message never makes it longer).
fn ext_len(caps: &Option<Capabilities>) -> usize {
    match caps {
        None => 0,
        Some(c) if c.initial_window == DEFAULT_INITIAL_WINDOW => 1 + 4,
        Some(_) => 1 + 4 + 4,
    }
}

/// Why bytes from a peer are not a message. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the declared frame.
    #[error("truncated frame: have {have} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes the header or frame requires.
        need: usize,
    },
    /// The declared payload length is over the limit (checked before reading it).
    #[error("payload too large: {len} bytes, max {MAX_PAYLOAD_SIZE}")]
    TooLarge {
        /// The declared length.
        len: u32,
    },
    /// The type byte names no message.
    #[error("unknown message type: {0:#04x}")]
    UnknownType(u8),
    /// The payload ends before a field of its type.
    #[error("{kind:?}: payload too short for {field}")]
    Malformed {
        /// The message type.
        kind: MessageType,
        /// The field that did not fit.
        field: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("{kind:?}: invalid UTF-8 in {field}")]
    BadUtf8 {
        /// The message type.
        kind: MessageType,
        /// The field.
        field: &'static str,
    },
    /// A field holds a value outside its domain.
    #[error("{kind:?}: invalid {field} value {value}")]
    BadValue {
        /// The message type.
        kind: MessageType,
        /// The field.
        field: &'static str,
        /// The value found.
        value: u32,
    },
}

impl Message {
    /// Length of the encoded frame, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_SIZE + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::Auth {
                token,
                capabilities,
                ..
            } => 2 + token.expose().len() + UUID_LEN + ext_len(capabilities),
            Self::AuthOk { capabilities, .. } => UUID_LEN + ext_len(capabilities),
            Self::AuthFail { reason, refusal } => 2 + reason.len() + usize::from(refusal.is_some()),
            Self::RegisterFail { reason, refusal } => {
                2 + reason.len() + usize::from(refusal.is_some())
            }
            Self::Disconnect { reason } => 2 + reason.len(),
            Self::Register {
                name,
                visitors,
                visitor_rate,
                bandwidth,
                ..
            } => {
                let limited = *visitor_rate != 0 || *bandwidth != 0;
                let lists = !visitors.0.is_empty() || !visitors.1.is_empty();
                let rules = if lists || limited {
                    2 + visitors.0.len() + 2 + visitors.1.len()
                } else {
                    0
                };
                let limits = match (limited, *bandwidth != 0) {
                    (false, _) => 0,
                    (true, false) => 4,
                    (true, true) => 4 + 8,
                };
                1 + name.len() + 1 + 2 + 2 + rules + limits
            }
            Self::RegisterOk { port, .. } => UUID_LEN + if port.is_some() { 2 } else { 0 },
            Self::Connect {
                client_addr,
                public_addr,
                ..
            } => {
                let public = if public_addr.is_empty() {
                    0
                } else {
                    2 + public_addr.len()
                };
                2 * UUID_LEN + 2 + client_addr.len() + public
            }
            Self::ConnectAck { .. } | Self::Unregister { .. } => UUID_LEN,
            Self::ConnectFail { reason, .. } => UUID_LEN + 2 + reason.len(),
            Self::Heartbeat { .. } | Self::HeartbeatAck { .. } => 8,
            Self::Data { data, .. } | Self::Datagram { data, .. } => UUID_LEN + data.len(),
            Self::Close { .. } => UUID_LEN + 1,
            Self::Window { .. } => UUID_LEN + 4,
            Self::Open {
                service,
                target,
                protocol,
                visitor,
                probe,
                ..
            } => {
                let forwarded = !visitor.0.is_empty() || !visitor.1.is_empty();
                let with_protocol = forwarded || *protocol == ServiceProtocol::Udp || *probe;
                let addresses = if forwarded || *probe {
                    2 + visitor.0.len() + 2 + visitor.1.len()
                } else {
                    0
                };
                UUID_LEN
                    + 1
                    + service.len()
                    + 2
                    + target.len()
                    + usize::from(with_protocol)
                    + addresses
                    + usize::from(*probe)
            }
            Self::Health { .. } => UUID_LEN + 1,
        }
    }

    /// Encodes the frame into a new buffer (the seed's signature).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.to_vec()
    }

    /// A `Data` frame for `payload` (at most [`MAX_DATA_PAYLOAD`] bytes), built
    /// with one copy: the hot path of the data plane, which skips `Message`.
    ///
    /// [`MAX_DATA_PAYLOAD`]: super::MAX_DATA_PAYLOAD
    pub fn data_frame(connection_id: Uuid, payload: &[u8]) -> Option<Bytes> {
        id_payload_frame(MessageType::Data, connection_id, payload)
    }

    /// The first [`DATA_FRAME_OVERHEAD`] bytes of a `Data` frame carrying
    /// `payload_len` bytes, so that a reader can put the payload right after
    /// them without a copy; `None` over [`MAX_DATA_PAYLOAD`].
    ///
    /// [`MAX_DATA_PAYLOAD`]: super::MAX_DATA_PAYLOAD
    pub fn data_frame_header(
        connection_id: Uuid,
        payload_len: usize,
    ) -> Option<[u8; DATA_FRAME_OVERHEAD]> {
        if payload_len > super::MAX_DATA_PAYLOAD {
            return None;
        }
        let mut header = [0; DATA_FRAME_OVERHEAD];
        header[0] = MessageType::Data as u8;
        // invariant: bounded by MAX_DATA_PAYLOAD just above
        header[1..HEADER_SIZE].copy_from_slice(&((UUID_LEN + payload_len) as u32).to_be_bytes());
        header[HEADER_SIZE..].copy_from_slice(connection_id.as_bytes());
        Some(header)
    }

    /// The encoded `Datagram` frame for one whole datagram of flow `connection_id`
    /// (as [`Message::datagram`] would encode it); `None` over the payload limit.
    pub fn datagram_frame(connection_id: Uuid, payload: &[u8]) -> Option<Bytes> {
        id_payload_frame(MessageType::Datagram, connection_id, payload)
    }
}

/// Bytes before the payload in a `Data` frame: the header and the connection id.
pub const DATA_FRAME_OVERHEAD: usize = HEADER_SIZE + UUID_LEN;

/// A frame of `kind` carrying a connection id and a payload.
fn id_payload_frame(kind: MessageType, connection_id: Uuid, payload: &[u8]) -> Option<Bytes> {
    if payload.len() > super::MAX_DATA_PAYLOAD {
        return None;
    }
    let mut buf = BytesMut::with_capacity(HEADER_SIZE + UUID_LEN + payload.len());
    buf.put_u8(kind as u8);
    // invariant: bounded by MAX_DATA_PAYLOAD just above
    buf.put_u32((UUID_LEN + payload.len()) as u32);
    buf.put_slice(connection_id.as_bytes());
    buf.put_slice(payload);
    Some(buf.freeze())
}

impl Message {
    /// Encodes the frame into `Bytes`, ready for a WebSocket binary message.
    #[must_use]
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }

    /// Appends the frame to `buf`. Cannot fail: constructors refuse what does not fit.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        buf.put_u8(self.message_type() as u8);
        // invariant: constructors keep every frame within MAX_MESSAGE_SIZE, so this fits in u32
        buf.put_u32(self.payload_len() as u32);
        self.encode_payload(buf);
    }

    fn encode_payload(&self, buf: &mut BytesMut) {
        match self {
            Self::Auth {
                token,
                client_id,
                capabilities,
            } => {
                put_str16(buf, token.expose());
                buf.put_slice(client_id.as_bytes());
                put_ext(buf, capabilities);
            }
            Self::AuthOk {
                tunnel_id,
                capabilities,
            } => {
                buf.put_slice(tunnel_id.as_bytes());
                put_ext(buf, capabilities);
            }
            Self::AuthFail { reason, refusal } => {
                put_str16(buf, reason);
                if let Some(refusal) = refusal {
                    buf.put_u8(refusal.to_byte());
                }
            }
            Self::RegisterFail { reason, refusal } => {
                put_str16(buf, reason);
                if let Some(refusal) = refusal {
                    buf.put_u8(refusal.to_byte());
                }
            }
            Self::Disconnect { reason } => put_str16(buf, reason),
            Self::Register {
                name,
                protocol,
                local_port,
                remote_port,
                visitors: (allow, deny),
                visitor_rate,
                bandwidth,
            } => {
                put_str8(buf, name);
                buf.put_u8(protocol.to_byte());
                buf.put_u16(*local_port);
                buf.put_u16(*remote_port);
                let limited = *visitor_rate != 0 || *bandwidth != 0;
                if !allow.is_empty() || !deny.is_empty() || limited {
                    put_str16(buf, allow);
                    put_str16(buf, deny);
                }
                if limited {
                    buf.put_u32(*visitor_rate);
                }
                if *bandwidth != 0 {
                    buf.put_u64(*bandwidth);
                }
            }
            Self::RegisterOk { service_id, port } => {
                buf.put_slice(service_id.as_bytes());
                if let Some(port) = port {
                    buf.put_u16(*port);
                }
            }
            Self::Connect {
                service_id,
                connection_id,
                client_addr,
                public_addr,
            } => {
                buf.put_slice(service_id.as_bytes());
                buf.put_slice(connection_id.as_bytes());
                put_str16(buf, client_addr);
                if !public_addr.is_empty() {
                    put_str16(buf, public_addr);
                }
            }
            Self::ConnectAck { connection_id }
            | Self::Unregister {
                service_id: connection_id,
            } => buf.put_slice(connection_id.as_bytes()),
            Self::ConnectFail {
                connection_id,
                reason,
            } => {
                buf.put_slice(connection_id.as_bytes());
                put_str16(buf, reason);
            }
            Self::Heartbeat { timestamp } | Self::HeartbeatAck { timestamp } => {
                buf.put_u64(*timestamp);
            }
            Self::Data {
                connection_id,
                data,
            }
            | Self::Datagram {
                connection_id,
                data,
            } => {
                buf.put_slice(connection_id.as_bytes());
                buf.put_slice(data);
            }
            Self::Close {
                connection_id,
                kind,
            } => {
                buf.put_slice(connection_id.as_bytes());
                buf.put_u8(kind.to_byte());
            }
            Self::Window {
                connection_id,
                increment,
            } => {
                buf.put_slice(connection_id.as_bytes());
                buf.put_u32(*increment);
            }
            Self::Open {
                connection_id,
                service,
                target,
                protocol,
                visitor: (client_addr, public_addr),
                probe,
            } => {
                buf.put_slice(connection_id.as_bytes());
                put_str8(buf, service);
                put_str16(buf, target);
                let forwarded = !client_addr.is_empty() || !public_addr.is_empty();
                if forwarded || *protocol == ServiceProtocol::Udp || *probe {
                    buf.put_u8(protocol.to_byte());
                }
                // a probe's flag follows the (empty) addresses
                if forwarded || *probe {
                    put_str16(buf, client_addr);
                    put_str16(buf, public_addr);
                }
                if *probe {
                    buf.put_u8(1);
                }
            }
            Self::Health {
                service_id,
                healthy,
            } => {
                buf.put_slice(service_id.as_bytes());
                buf.put_u8(u8::from(*healthy));
            }
        }
    }

    /// Decodes the first frame of `bytes`; returns it and the bytes consumed (the seed's signature).
    ///
    /// Bytes after the frame are left alone; bytes after the last known field
    /// inside the payload are ignored, as the original does.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), DecodeError> {
        let len = frame_len(bytes)?;
        decode_frame(Bytes::copy_from_slice(&bytes[..len]))
    }

    /// Decodes the first frame of `bytes` without copying `Data`/`Datagram` payloads.
    pub fn decode_bytes(bytes: &Bytes) -> Result<(Self, usize), DecodeError> {
        let len = frame_len(bytes)?;
        decode_frame(bytes.slice(..len))
    }
}

/// Checks the header and returns the whole frame's length; allocates nothing.
pub fn frame_len(bytes: &[u8]) -> Result<usize, DecodeError> {
    let Some(header) = bytes.first_chunk::<HEADER_SIZE>() else {
        return Err(DecodeError::Truncated {
            have: bytes.len(),
            need: HEADER_SIZE,
        });
    };
    let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if declared as usize > MAX_PAYLOAD_SIZE {
        return Err(DecodeError::TooLarge { len: declared });
    }
    let need = HEADER_SIZE + declared as usize;
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            have: bytes.len(),
            need,
        });
    }
    MessageType::try_from(header[0]).map_err(DecodeError::UnknownType)?;
    Ok(need)
}

/// Decodes one complete frame (`frame_len` already checked it).
fn decode_frame(frame: Bytes) -> Result<(Message, usize), DecodeError> {
    let consumed = frame.len();
    let kind = MessageType::try_from(frame[0]).map_err(DecodeError::UnknownType)?;
    let mut r = Reader {
        kind,
        buf: frame.slice(HEADER_SIZE..),
    };
    Ok((r.message()?, consumed))
}

fn put_str8(buf: &mut BytesMut, s: &str) {
    // invariant: constructors refuse names over 255 bytes
    buf.put_u8(s.len() as u8);
    buf.put_slice(s.as_bytes());
}

fn put_str16(buf: &mut BytesMut, s: &str) {
    // invariant: constructors keep the frame within 64 KiB, so the string fits in u16
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn put_ext(buf: &mut BytesMut, capabilities: &Option<Capabilities>) {
    if let Some(caps) = capabilities {
        buf.put_u8(EXT_VERSION);
        buf.put_u32(caps.features.bits());
        if caps.initial_window != DEFAULT_INITIAL_WINDOW {
            buf.put_u32(caps.initial_window);
        }
    }
}

/// Reads fields off one payload; every read checks the length first.
struct Reader {
    kind: MessageType,
    buf: Bytes,
}

impl Reader {
    fn message(&mut self) -> Result<Message, DecodeError> {
        Ok(match self.kind {
            MessageType::Auth => self.auth()?,
            MessageType::AuthOk => Message::AuthOk {
                tunnel_id: self.uuid("tunnel_id")?,
                capabilities: self.ext(),
            },
            MessageType::AuthFail => Message::AuthFail {
                reason: self.str16("reason")?,
                refusal: self.take_u8().and_then(AuthRefusal::from_byte),
            },
            MessageType::Register => self.register()?,
            MessageType::RegisterOk => Message::RegisterOk {
                service_id: self.uuid("service_id")?,
                port: self.take_u16(),
            },
            MessageType::RegisterFail => Message::RegisterFail {
                reason: self.str16("reason")?,
                refusal: self.take_u8().and_then(RegisterRefusal::from_byte),
            },
            MessageType::Connect => self.connect()?,
            MessageType::ConnectAck => Message::ConnectAck {
                connection_id: self.uuid("connection_id")?,
            },
            MessageType::ConnectFail => Message::ConnectFail {
                connection_id: self.uuid("connection_id")?,
                reason: self.str16("reason")?,
            },
            MessageType::Heartbeat => Message::Heartbeat {
                timestamp: self.u64("timestamp")?,
            },
            MessageType::HeartbeatAck => Message::HeartbeatAck {
                timestamp: self.u64("timestamp")?,
            },
            MessageType::Unregister => Message::Unregister {
                service_id: self.uuid("service_id")?,
            },
            MessageType::Disconnect => Message::Disconnect {
                reason: self.str16("reason")?,
            },
            MessageType::Data => Message::Data {
                connection_id: self.uuid("connection_id")?,
                data: self.rest(),
            },
            MessageType::Close => self.close()?,
            MessageType::Window => self.window()?,
            MessageType::Datagram => Message::Datagram {
                connection_id: self.uuid("connection_id")?,
                data: self.rest(),
            },
            MessageType::Open => self.open()?,
            MessageType::Health => self.health()?,
        })
    }

    fn auth(&mut self) -> Result<Message, DecodeError> {
        let token = self.str16("token")?;
        Ok(Message::Auth {
            token: Secret::new(token),
            client_id: self.uuid("client_id")?,
            capabilities: self.ext(),
        })
    }

    fn register(&mut self) -> Result<Message, DecodeError> {
        let name = self.str8("name")?;
        let byte = self.u8("protocol")?;
        let protocol = ServiceProtocol::from_byte(byte).map_err(|b| self.bad("protocol", b))?;
        let local_port = self.u16("local_port")?;
        let remote_port = self.u16("remote_port")?;
        // trailing, under VISITOR_RULES: both lists, or neither; other
        // trailing bytes are ignored, as the original decoder ignores them
        let (visitors, visitor_rate) = match self.trailing_pair("allow", "deny") {
            Some(lists) => (lists, self.u32("visitor_rate").unwrap_or(0)),
            None => ((String::new(), String::new()), 0),
        };
        let bandwidth = self.u64("bandwidth").unwrap_or(0);
        Ok(Message::Register {
            name,
            protocol,
            local_port,
            remote_port,
            visitors,
            visitor_rate,
            bandwidth,
        })
    }

    /// `Open`; a trailing protocol byte (absent: TCP) makes it a UDP flow.
    fn open(&mut self) -> Result<Message, DecodeError> {
        let connection_id = self.uuid("connection_id")?;
        let service = self.str8("service")?;
        let target = self.str16("target")?;
        let protocol = match self.take(1, "protocol").ok().map(|b| b[0]) {
            None => ServiceProtocol::Tcp,
            Some(byte) => ServiceProtocol::from_byte(byte).map_err(|b| self.bad("protocol", b))?,
        };
        // a forwarded visitor's addresses, both or neither
        let pair = self.trailing_pair("client_addr", "public_addr");
        // ACCESS_PROBE: a flag byte after them, only after them (other
        // values: no probe)
        let probe = pair.is_some() && self.take_u8() == Some(1);
        let visitor = pair.unwrap_or_default();
        Ok(Message::Open {
            connection_id,
            service,
            target,
            protocol,
            visitor,
            probe,
        })
    }

    /// Two trailing `str16` fields of the extension, both or neither
    /// (unreadable ones are ignored, as the original decoder ignores
    /// trailing bytes).
    fn trailing_pair(
        &mut self,
        first: &'static str,
        second: &'static str,
    ) -> Option<(String, String)> {
        match (self.str16(first), self.str16(second)) {
            (Ok(a), Ok(b)) => Some((a, b)),
            _ => None,
        }
    }

    fn connect(&mut self) -> Result<Message, DecodeError> {
        let service_id = self.uuid("service_id")?;
        let connection_id = self.uuid("connection_id")?;
        let client_addr = self.str16("client_addr")?;
        // trailing, under PROXY: absent from an original server's (and
        // ignored if unreadable, as an original agent ignores it)
        let public_addr = self.str16("public_addr").unwrap_or_default();
        Ok(Message::Connect {
            service_id,
            connection_id,
            client_addr,
            public_addr,
        })
    }

    fn close(&mut self) -> Result<Message, DecodeError> {
        let connection_id = self.uuid("connection_id")?;
        let byte = self.u8("kind")?;
        let kind = CloseKind::from_byte(byte).ok_or_else(|| self.bad("kind", byte))?;
        Ok(Message::Close {
            connection_id,
            kind,
        })
    }

    fn health(&mut self) -> Result<Message, DecodeError> {
        let service_id = self.uuid("service_id")?;
        let healthy = match self.u8("healthy")? {
            0 => false,
            1 => true,
            other => return Err(self.bad("healthy", other)),
        };
        Ok(Message::Health {
            service_id,
            healthy,
        })
    }

    fn window(&mut self) -> Result<Message, DecodeError> {
        let connection_id = self.uuid("connection_id")?;
        let increment = self.u32("increment")?;
        if increment == 0 || increment > MAX_WINDOW {
            return Err(DecodeError::BadValue {
                kind: self.kind,
                field: "increment",
                value: increment,
            });
        }
        Ok(Message::Window {
            connection_id,
            increment,
        })
    }

    /// The optional extension block; absent, too short or version 0 means a legacy peer.
    fn ext(&mut self) -> Option<Capabilities> {
        let version = *self.buf.first()?;
        if version == 0 || self.buf.len() < 5 {
            return None;
        }
        let features = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let initial_window = match self.buf.get(5..9) {
            Some(w) => u32::from_be_bytes([w[0], w[1], w[2], w[3]]).min(MAX_WINDOW),
            None => DEFAULT_INITIAL_WINDOW,
        };
        Some(Capabilities {
            features: Features::from_bits(features),
            initial_window,
        })
    }

    fn bad(&self, field: &'static str, value: u8) -> DecodeError {
        DecodeError::BadValue {
            kind: self.kind,
            field,
            value: value.into(),
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed {
                kind: self.kind,
                field,
            });
        }
        Ok(self.buf.split_to(n))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn take_u8(&mut self) -> Option<u8> {
        self.take(1, "refusal").ok().map(|b| b[0])
    }

    fn take_u16(&mut self) -> Option<u16> {
        self.u16("port").ok()
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&b);
        Ok(u64::from_be_bytes(raw))
    }

    fn uuid(&mut self, field: &'static str) -> Result<Uuid, DecodeError> {
        let b = self.take(UUID_LEN, field)?;
        let mut raw = [0u8; UUID_LEN];
        raw.copy_from_slice(&b);
        Ok(Uuid::from_bytes(raw))
    }

    fn str8(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u8(field)?;
        self.utf8(len.into(), field)
    }

    fn str16(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(field)?;
        self.utf8(len.into(), field)
    }

    fn utf8(&mut self, len: usize, field: &'static str) -> Result<String, DecodeError> {
        let raw = self.take(len, field)?;
        let kind = self.kind;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::BadUtf8 { kind, field })
    }
}
