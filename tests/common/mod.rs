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

pub mod browser;
pub mod certs;
pub mod host;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod raw_server;
pub mod wait;

pub use ports::free_ports;
#[allow(unused_imports)] // not every test binary uses every wait
pub use wait::{
    poll, poll_blocking, poll_every, wait_closed, wait_listening, wait_settled, wait_stalled,
    wait_until,
};

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
    spawn_server_on(config, token, 0)
}

/// Starts a server on a given control port (0 for any).
pub fn spawn_server_on(config: TunnelServerConfig, token: &str, port: u16) -> TestServer {
    let registry = Arc::new(TunnelRegistry::new(config.data_port_range));
    let validator = TokenStore::new().with_token(token).into_validator();
    let handler = ControlHandler::new(registry.clone(), config, validator);
    serve_handler(handler, registry, port)
}

/// Starts a server that holds each session to its token's scope in `store`.
pub fn spawn_server_with_tokens(config: TunnelServerConfig, store: TokenStore) -> TestServer {
    let registry = Arc::new(TunnelRegistry::new(config.data_port_range));
    let handler = ControlHandler::with_tokens(registry.clone(), config, store);
    serve_handler(handler, registry, 0)
}

fn serve_handler(handler: ControlHandler, registry: Arc<TunnelRegistry>, port: u16) -> TestServer {
    let listener = bind_reusable(port);
    let addr = listener.local_addr().unwrap();
    let hardening = handler.on_connect();
    let server = HttpServer::new(move || {
        let handler = handler.clone();
        App::new()
            .configure(move |c| handler.configure(c))
            .route("/health", actix_web::web::get().to(|| async { "ok" }))
    })
    .workers(1)
    .on_connect(hardening)
    .tcp_nodelay(true)
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
        let source = std::net::IpAddr::from([127, 0, 0, 1]);
        Self::try_connect_from(addr, path, source)
            .await
            .unwrap_or_else(|refused| panic!("{refused}"))
    }

    /// Connects from `source` (any loopback address) and upgrades; what the
    /// server answered (head and body) when it is not 101.
    pub async fn try_connect_from(
        addr: SocketAddr,
        path: &str,
        source: std::net::IpAddr,
    ) -> Result<Self, String> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
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
        if !head.starts_with("HTTP/1.1 101") {
            // the body, as long as the head says
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let body = tokio::time::timeout(DEADLINE, async {
                while buf.len() < end + length
                    && stream.read_buf(&mut buf).await.is_ok_and(|n| n > 0)
                {}
            });
            let _ = body.await;
            return Err(String::from_utf8_lossy(&buf).to_string());
        }
        assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"));
        buf.advance(end);
        Ok(Self { stream, buf })
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

    /// Authenticates as an original agent (`Auth` without capability
    /// bytes); panics unless `AuthOk` comes back without any either.
    pub async fn auth_legacy(&mut self, token: &str) {
        self.send(&Message::auth(token, uuid::Uuid::new_v4(), None).unwrap())
            .await;
        assert!(matches!(
            self.expect().await,
            Some(Message::AuthOk {
                capabilities: None,
                ..
            })
        ));
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

/// RSS of process `pid` (`std::process::id()` for this one), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Resident anonymous memory of process `pid` (heap, stacks), in KiB.
#[allow(dead_code)] // not every test binary uses it
pub fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

/// Open file descriptors of process `pid`.
#[allow(dead_code)] // not every test binary uses it
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A KiB figure of `/proc/PID/status`, by its field name.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An agent's running task: `run()`'s result.
pub type AgentTask = tokio::task::JoinHandle<zlayer_tunnel::Result<()>>;

/// The test agents' configuration: fast heartbeats and reconnects, and one
/// link (`connections = 1`): these tests reason about one session; those of
/// several links say so (`with_connections`).
pub fn agent_config(
    server: SocketAddr,
    token: &str,
    services: Vec<zlayer_tunnel::ServiceConfig>,
) -> zlayer_tunnel::TunnelClientConfig {
    let mut config =
        zlayer_tunnel::TunnelClientConfig::new(format!("ws://{server}/tunnel/v1"), token)
            .with_reconnect(Duration::from_millis(50), Duration::from_millis(500))
            .with_connections(1);
    config.heartbeat_interval = Duration::from_millis(200);
    config.heartbeat_timeout = Duration::from_secs(2);
    for s in services {
        config = config.with_service(s);
    }
    config
}

/// Starts an agent for `services` in the background; returns it and its task.
pub fn spawn_agent(
    server: SocketAddr,
    token: &str,
    services: Vec<zlayer_tunnel::ServiceConfig>,
) -> (zlayer_tunnel::TunnelAgent, AgentTask) {
    run_agent(zlayer_tunnel::TunnelAgent::new(agent_config(
        server, token, services,
    )))
}

/// Runs `agent` in the background; returns it and its task.
pub fn run_agent(agent: zlayer_tunnel::TunnelAgent) -> (zlayer_tunnel::TunnelAgent, AgentTask) {
    let runner = agent.clone();
    let task = tokio::spawn(async move { runner.run().await });
    (agent, task)
}

/// Starts an agent for `services` in the background, telling `Published` of
/// each service the server publishes; returns it, its task and that.
pub fn spawn_published(
    server: SocketAddr,
    token: &str,
    services: Vec<zlayer_tunnel::ServiceConfig>,
) -> (zlayer_tunnel::TunnelAgent, AgentTask, Published) {
    run_published(zlayer_tunnel::TunnelAgent::new(agent_config(
        server, token, services,
    )))
}

/// Runs `agent` in the background with a `Published` as its `on_published`
/// callback; returns it, its task and that.
pub fn run_published(
    agent: zlayer_tunnel::TunnelAgent,
) -> (zlayer_tunnel::TunnelAgent, AgentTask, Published) {
    let published = Published::default();
    let (agent, task) = run_agent(agent.on_published(published.callback()));
    (agent, task, published)
}

/// What an agent's `on_published` callback reported, in order (each
/// reconnect publishes again). The server listens on a public port before it
/// answers the registration, so a service reported here takes visitors: the
/// readiness of a tunnel, learnt without a visitor that would be a stream too.
#[derive(Clone)]
pub struct Published(Arc<tokio::sync::watch::Sender<Vec<zlayer_tunnel::PublishedService>>>);

impl Default for Published {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(Vec::new()).0))
    }
}

