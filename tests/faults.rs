//! Faults and fairness through a real tunnel: resets on either side, a silent
//! service, a legacy agent's visitors, a bulk transfer beside a ping-pong, and
//! the whole tunnel from plain tokio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::proxy::Proxy;
use common::{
    DEADLINE, RawWs, Tunnel, echo_through, fast_config, free_ports, reset, services,
    spawn_published, spawn_server, tunnel, tunnel_with,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;
use zlayer_tunnel::ServiceConfig;
use zlayer_tunnel::protocol::{Message, ServiceProtocol};

async fn visit(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// The body of a plain HTTP/1.0 GET to 127.0.0.1:`port`.
async fn http_get(port: u16, path: &str) -> String {
    let mut s = visit(port).await;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    response
}

async fn ping_pong(port: u16, rounds: usize) {
    let mut s = visit(port).await;
    let mut buf = [0u8; 64];
    for i in 0..rounds {
        let msg = [i as u8; 64];
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }
}

#[actix_web::test]
async fn a_visitor_reset_resets_the_service_side_and_only_that_stream() {
    let (watched, mut outcomes) = services::watch().await;
    let echo = services::echo().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[watched, echo]).await;
    let (low, high) = (public[0], public[1]);
    let mut visitor = visit(low).await;
    visitor.write_all(&vec![7u8; 1 << 20]).await.unwrap();
    reset(visitor);
    // the service's first connection (readiness came from the agent, not a probe)
    let outcome = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        Err(std::io::ErrorKind::ConnectionReset),
        "the service saw a clean close, not a reset"
    );
    ping_pong(high, 10).await;
    agent.stop();
}

#[actix_web::test]
async fn a_service_reset_resets_the_visitor() {
    let resetter = services::resetter(1000).await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[resetter]).await;
    let port = public[0];
    let mut visitor = visit(port).await;
    let (mut r, mut w) = visitor.split();
    let writer = async {
        let chunk = vec![1u8; 64 * 1024];
        while w.write_all(&chunk).await.is_ok() {}
    };
    let reader = async {
        let mut buf = [0u8; 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.kind()),
            }
        }
    };
    let (_, ended) = tokio::time::timeout(DEADLINE, async { tokio::join!(writer, reader) })
        .await
        .expect("visitor left hanging");
    assert_eq!(ended, Err(std::io::ErrorKind::ConnectionReset));
    agent.stop();
}

#[actix_web::test]
async fn a_silent_service_keeps_its_visitor_and_sees_its_close() {
    let (silent, mut outcomes) = services::watch().await;
    let echo = services::echo().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[silent, echo]).await;
    let (low, high) = (public[0], public[1]);
    let mut visitor = visit(low).await;
    visitor.write_all(b"hello, anyone").await.unwrap();
    // the stream is open end to end: its bytes reached the service's socket
    common::wait_until("13 bytes delivered to the silent service", || {
        std::future::ready(agent.service_stats("s0").unwrap().bytes_in == 13)
    })
    .await;
    ping_pong(high, 10).await; // the tunnel is not blocked by the silent stream
    // and it stays open: a close the tunnel decided on opening it, or on its
    // bytes, went through the same WebSocket ahead of the ping-pong's replies,
    // so it would have reached the visitor by now
    let mut buf = [0u8; 8];
    let quiet = visitor.try_read(&mut buf);
    assert!(
        quiet
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the visitor was answered or closed: {quiet:?}"
    );
    visitor.shutdown().await.unwrap();
    let outcome = tokio::time::timeout(DEADLINE, outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Ok(13));
    agent.stop();
}

#[actix_web::test]
async fn a_legacy_agents_visitors_are_refused_cleanly() {
    let (port, _) = free_ports(1);
    let server = spawn_server(fast_config((port, port)), "secret");
    let mut ws = RawWs::connect(server.addr, "/tunnel/v1").await;
    ws.auth_legacy("secret").await;
    ws.send(&Message::register("ssh", ServiceProtocol::Tcp, 22, 0).unwrap())
        .await;
    loop {
        match ws.expect().await.unwrap() {
            Message::RegisterOk { .. } => break,
            Message::Heartbeat { timestamp } => ws.send(&Message::HeartbeatAck { timestamp }).await,
            other => panic!("{other:?}"),
        }
    }
    let mut visitor = visit(port).await;
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(1), visitor.read(&mut buf))
        .await
        .expect("visitor left hanging");
    assert!(matches!(read, Ok(0) | Err(_)));
    // the legacy agent only ever sees control messages it knows: whatever the
    // server sent about the visitor left before the answer to this heartbeat
    for m in heartbeat_round_trip(&mut ws).await {
        assert!(
            matches!(m, Message::Heartbeat { .. }),
            "legacy agent was sent {m:?}"
        );
    }
}

