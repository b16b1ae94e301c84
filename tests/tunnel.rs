//! The TCP tunnel end to end: a real server and a real agent on 127.0.0.1,
//! visitors on the public port, services next to the agent. Every transfer is
//! checked byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    DEADLINE, Tunnel, fast_config, free_ports, pattern, services, sha256, spawn_agent,
    spawn_published, spawn_server, tunnel, wait_closed,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zlayer_tunnel::ServiceConfig;

async fn visit(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// A visitor the tunnel may refuse at once: `None` when the refusal's reset
/// came before `connect` returned.
async fn visit_maybe_refused(port: u16) -> Option<TcpStream> {
    match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("visitor could not connect: {e}"),
    }
}

/// Downloads `len` bytes from the source service and checks them.
async fn download(port: u16, seed: u64, len: usize) {
    let mut s = visit(port).await;
    let mut req = seed.to_be_bytes().to_vec();
    req.extend((len as u64).to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut got = Vec::with_capacity(len);
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), len);
    assert!(
        got == pattern(seed, len),
        "download of {len} bytes corrupted"
    );
}

/// Echoes `len` bytes, sending and receiving at once.
async fn echo(port: u16, seed: u64, len: usize) {
    let data = pattern(seed, len);
    let mut s = visit(port).await;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::with_capacity(len);
    let recv = r.read_to_end(&mut back);
    let (_, got) = tokio::join!(send, recv);
    got.unwrap();
    assert_eq!(back.len(), len);
    assert!(
        sha256(&back) == sha256(&data),
        "echo of {len} bytes corrupted (seed {seed})"
    );
}

#[actix_web::test]
async fn sixty_four_mib_each_way_byte_exact() {
    let (digest, source) = (services::digest().await, services::source().await);
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[digest, source]).await;
    let (low, high) = (public[0], public[1]);
    tokio::time::timeout(Duration::from_secs(60), async {
        common::upload_digest(low, 1, 64 << 20).await;
        download(high, 2, 64 << 20).await;
    })
    .await
    .expect("transfers took too long");
    let stats = agent.stats();
    assert!(
        stats.bytes_in >= 64 << 20 && stats.bytes_out >= 64 << 20,
        "{stats:?}"
    );
    agent.stop();
}

#[actix_web::test]
async fn thirty_two_concurrent_streams_both_ways() {
    let echo_port = services::echo().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[echo_port]).await;
    let port = public[0];
    let streams: Vec<_> = (0..32)
        .map(|i| tokio::spawn(echo(port, 100 + i, 1 << 20)))
        .collect();
    tokio::time::timeout(DEADLINE * 3, async {
        for s in streams {
            s.await.unwrap();
        }
    })
    .await
    .expect("concurrent echoes took too long");
    agent.stop();
}

#[actix_web::test]
async fn a_small_request_and_reply_with_half_close() {
    let digest = services::digest().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[digest]).await;
    let port = public[0];
    for len in [0, 1, 100, 65515, 65516, 300_000] {
        common::upload_digest(port, len as u64, len).await;
    }
    agent.stop();
}

#[actix_web::test]
async fn a_service_that_is_down_closes_the_visitor_at_once_and_the_tunnel_stays_up() {
    let dead = free_ports(1).0; // nothing listens there
    let echo_port = services::echo().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[dead, echo_port]).await;
    let (low, high) = (public[0], public[1]);
    let started = std::time::Instant::now();
    // the refusal can reset the visitor before its own `connect` returns
    if let Some(mut visitor) = visit_maybe_refused(low).await {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), visitor.read(&mut buf))
            .await
            .expect("visitor left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        started.elapsed()
    );
    echo(high, 7, 100_000).await;
    agent.stop();
}

#[actix_web::test]
async fn stopping_the_agent_frees_its_ports_within_a_second() {
    let echo_port = services::echo().await;
    let Tunnel {
        server,
        agent,
        task,
        public,
    } = tunnel(&[echo_port]).await;
    let port = public[0];
    agent.stop();
    tokio::time::timeout(DEADLINE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        wait_closed(port, Duration::from_secs(1)).await,
        "public port still open"
    );
    assert_eq!(server.registry.available_ports().await, 1);
}

#[actix_web::test]
async fn a_wrong_token_stops_the_agent_with_the_servers_reason() {
    let (port, _) = free_ports(1);
    let server = spawn_server(fast_config((port, port)), "secret");
    let (_agent, task) = spawn_agent(server.addr, "wrong", vec![]);
    let result = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("invalid tunnel token"), "{err}");
}