impl Published {
    /// The callback to give `TunnelAgent::on_published`.
    pub fn callback(&self) -> zlayer_tunnel::PublishedCallback {
        let all = self.0.clone();
        Arc::new(move |service| all.send_modify(|all| all.push(service.clone())))
    }

    /// Waits until `n` publications in all (counting republications after
    /// reconnects); returns every one so far. Panics after `DEADLINE`.
    pub async fn wait(&self, n: usize) -> Vec<zlayer_tunnel::PublishedService> {
        let mut all = self.0.subscribe();
        let reached = tokio::time::timeout(DEADLINE, all.wait_for(|all| all.len() >= n)).await;
        if reached.is_err() {
            panic!("{n} publications awaited, got {:?}", *self.0.borrow());
        }
        self.0.borrow().clone()
    }

    /// Publications so far.
    pub fn count(&self) -> usize {
        self.0.borrow().len()
    }

    /// The public port of the `n`th publication (from 1), once it came.
    pub async fn port(&self, n: usize) -> u16 {
        self.wait(n).await[n - 1].public_port
    }
}

/// A server and an agent publishing one service per local port.
pub struct Tunnel {
    pub server: TestServer,
    pub agent: zlayer_tunnel::TunnelAgent,
    pub task: AgentTask,
    /// The public port of each service, in the order given.
    pub public: Vec<u16>,
}