/// Sends a `Heartbeat` as the agent on `ws` and reads up to its
/// `HeartbeatAck` (the server writes its frames in order: whatever it sent
/// before comes first), answering the server's heartbeats; what came before.
async fn heartbeat_round_trip(ws: &mut RawWs) -> Vec<Message> {
    const MARK: u64 = 0x5eed;
    ws.send(&Message::Heartbeat { timestamp: MARK }).await;
    let mut before = Vec::new();
    loop {
        match ws.expect().await {
            Some(Message::HeartbeatAck { timestamp: MARK }) => return before,
            Some(Message::Heartbeat { timestamp }) => {
                ws.send(&Message::HeartbeatAck { timestamp }).await;
                before.push(Message::Heartbeat { timestamp });
            }
            Some(other) => before.push(other),
            None => panic!("closed before the heartbeat's answer; after {before:?}"),
        }
    }
}

/// Once a bulk transfer on another stream has moved 16 MiB (counted in
/// `moved`), runs `rounds` of ping-pong on `port`; returns what the bulk moved
/// meanwhile.
async fn ping_pong_beside(moved: &AtomicU64, port: u16, rounds: usize, bulk: &str) -> u64 {
    common::wait_until(&format!("16 MiB moved by {bulk}"), || {
        std::future::ready(moved.load(Ordering::Relaxed) >= 16 << 20)
    })
    .await;
    let before = moved.load(Ordering::Relaxed);
    if tokio::time::timeout(DEADLINE, ping_pong(port, rounds))
        .await
        .is_err()
    {
        panic!("ping-pong starved by {bulk}");
    }
    moved.load(Ordering::Relaxed) - before
}