#[actix_web::test]
async fn the_agent_comes_back_after_a_server_restart_on_the_same_port() {
    let (port, _) = free_ports(1);
    let listener_port = free_ports(1).0;
    let echo_port = services::echo().await;
    let config = fast_config((port, port));
    let first = common::spawn_server_on(config.clone(), "secret", listener_port);
    let (agent, _task, published) = spawn_published(
        first.addr,
        "secret",
        vec![ServiceConfig::tcp("echo", echo_port)],
    );
    assert_eq!(published.port(1).await, port);
    echo(port, 1, 10_000).await;
    first.handle.stop(false).await;
    assert!(wait_closed(port, Duration::from_secs(3)).await);
    let before = published.count();
    let _second = common::spawn_server_on(config, "secret", listener_port);
    // published again, by the new server
    assert_eq!(published.port(before + 1).await, port);
    echo(port, 2, 10_000).await;
    agent.stop();
}

#[actix_web::test]
async fn sixty_four_mib_each_way_on_one_stream_at_once() {
    let (echo_port, mut received) = services::echo_digest().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[echo_port]).await;
    // one visitor (the first: readiness came from the agent, not a probe)
    // writes 64 MiB while reading the 64 MiB echo on the same stream
    const LEN: usize = 64 << 20;
    let data = pattern(5, LEN);
    let mut s = visit(public[0]).await;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::with_capacity(LEN);
    let (_, got) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send, r.read_to_end(&mut back))
    })
    .await
    .expect("the echo took too long");
    got.unwrap();
    let sent = sha256(&data);
    // what reached the service, and what came back from it
    let (upstream, len) = match tokio::time::timeout(DEADLINE, received.recv()).await {
        Ok(Some(digest)) => digest,
        other => panic!("no digest from the service: {other:?}"),
    };
    assert_eq!(len, LEN as u64);
    assert!(upstream == sent, "corrupted on the way to the service");
    assert_eq!(back.len(), LEN);
    assert!(back == data, "corrupted on the way back");
    let stats = agent.service_stats("s0").unwrap();
    assert!(
        stats.bytes_in >= LEN as u64 && stats.bytes_out >= LEN as u64,
        "{stats:?}"
    );
    agent.stop();
}