/// The body of an HTTP GET of `url` (an admin endpoint), as text.
/// `method` `url` with `token`, if any, as a bearer: status and body.
pub async fn http_bearer(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let client = awc::Client::new();
    let mut request = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    if let Some(token) = token {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let mut answer = request.send().await.unwrap();
    let body = answer.body().await.unwrap();
    (
        answer.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

pub async fn http_get(url: &str) -> String {
    let body = awc::Client::new()
        .get(url)
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Starts a server and an agent for TCP services on `local_ports`; returns once all are published.
pub async fn tunnel(local_ports: &[u16]) -> Tunnel {
    tunnel_with(local_ports, |_| {}).await
}

/// [`tunnel`], the server's configuration adjusted by `adjust` first.
pub async fn tunnel_with(
    local_ports: &[u16],
    adjust: impl FnOnce(&mut TunnelServerConfig),
) -> Tunnel {
    let (low, high) = free_ports(local_ports.len() as u16);
    let mut config = fast_config((low, high));
    adjust(&mut config);
    let server = spawn_server(config, "secret");
    let public: Vec<u16> = (low..=high).collect();
    let services = local_ports
        .iter()
        .zip(&public)
        .enumerate()
        .map(|(i, (local, remote))| {
            zlayer_tunnel::ServiceConfig::tcp(format!("s{i}"), *local).with_remote_port(*remote)
        })
        .collect();
    let (agent, task, published) = spawn_published(server.addr, "secret", services);
    published.wait(public.len()).await;
    Tunnel {
        server,
        agent,
        task,
        public,
    }
}

/// Sends `len` bytes of the pattern for `seed` through the echo at `addr`,
/// half-closes, reads the answer to its end and checks it byte for byte; the
/// bytes moved each way.
pub async fn echo_through(addr: SocketAddr, seed: u64, len: usize) -> u64 {
    let data = pattern(seed, len);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, got) = tokio::join!(send, r.read_to_end(&mut back));
    got.unwrap();
    assert_same(&back, &data, &format!("the echo through {addr}"));
    len as u64
}

/// Panics, naming `what`, unless `got` is `sent`: with how much came back,
/// where it first differs, and how it begins (a short answer that begins
/// "HTTP/1.1 400" came from some other server than the one meant).
pub fn assert_same(got: &[u8], sent: &[u8], what: &str) {
    if got == sent {
        return;
    }
    let at = got.iter().zip(sent).position(|(g, s)| g != s);
    let at = at.unwrap_or_else(|| got.len().min(sent.len()));
    let head = String::from_utf8_lossy(&got[..got.len().min(48)]);
    panic!(
        "{what} corrupted data: {} of {} bytes back, the first difference at byte {at}; \
         it began {head:?}",
        got.len(),
        sent.len()
    );
}

/// Uploads `len` pattern bytes to a digest service (`services::digest`)
/// behind `port` and checks its answer: the bytes' SHA-256 and their count.
#[allow(dead_code)] // not every test binary uses it
pub async fn upload_digest(port: u16, seed: u64, len: usize) {
    upload_digest_to(([127, 0, 0, 1], port).into(), seed, len).await;
}

/// [`upload_digest`] to `addr`.
#[allow(dead_code)] // not every test binary uses it
pub async fn upload_digest_to(addr: SocketAddr, seed: u64, len: usize) {
    let data = pattern(seed, len);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut answer = Vec::new();
    let recv = r.read_to_end(&mut answer);
    let (_, got) = tokio::join!(send, recv);
    got.unwrap();
    assert_eq!(answer.len(), 40, "digest service answer");
    assert_eq!(
        &answer[..32],
        &sha256(&data),
        "upload of {len} bytes corrupted"
    );
    assert_eq!(
        u64::from_be_bytes(answer[32..].try_into().unwrap()),
        len as u64
    );
}

/// A deterministic byte pattern; `seed` varies it per stream.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Test services on 127.0.0.1:0, one task per connection.
pub mod services {
    use super::*;
    use tokio::net::TcpListener;

    /// A UDP echo service on a thread of its own (so that a test's checking
    /// cannot starve it), with 8 MiB socket buffers; its port.
    pub fn udp_echo() -> u16 {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tuned = socket2::SockRef::from(&socket);
        tuned.set_recv_buffer_size(8 << 20).unwrap();
        tuned.set_send_buffer_size(8 << 20).unwrap();
        let port = socket.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        port
    }

    /// Echoes every byte; half-closes after the visitor does.
    pub async fn echo() -> u16 {
        serve(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// Echoes every byte like [`echo`], and reports the SHA-256 and length
    /// of what each connection read (what reached the service).
    pub async fn echo_digest() -> (u16, tokio::sync::mpsc::UnboundedReceiver<([u8; 32], u64)>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let port = serve(move |mut s| {
            let tx = tx.clone();
            async move {
                let Some((digest, total)) = hash_until_eof(&mut s, true).await else {
                    return;
                };
                let _ = s.shutdown().await;
                let _ = tx.send((digest, total));
            }
        })
        .await;
        (port, rx)
    }

    /// Reads `s` to its end (writing each chunk back if `echo`): the SHA-256
    /// of what was read and its length; `None` if the socket failed.
    async fn hash_until_eof(s: &mut TcpStream, echo: bool) -> Option<([u8; 32], u64)> {
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let mut buf = vec![0; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return Some((sha2::Digest::finalize(hasher).into(), total));
            }
            sha2::Digest::update(&mut hasher, &buf[..n]);
            total += n as u64;
            if echo {
                s.write_all(&buf[..n]).await.ok()?;
            }
        }
    }

    /// Reads until EOF, then answers the SHA-256 of what it read and its length.
    pub async fn digest() -> u16 {
        serve(|mut s| async move {
            let Some((digest, total)) = hash_until_eof(&mut s, false).await else {
                return;
            };
            let _ = s.write_all(&digest).await;
            let _ = s.write_all(&total.to_be_bytes()).await;
            let _ = s.shutdown().await;
        })
        .await
    }

    /// Reads an 16-byte request (seed, length), sends `pattern(seed, length)`, closes.
    pub async fn source() -> u16 {
        serve(|mut s| async move {
            let mut req = [0u8; 16];
            if s.read_exact(&mut req).await.is_err() {
                return;
            }
            let seed = u64::from_be_bytes(req[..8].try_into().unwrap());
            let len = u64::from_be_bytes(req[8..].try_into().unwrap()) as usize;
            let data = pattern(seed, len);
            let _ = s.write_all(&data).await;
            let _ = s.shutdown().await;
        })
        .await
    }

    /// How a watched service connection ended: bytes read before EOF, or the error.
    pub type Outcome = Result<usize, std::io::ErrorKind>;

    /// Reads until the end and reports how it ended; never writes.
    pub async fn watch() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Outcome>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let port = serve(move |mut s| {
            let tx = tx.clone();
            async move {
                let mut buf = vec![0; 16 * 1024];
                let mut total = 0;
                let outcome = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(total),
                        Ok(n) => total += n,
                        Err(e) => break Err(e.kind()),
                    }
                };
                let _ = tx.send(outcome);
            }
        })
        .await;
        (port, rx)
    }

    /// Reads `after` bytes, then resets the connection (RST).
    pub async fn resetter(after: usize) -> u16 {
        serve(move |mut s| async move {
            let mut buf = vec![0; after];
            let _ = s.read_exact(&mut buf).await;
            reset(s);
        })
        .await
    }

    /// Like [`digest`], but each connection waits for the gate to be open
    /// (`true`) before it reads anything.
    pub async fn gated_digest() -> (u16, tokio::sync::watch::Sender<bool>) {
        let (gate, _) = tokio::sync::watch::channel(false);
        let opened = gate.clone();
        let port = serve(move |mut s| {
            let mut open = opened.subscribe();
            async move {
                if open.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let Some((digest, total)) = hash_until_eof(&mut s, false).await else {
                    return;
                };
                let _ = s.write_all(&digest).await;
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            }
        })
        .await;
        (port, gate)
    }

    /// Discards everything it reads.
    pub async fn sink() -> u16 {
        serve(|mut s| async move {
            let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
        })
        .await
    }

    async fn serve<F, Fut>(handler: F) -> u16
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(handler(socket));
            }
        });
        port
    }
}

fn bind_reusable(port: u16) -> std::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(([127, 0, 0, 1], port).into()).unwrap();
    socket.listen(128).unwrap().into_std().unwrap()
}

/// Closes `socket` with RST (SO_LINGER 0).
pub fn reset(socket: TcpStream) {
    #[allow(deprecated)] // zero linger never blocks
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(socket);
}