#[actix_web::test]
async fn a_ping_pong_progresses_beside_a_bulk_transfer() {
    let (sink, echo) = (services::sink().await, services::echo().await);
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel(&[sink, echo]).await;
    let (low, high) = (public[0], public[1]);
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = {
        let (sent, stop) = (sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut s = visit(low).await;
            let chunk = vec![0xabu8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                s.write_all(&chunk).await.unwrap();
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let during = ping_pong_beside(&sent, high, 200, "the bulk transfer").await;
    stop.store(true, Ordering::Relaxed);
    bulk.await.unwrap();
    assert!(
        during > 1 << 20,
        "the bulk transfer stalled during the ping-pong ({during} bytes)"
    );
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_agent_from_plain_tokio() {
    let (port, _) = free_ports(1);
    let registry = Arc::new(zlayer_tunnel::TunnelRegistry::new((port, port)));
    let validator = zlayer_tunnel::TokenStore::new()
        .with_token("secret")
        .into_validator();
    let handler =
        zlayer_tunnel::ControlHandler::new(registry, fast_config((port, port)), validator);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle_connection(stream, peer).await });
        }
    });
    let echo = services::echo().await;
    let (agent, task, published) = spawn_published(
        control,
        "secret",
        vec![ServiceConfig::tcp("e", echo).with_remote_port(port)],
    );
    published.wait(1).await;
    ping_pong(port, 20).await;
    agent.stop();
    tokio::time::timeout(DEADLINE, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[actix_web::test]
async fn an_agent_that_stops_reading_is_dropped_by_the_registry_watchdog() {
    let (port, _) = free_ports(1);
    let mut config = fast_config((port, port));
    // long enough to see the WebSocket frozen before the watchdog drops it
    config.heartbeat_timeout = Duration::from_secs(2);
    let server = spawn_server(config, "secret");
    let mut ws = RawWs::connect(server.addr, "/tunnel/v1").await;
    // a large window, so the server has megabytes to push at an agent that never reads
    let caps = zlayer_tunnel::protocol::Capabilities {
        features: zlayer_tunnel::protocol::Features::STREAMS,
        initial_window: 4 << 20,
    };
    ws.send(&Message::auth("secret", Uuid::new_v4(), Some(caps)).unwrap())
        .await;
    assert!(matches!(ws.expect().await, Some(Message::AuthOk { .. })));
    ws.send(&Message::register("svc", ServiceProtocol::Tcp, 22, port).unwrap())
        .await;
    // listening once registered (no probe: it would be a visitor, and its Connect the first)
    let registered = next_stream_message(&mut ws, DEADLINE).await;
    assert!(
        matches!(registered, Some(Message::RegisterOk { .. })),
        "{registered:?}"
    );
    // a visitor whose stream is open (the agent saw its Connect)
    let mut first = visit(port).await;
    loop {
        match ws.expect().await {
            Some(Message::Connect { .. }) => break,
            Some(_) => continue,
            None => panic!("the server never opened the first visitor's stream"),
        }
    }
    // visitors upload; the frames pile up toward the agent, which stops reading
    let written = Arc::new(AtomicU64::new(0));
    let mut visitors = Vec::new();
    for _ in 0..8 {
        let mut v = visit(port).await;
        let written = written.clone();
        visitors.push(tokio::spawn(async move {
            let chunk = vec![5u8; 64 << 10];
            for _ in 0..64 {
                if v.write_all(&chunk).await.is_err() {
                    break;
                }
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            v
        }));
    }
    common::wait_stalled(&written, Duration::from_millis(300), "the uploads").await;
    // the WebSocket actor is frozen: a visitor that arrives now waits in its mailbox
    let mut late = visit(port).await;
    // the WebSocket actor is frozen (its peer reads nothing); only the registry can end it
    assert!(
        common::wait_closed(port, Duration::from_secs(5)).await,
        "the public port of a frozen, silent agent stayed open"
    );
    assert_eq!(server.registry.tunnel_count().await, 0);
    // its connections end with the tunnel, though the WebSocket actor is frozen
    for visitor in [&mut first, &mut late] {
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(DEADLINE, visitor.read_to_end(&mut rest)).await;
        assert!(
            ended.is_ok(),
            "a visitor of the dropped tunnel was left open"
        );
    }
    drop(ws);
    for v in visitors {
        v.abort();
    }
}

/// A server process (its control port of the OS's choosing), with `flags`
/// besides its listen address, port and bind host, and a raw agent
/// authenticated with a `window` per stream and one TCP service registered:
/// the server, the agent's WebSocket, and the service's public port.
async fn server_with_raw_agent(flags: &[&str], window: u32) -> (common::process::Proc, RawWs, u16) {
    let public = free_ports(1).0;
    let mut server = common::process::Proc::server((public, public), flags);
    let control = server.listening_addr("control channel listening");
    let mut ws = RawWs::connect(control, "/tunnel/v1").await;
    let caps = zlayer_tunnel::protocol::Capabilities {
        features: zlayer_tunnel::protocol::Features::STREAMS,
        initial_window: window,
    };
    let token = common::process::TOKEN;
    ws.send(&Message::auth(token, Uuid::new_v4(), Some(caps)).unwrap())
        .await;
    assert!(matches!(ws.expect().await, Some(Message::AuthOk { .. })));
    ws.send(&Message::register("svc", ServiceProtocol::Tcp, 22, public).unwrap())
        .await;
    // listening once registered (no probe: it would be a visitor too)
    let registered = next_stream_message(&mut ws, DEADLINE).await;
    assert!(
        matches!(registered, Some(Message::RegisterOk { .. })),
        "{registered:?}"
    );
    (server, ws, public)
}

/// Credit windows bound what a truthful agent lets the server send. This
/// agent announces a 2 GiB window per stream and then reads nothing: the
/// server's WebSocket actor freezes, and without the tunnel's read gate its
/// visitors' bytes would pile up in the actor's mailbox at memory speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_lies_about_its_window_cannot_make_the_server_buffer() {
    const PER_VISITOR: u64 = 256 << 20;
    let (server, ws, public) =
        server_with_raw_agent(&["--heartbeat-timeout", "120s"], i32::MAX as u32).await;
    let idle = common::rss_kib(server.child.id());

    // from here on the agent reads nothing; 8 visitors upload 256 MiB each
    let written = Arc::new(AtomicU64::new(0));
    let mut visitors = Vec::new();
    for _ in 0..8 {
        let written = written.clone();
        let mut v = visit(public).await;
        visitors.push(tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..PER_VISITOR >> 20 {
                if v.write_all(&chunk).await.is_err() {
                    break;
                }
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            v
        }));
    }
    // the visitors stall: nothing more written for a second
    let last = common::wait_stalled(&written, Duration::from_secs(1), "the visitors").await;
    let grown_mib = common::rss_kib(server.child.id()).saturating_sub(idle) >> 10;
    let taken_mib = last >> 20;
    eprintln!("server RSS +{grown_mib} MiB; visitors stalled after {taken_mib} MiB");
    assert!(
        taken_mib < 8 * (PER_VISITOR >> 20) / 2,
        "{taken_mib} MiB taken"
    );
    assert!(grown_mib < 48, "server RSS grew by {grown_mib} MiB");
    drop(ws);
    for v in visitors {
        v.abort();
    }
}

