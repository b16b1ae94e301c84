//! Test helpers: a real server on 127.0.0.1:0 and a minimal raw WebSocket
//! client that can also misbehave (oversized headers, garbage, silence).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zlayer_tunnel::protocol::Message;
use zlayer_tunnel::{ControlHandler, TokenStore, TunnelRegistry, TunnelServerConfig};

/// Every wait in a test ends by this.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A server mounted in an actix-web app on an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: Arc<TunnelRegistry>,
    pub handle: actix_web::dev::ServerHandle,
}

/// Starts a server that accepts `token`; must run inside an actix System.
pub fn spawn_server(config: TunnelServerConfig, token: &str) -> TestServer {
    let registry = Arc::new(TunnelRegistry::new(config.data_port_range));
    let validator = TokenStore::new().with_token(token).into_validator();
    let handler = ControlHandler::new(registry.clone(), config, validator);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new(move || {
        let handler = handler.clone();
        App::new()
            .configure(move |c| handler.configure(c))
            .route("/health", actix_web::web::get().to(|| async { "ok" }))
    })
    .workers(1)
    .shutdown_timeout(1)
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    TestServer {
        addr,
        registry,
        handle,
    }
}

/// A fast-heartbeat configuration for tests.
pub fn fast_config(range: (u16, u16)) -> TunnelServerConfig {
    TunnelServerConfig::new()
        .with_port_range(range.0, range.1)
        .with_bind_host("127.0.0.1")
        .with_heartbeat(Duration::from_millis(200), Duration::from_millis(600))
}

/// A raw WebSocket client (masked frames out, plain frames in).
pub struct RawWs {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// A frame from the server: opcode and payload.
pub type Frame = (u8, Vec<u8>);

impl RawWs {
    /// Connects and upgrades; panics unless the server answers 101.
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = BytesMut::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(
                stream.read_buf(&mut buf).await.unwrap() > 0,
                "closed during upgrade"
            );
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"));
        buf.advance(end);
        Self { stream, buf }
    }

    /// Sends raw bytes as one masked binary frame.
    pub async fn send_raw(&mut self, payload: &[u8]) {
        let mut frame = vec![0x82];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        frame.extend(mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Sends one protocol message.
    pub async fn send(&mut self, message: &Message) {
        self.send_raw(&message.encode()).await;
    }

    /// The next frame, or `None` when the server closed the TCP connection.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.parse() {
                return Some(frame);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn parse(&mut self) -> Option<Frame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < header + len {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let payload = b[header..header + len].to_vec();
        self.buf.advance(header + len);
        Some((opcode, payload))
    }

    /// The next protocol message; `None` on a close frame or end of stream.
    pub async fn message(&mut self) -> Option<Message> {
        loop {
            match self.frame().await? {
                (2, payload) => return Some(Message::decode(&payload).unwrap().0),
                (8, _) => return None,
                _ => {}
            }
        }
    }

    /// The next message within the test deadline.
    pub async fn expect(&mut self) -> Option<Message> {
        tokio::time::timeout(DEADLINE, self.message())
            .await
            .expect("no message before the deadline")
    }

    /// Waits until the server closes the TCP connection (within `within`).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.frame().await.is_some() {} })
            .await
            .is_ok()
    }
}