#[actix_web::test]
async fn an_auto_assigned_port_comes_back_after_a_server_restart() {
    let (low, high) = free_ports(3);
    let control = free_ports(1).0;
    let echo_port = services::echo().await;
    let config = fast_config((low, high));
    let first = common::spawn_server_on(config.clone(), "secret", control);
    // B takes the lowest port, A the next one; both asked for any port
    let (b, b_task, b_published) = spawn_published(
        first.addr,
        "secret",
        vec![ServiceConfig::tcp("b", echo_port)],
    );
    assert_eq!(b_published.port(1).await, low);
    let (a, _a_task, a_published) = spawn_published(
        first.addr,
        "secret",
        vec![ServiceConfig::tcp("a", echo_port)],
    );
    assert_eq!(a_published.port(1).await, low + 1);
    b.stop();
    tokio::time::timeout(DEADLINE, b_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(wait_closed(low, Duration::from_secs(1)).await);

    first.handle.stop(false).await;
    assert!(wait_closed(low + 1, Duration::from_secs(3)).await);
    let before = a_published.count();
    // a fresh server's pool would hand A the lowest port, now free
    let second = common::spawn_server_on(config, "secret", control);
    assert_eq!(
        a_published.port(before + 1).await,
        low + 1,
        "A did not get its port back"
    );
    let tunnels = second.registry.list_tunnels().await;
    assert_eq!(tunnels[0].ports, [low + 1]);
    echo(low + 1, 3, 100_000).await;
    assert!(
        wait_closed(low, Duration::ZERO).await,
        "the lowest port is held"
    );
    a.stop();
}

#[actix_web::test]
async fn a_visitor_the_agents_callback_refuses_is_closed_and_the_tunnel_stays_up() {
    use std::sync::{Arc, Mutex};
    let (low, high) = free_ports(2);
    let server = spawn_server(fast_config((low, high)), "secret");
    let echo_port = services::echo().await;
    let services = vec![
        ServiceConfig::tcp("no", echo_port).with_remote_port(low),
        ServiceConfig::tcp("yes", echo_port).with_remote_port(high),
    ];
    let refused = Arc::new(Mutex::new(None::<uuid::Uuid>));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let callback: zlayer_tunnel::ConnectionCallback = {
        let (refused, asked) = (refused.clone(), asked.clone());
        Arc::new(move |service, _connection, visitor: String| {
            asked.lock().unwrap().push(visitor);
            *refused.lock().unwrap() != Some(service)
        })
    };
    let agent =
        zlayer_tunnel::TunnelAgent::new(common::agent_config(server.addr, "secret", services))
            .on_connection(callback);
    let (agent, _task, published) = common::run_published(agent);
    published.wait(2).await;
    let status = agent.status();
    let no = status.services.iter().find(|s| s.name == "no").unwrap().id;
    *refused.lock().unwrap() = Some(no);

    // the refusal can reset the visitor before its own `connect` returns
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let address = socket.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    if let Ok(mut visitor) = socket.connect(([127, 0, 0, 1], low).into()).await {
        let mut buf = [0u8; 16];
        let _ = visitor.write_all(b"let me in").await;
        let read = tokio::time::timeout(Duration::from_secs(1), visitor.read(&mut buf))
            .await
            .expect("the refused visitor was left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        asked.lock().unwrap().contains(&address),
        "the callback was not asked about {address}"
    );
    // the tunnel is up: the other service serves, and so does this one once the callback agrees
    echo(high, 1, 100_000).await;
    *refused.lock().unwrap() = None;
    echo(low, 2, 100_000).await;
    assert_eq!(
        agent.status().tunnel_id,
        status.tunnel_id,
        "the session changed"
    );
    assert_eq!(server.registry.tunnel_count().await, 1);
    agent.stop();
}

/// The third way a stream is refused: the local service neither accepts nor
/// refuses (its accept queue is full, so the kernel drops the agent's SYNs).
/// The agent gives up at its local connect timeout and the visitor is closed
/// then, not left hanging; the tunnel stays up.
#[actix_web::test]
async fn a_local_dial_that_times_out_closes_the_visitor_and_the_tunnel_stays_up() {
    use socket2::{Domain, Socket, Type};
    let hang = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    hang.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hang.listen(0).unwrap();
    let hang_port = hang.local_addr().unwrap().as_socket().unwrap().port();
    // one connection nobody accepts fills a backlog of 0: later SYNs are dropped
    let _queued = TcpStream::connect(("127.0.0.1", hang_port)).await.unwrap();
    let echo_port = services::echo().await;
    let (low, high) = free_ports(2);
    let server = spawn_server(fast_config((low, high)), "secret");
    let mut config = common::agent_config(
        server.addr,
        "secret",
        vec![
            ServiceConfig::tcp("hang", hang_port).with_remote_port(low),
            ServiceConfig::tcp("echo", echo_port).with_remote_port(high),
        ],
    );
    config.local_connect_timeout = Duration::from_millis(300);
    let (agent, _task, published) = common::run_published(zlayer_tunnel::TunnelAgent::new(config));
    published.wait(2).await;

    let mut visitor = TcpStream::connect(("127.0.0.1", low)).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), visitor.read(&mut buf))
        .await
        .expect("visitor left hanging after the dial timed out");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "closed after {took:?} (dial timeout: 300 ms)"
    );
    echo(high, 11, 100_000).await;
    agent.stop();
}

/// Issue 16, finding 2: a flood of one service's visitors took the tunnel's
/// whole stream budget, and every visitor of its other services was refused.
#[actix_web::test]
async fn a_flood_on_one_service_leaves_its_neighbour_room() {
    let (low, high) = free_ports(2);
    let mut config = fast_config((low, high));
    config.max_streams_per_tunnel = 12;
    config.stream_reserve_per_service = 4;
    let server = spawn_server(config, "secret");
    let services = vec![
        ServiceConfig::tcp("flooded", services::echo().await).with_remote_port(low),
        ServiceConfig::tcp("neighbour", services::echo().await).with_remote_port(high),
    ];
    let (_agent, _task, published) = spawn_published(server.addr, "secret", services);
    published.wait(2).await;
    // the flood: visitors of one service that hold their connections; a
    // visitor is a stream once a byte came back through it
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..16 {
        let Some(mut s) = visit_maybe_refused(low).await else {
            refused += 1;
            continue;
        };
        s.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        match tokio::time::timeout(DEADLINE, s.read_exact(&mut byte)).await {
            Ok(Ok(_)) => held.push(s),
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("a visitor was neither served nor refused"),
        }
    }
    assert_eq!(
        held.len(),
        12 - 4,
        "the flooded service took more than its share"
    );
    assert_eq!(refused, 16 - 8);
    // while the flood holds its share, the neighbour's visitors are served
    for seed in 0..4 {
        echo(high, seed, 64 << 10).await;
    }
}