/// A tunnel whose WebSocket actor is frozen (its agent reads nothing) takes
/// only a bounded number of visitors off its public port: the rest wait in
/// the kernel's listen backlog, not as sockets the server holds, so visitors
/// cannot run the server out of file descriptors (which every other tunnel
/// shares) through one stuck agent. Once the server drops the tunnel, every
/// one of them is closed, those the frozen actor holds included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_tunnel_takes_a_bounded_number_of_visitors() {
    const VISITORS: usize = 600;
    let flags = [
        "--heartbeat-interval",
        "1s",
        "--heartbeat-timeout",
        "6s",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let (mut server, ws, public) = server_with_raw_agent(&flags, 64 << 20).await;
    let admin = server.listening_addr("admin endpoints listening").port();

    // from here on the agent reads nothing: one upload fills the WebSocket
    let written = Arc::new(AtomicU64::new(0));
    let uploader = {
        let written = written.clone();
        let mut v = visit(public).await;
        tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            while v.write_all(&chunk).await.is_ok() {
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    common::wait_stalled(&written, Duration::from_secs(1), "the upload").await;
    let before = common::fd_count(server.child.id());

    let mut visitors = Vec::with_capacity(VISITORS);
    for _ in 0..VISITORS {
        visitors.push(visit(public).await);
    }
    // the server takes what it takes; wait until its descriptors stop moving
    let fds = || common::fd_count(server.child.id()) as u64;
    let settled = common::wait_settled(fds, Duration::from_millis(500), |n| {
        format!("the server's descriptors never settled: {n}")
    })
    .await;
    let taken = (settled as usize).saturating_sub(before);
    eprintln!("{taken} of {VISITORS} visitors taken by the frozen tunnel");
    assert!(
        taken <= 200,
        "a frozen tunnel holds {taken} visitor sockets"
    );
    // the pause lasts, so it is counted (after a second)
    common::wait_until(
        "zlayer_tunnel_accept_pauses_total 1 in /metrics",
        || async {
            http_get(admin, "/metrics")
                .await
                .contains("zlayer_tunnel_accept_pauses_total 1\n")
        },
    )
    .await;

    // the heartbeat timeout drops the tunnel; no visitor is left open
    let dropped = std::time::Instant::now();
    assert!(
        common::wait_closed(public, DEADLINE).await,
        "the frozen tunnel's port stayed open"
    );
    for (i, mut visitor) in visitors.into_iter().enumerate() {
        let mut byte = [0u8; 1];
        let ended = tokio::time::timeout(DEADLINE, visitor.read(&mut byte)).await;
        assert!(
            matches!(ended, Ok(Ok(0) | Err(_))),
            "visitor {i} still open {:?} after the tunnel was dropped",
            dropped.elapsed()
        );
    }
    eprintln!("all visitors closed {:?} after the drop", dropped.elapsed());
    drop(ws);
    uploader.abort();
}

#[actix_web::test]
async fn an_agent_replaces_a_half_dead_link_and_takes_its_session_over_at_once() {
    let (low, high) = free_ports(2);
    let mut config = fast_config((low, high));
    config.heartbeat_timeout = Duration::from_secs(30); // the server alone would wait 30 s
    let server = spawn_server(config, "secret");
    let proxy = Proxy::start(server.addr).await;
    let echo = services::echo().await;
    let mut client =
        common::agent_config(proxy.addr, "secret", vec![ServiceConfig::tcp("e", echo)]);
    client.heartbeat_timeout = Duration::from_secs(1);
    let (agent, _task, published) = common::run_published(zlayer_tunnel::TunnelAgent::new(client));
    assert_eq!(published.port(1).await, low);
    let public = ([127, 0, 0, 1], low).into();
    echo_through(public, 1, 64 << 10).await;
    let before = server.registry.list_tunnels().await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].client_id, agent.client_id());

    // the link goes half-dead: both ends open, nothing crosses
    let frozen = std::time::Instant::now();
    let count = published.count();
    assert_eq!(proxy.freeze_open(), 1);
    // published again: a new session of the agent
    published.wait(count + 1).await;
    // taken over by (token, client id): the old session is gone, its port is the new one's
    let after = server.registry.list_tunnels().await;
    assert_eq!(after.len(), 1, "the half-dead session was not taken over");
    assert_eq!(after[0].client_id, agent.client_id(), "client id changed");
    assert_eq!(after[0].ports, [low], "not the same public port");
    tokio::time::timeout(DEADLINE, echo_through(public, 2, 64 << 10))
        .await
        .expect("the port does not serve through the new session");
    let took = frozen.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "serving again only {took:?} after the freeze (the server's timeout: 30 s)"
    );
    agent.stop();
}

