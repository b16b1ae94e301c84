//! A WebSocket server written by hand, for tests that play a server our
//! agent meets: the original (control plane only), a silent one, a hostile
//! one. It answers the upgrade as the original does (no subprotocol), reads
//! masked client frames and writes unmasked ones.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers a WebSocket upgrade as the original server does (no subprotocol);
/// returns the bytes read past the request head.
pub async fn accept_upgrade(socket: &mut TcpStream) -> BytesMut {
    let mut buf = BytesMut::new();
    let key = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.advance(end + 4);
            assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"));
            break head
                .lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key"))
                })
                .map(|(_, v)| v.trim().to_owned())
                .unwrap();
        }
        assert!(socket.read_buf(&mut buf).await.unwrap() > 0);
    };
    let accept = actix_http::ws::hash_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        String::from_utf8_lossy(&accept)
    );
    socket.write_all(response.as_bytes()).await.unwrap();
    buf
}

/// Reads one masked client frame's payload; `None` at close or end.
pub async fn read_frame(socket: &mut TcpStream, buf: &mut BytesMut) -> Option<Vec<u8>> {
    loop {
        if buf.len() >= 2 {
            let (len, header) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && buf.len() >= header + 4 + len {
                let opcode = buf[0] & 0x0f;
                let mask: [u8; 4] = buf[header..header + 4].try_into().unwrap();
                let payload: Vec<u8> = buf[header + 4..header + 4 + len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[i % 4])
                    .collect();
                buf.advance(header + 4 + len);
                match opcode {
                    2 => return Some(payload),
                    8 => return None,
                    _ => continue,
                }
            }
        }
        if socket.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

pub async fn write_frame(socket: &mut TcpStream, payload: &[u8]) {
    let mut frame = vec![0x82];
    if payload.len() < 126 {
        frame.push(payload.len() as u8);
    } else {
        frame.push(126);
        frame.extend((payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    socket.write_all(&frame).await.unwrap();
}