/// The same the other way: the bulk flows from a service to its visitor (so
/// the agent's queue toward the WebSocket is the busy one) while a ping-pong
/// runs on another service of the tunnel; what the ping-pong waits behind
/// is bounded by the download's window.
#[actix_web::test]
async fn a_ping_pong_progresses_beside_a_bulk_download() {
    const WINDOW: u32 = 256 * 1024;
    let firehose = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let firehose_port = firehose.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = firehose.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0xcdu8; 256 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let echo = services::echo().await;
    let Tunnel {
        server: _server,
        agent,
        task: _task,
        public,
    } = tunnel_with(&[firehose_port, echo], |c| c.max_stream_window = WINDOW).await;
    let (low, high) = (public[0], public[1]);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = {
        let (received, stop) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            let mut s = visit(low).await;
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the download ended early");
                assert!(buf[..n].iter().all(|b| *b == 0xcd), "corrupted download");
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    // each round trip waits behind what the bulk stream has in flight ahead
    // of it on the one WebSocket: at most its window (the server's
    // `max_stream_window`, here 256 KiB) plus the kernel's buffers
    let during = ping_pong_beside(&received, high, 50, "the bulk download").await;
    // an ordering bound, not a timing one: the download's bytes that reach
    // its visitor while one 64-byte exchange is under way
    let ahead = bulk_bytes_per_round_trip(&received, high, 50).await;
    stop.store(true, Ordering::Relaxed);
    bulk.await.unwrap();
    assert!(
        during > 1 << 20,
        "the bulk download stalled during the ping-pong ({during} bytes)"
    );
    // with the default window (1 MiB): 1.2-1.5 MiB a round trip
    assert!(
        ahead <= 3 * WINDOW as u64,
        "a 64-byte exchange waited behind {ahead} bytes of the download (median)"
    );
    agent.stop();
}

/// The median of the bytes `moved` advances by while one 64-byte exchange
/// through `port` is under way, over `rounds` exchanges.
async fn bulk_bytes_per_round_trip(moved: &AtomicU64, port: u16, rounds: usize) -> u64 {
    let mut s = visit(port).await;
    let mut buf = [0u8; 64];
    let mut ahead = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let msg = [i as u8; 64];
        let before = moved.load(Ordering::Relaxed);
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
        ahead.push(moved.load(Ordering::Relaxed) - before);
    }
    ahead.sort_unstable();
    ahead[rounds / 2]
}

/// The next stream message (`Data`, `Window`, `Close`, `Connect`) from the
/// server, answering heartbeats meanwhile; `None` if none comes within `within`.
async fn next_stream_message(ws: &mut RawWs, within: Duration) -> Option<Message> {
    tokio::time::timeout(within, async {
        loop {
            match ws.message().await {
                Some(Message::Heartbeat { timestamp }) => {
                    ws.send(&Message::HeartbeatAck { timestamp }).await;
                }
                Some(Message::HeartbeatAck { .. }) => {}
                other => return other,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The payload of stream `id`'s next `Data` messages, until at least `len`
/// bytes; panics, naming `what`, at any other message.
async fn stream_bytes(ws: &mut RawWs, id: Uuid, len: usize, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        match next_stream_message(ws, DEADLINE).await {
            Some(Message::Data {
                connection_id,
                data,
                ..
            }) if connection_id == id => got.extend_from_slice(&data),
            other => panic!("expected {what}, got {other:?}"),
        }
    }
    got
}

/// A server, and a raw agent on it that announced `STREAMS` with `window` and
/// registered one TCP service: the server, the agent's socket, the public port.
async fn raw_streams_agent(window: u32) -> (common::TestServer, RawWs, u16) {
    let (low, high) = free_ports(1);
    let server = spawn_server(fast_config((low, high)), "t");
    let mut ws = RawWs::connect(server.addr, "/tunnel/v1").await;
    let caps = zlayer_tunnel::protocol::Capabilities {
        features: zlayer_tunnel::protocol::Features::STREAMS,
        initial_window: window,
    };
    ws.send(&Message::auth("t", Uuid::new_v4(), Some(caps)).unwrap())
        .await;
    assert!(matches!(ws.expect().await, Some(Message::AuthOk { .. })));
    ws.send(&Message::register("svc", ServiceProtocol::Tcp, 22, low).unwrap())
        .await;
    // listening once registered (no probe connection: it would be a visitor too)
    let registered = next_stream_message(&mut ws, DEADLINE).await;
    assert!(
        matches!(registered, Some(Message::RegisterOk { .. })),
        "{registered:?}"
    );
    (server, ws, low)
}

/// A visitor that resets its connection right after connecting (before or
/// after the server reads it as the stream opens) costs the agent a `Connect`
/// and a `Close abort` for that stream, nothing else; the next visitor's bytes
/// go through.
#[actix_web::test]
async fn a_visitor_that_resets_at_once_is_aborted_and_the_next_one_served() {
    let (_server, mut ws, port) = raw_streams_agent(64 * 1024).await;
    reset(visit(port).await);
    let id = match next_stream_message(&mut ws, DEADLINE).await {
        Some(Message::Connect { connection_id, .. }) => connection_id,
        other => panic!("expected Connect, got {other:?}"),
    };
    match next_stream_message(&mut ws, DEADLINE).await {
        Some(Message::Close {
            connection_id,
            kind: zlayer_tunnel::protocol::CloseKind::Abort,
            ..
        }) if connection_id == id => {}
        other => panic!("expected Close abort for {id}, got {other:?}"),
    }

    let mut next = visit(port).await;
    next.write_all(b"still here").await.unwrap();
    let next_id = match next_stream_message(&mut ws, DEADLINE).await {
        Some(Message::Connect { connection_id, .. }) => connection_id,
        other => panic!("expected the next Connect, got {other:?}"),
    };
    let got = stream_bytes(&mut ws, next_id, 10, "the next visitor's bytes").await;
    assert_eq!(got, b"still here");
}

/// The server reads a visitor's first bytes as it opens the stream (to send
/// them in the same write as `Connect`): that early read must still count
/// against the agent's window. A visitor that sends 5000 bytes to an agent
/// with a 1000-byte window gets exactly 1000 through until the agent grants
/// more, then the rest, in order.
#[actix_web::test]
async fn a_visitors_first_bytes_follow_connect_within_the_agents_window() {
    const WINDOW: usize = 1000;
    let (_server, mut ws, low) = raw_streams_agent(WINDOW as u32).await;

    let sent = common::pattern(11, 5 * WINDOW);
    let mut visitor = visit(low).await;
    visitor.write_all(&sent).await.unwrap();
    let id = loop {
        match next_stream_message(&mut ws, DEADLINE).await {
            Some(Message::Connect { connection_id, .. }) => break connection_id,
            Some(_) => {}
            None => panic!("no Connect"),
        }
    };
    let mut got = stream_bytes(&mut ws, id, WINDOW, "the first bytes").await;
    assert_eq!(got.len(), WINDOW, "more than the window before any grant");
    // nothing more without credit: the rest was in the server's socket before
    // the stream opened, so a reader past its credit would have read it and
    // sent it before the server's answer to a heartbeat sent now
    let early = heartbeat_round_trip(&mut ws).await;
    assert!(
        early
            .iter()
            .all(|m| matches!(m, Message::Heartbeat { .. } | Message::HeartbeatAck { .. })),
        "sent past the window: {early:?}"
    );

    ws.send(&Message::window(id, (4 * WINDOW) as u32).unwrap())
        .await;
    while got.len() < sent.len() {
        match next_stream_message(&mut ws, DEADLINE).await {
            Some(Message::Data { data, .. }) => got.extend_from_slice(&data),
            other => panic!("expected the rest, got {other:?}"),
        }
    }
    assert_eq!(got, sent, "the visitor's bytes, in order");
}
