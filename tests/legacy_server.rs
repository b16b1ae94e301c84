//! Our agent against an original (control-plane only) server: it must
//! authenticate, register, answer heartbeats, and never send a message type
//! the server did not announce. The "original server" here is a minimal
//! WebSocket server that speaks only the seed's 13 messages and answers
//! without extension bytes, as the original does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::DEADLINE;
use common::raw_server::{accept_upgrade, read_frame, write_frame};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use uuid::Uuid;
use zlayer_tunnel::protocol::Message;
use zlayer_tunnel::{ServiceConfig, TunnelState};

/// Accepts one agent and answers like the original server (with a
/// `Heartbeat` of its own after `AuthOk`); reports every message it gets.
async fn original_server(listener: TcpListener, seen: mpsc::UnboundedSender<Message>) {
    let (socket, _) = listener.accept().await.unwrap();
    answer_as_original(socket, seen, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_works_the_control_plane_of_an_original_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(original_server(listener, tx));
    let (agent, _task) = common::spawn_agent(
        addr,
        "token",
        vec![ServiceConfig::tcp("ssh", 22).with_remote_port(2222)],
    );

    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let answered = |got: &[Message]| {
        got.iter()
            .any(|m| matches!(m, Message::HeartbeatAck { timestamp: 42 }))
    };
    let registered = |got: &[Message]| {
        got.iter().any(
            |m| matches!(m, Message::Register { name, remote_port: 2222, .. } if name == "ssh"),
        )
    };
    let own_heartbeats = |got: &[Message]| {
        got.iter()
            .filter(|m| matches!(m, Message::Heartbeat { .. }))
            .count()
    };
    let mut next = async |got: &mut Vec<Message>| {
        let m = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .expect("agent went quiet")
            .unwrap();
        got.push(m);
    };
    while !(answered(&got) && registered(&got) && own_heartbeats(&got) > 0) {
        next(&mut got).await;
    }
    assert!(
        matches!(got[0], Message::Auth { .. }),
        "first message: {:?}",
        got[0]
    );
    // anything else it would send about the above leaves before its next two
    // heartbeats (its frames go out in order): those, not a time, bound the wait
    let enough = own_heartbeats(&got) + 2;
    while own_heartbeats(&got) < enough {
        next(&mut got).await;
    }
    for m in &got {
        assert!(
            m.message_type().required_feature().is_empty(),
            "sent {m:?} to a server that did not announce it"
        );
    }
    agent.stop();
}

/// Accepts agents; answers the first one's Auth, then goes silent without
/// closing (a server that vanished without a FIN). Reports each new connection.
async fn silent_server(listener: TcpListener, connections: mpsc::UnboundedSender<()>) {
    let mut held = Vec::new();
    while let Ok((mut socket, _)) = listener.accept().await {
        connections.send(()).unwrap();
        let mut buf = accept_upgrade(&mut socket).await;
        let _auth = read_frame(&mut socket, &mut buf).await.unwrap();
        let ok = Message::AuthOk {
            tunnel_id: Uuid::new_v4(),
            capabilities: None,
        };
        write_frame(&mut socket, &ok.encode()).await;
        held.push(socket); // never read or written again, never closed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_leaves_a_server_that_went_silent_and_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut connections) = mpsc::unbounded_channel();
    tokio::spawn(silent_server(listener, tx));
    // heartbeat timeout 2 s (common::spawn_agent)
    let (agent, _task) = common::spawn_agent(addr, "token", vec![]);
    tokio::time::timeout(DEADLINE, connections.recv())
        .await
        .unwrap()
        .unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(DEADLINE, connections.recv())
        .await
        .expect("the agent never left the silent server")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "left after {waited:?}, before the heartbeat timeout"
    );
    agent.stop();
}

/// Accepts agents, authenticates them, refuses every registration; reports
/// each message with when it arrived.
async fn refusing_server(
    listener: TcpListener,
    seen: mpsc::UnboundedSender<(tokio::time::Instant, Message)>,
) {
    let (mut socket, _) = listener.accept().await.unwrap();
    let mut buf = accept_upgrade(&mut socket).await;
    while let Some(payload) = read_frame(&mut socket, &mut buf).await {
        let (message, _) = Message::decode(&payload).unwrap();
        let reply = match &message {
            Message::Auth { .. } => Some(Message::AuthOk {
                tunnel_id: Uuid::new_v4(),
                capabilities: None,
            }),
            Message::Register { .. } => Some(Message::register_fail("port 2222 is taken").unwrap()),
            _ => None,
        };
        let _ = seen.send((tokio::time::Instant::now(), message));
        if let Some(m) = reply {
            write_frame(&mut socket, &m.encode()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_is_retried_on_backoff_without_reconnecting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(refusing_server(listener, tx));
    // reconnect interval 50 ms, at most 500 ms (common::spawn_agent)
    let (agent, _task) = common::spawn_agent(
        addr,
        "token",
        vec![ServiceConfig::tcp("ssh", 22).with_remote_port(2222)],
    );
    let mut registers = Vec::new();
    let mut auths = 0;
    while registers.len() < 6 {
        let (at, m) = tokio::time::timeout(DEADLINE, seen.recv())
            .await
            .expect("agent went quiet")
            .unwrap();
        match m {
            Message::Register { .. } => registers.push(at),
            Message::Auth { .. } => auths += 1,
            _ => {}
        }
    }
    agent.stop();
    let gaps: Vec<Duration> = registers.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        auths, 1,
        "the agent reconnected instead of retrying: {gaps:?}"
    );
    assert!(
        gaps[0] < Duration::from_millis(200) && gaps[4] >= Duration::from_millis(200),
        "retries do not back off: {gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(25)),
        "{gaps:?}"
    );
}

/// A data-plane server's first steps: an agent for one TCP service on
/// `service_port` connects and is upgraded; returns the agent, its socket, the
/// bytes read past the upgrade, and the capabilities to answer with (`STREAMS`
/// and `window`).
async fn agent_of_a_streams_server(
    name: &str,
    service_port: u16,
    window: u32,
) -> (
    zlayer_tunnel::TunnelAgent,
    common::AgentTask,
    TcpStream,
    BytesMut,
    zlayer_tunnel::protocol::Capabilities,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (agent, task) = common::spawn_agent(
        addr,
        "token",
        vec![ServiceConfig::tcp(name, service_port).with_remote_port(2222)],
    );
    let (socket, buf, caps) = upgraded(&listener, window).await;
    (agent, task, socket, buf, caps)
}

/// The first agent on `listener`, upgraded: its socket, the bytes read past
/// the upgrade, and the capabilities to answer with (`STREAMS` and `window`).
async fn upgraded(
    listener: &TcpListener,
    window: u32,
) -> (TcpStream, BytesMut, zlayer_tunnel::protocol::Capabilities) {
    let (mut socket, _) = listener.accept().await.unwrap();
    let buf = accept_upgrade(&mut socket).await;
    let caps = zlayer_tunnel::protocol::Capabilities {
        features: zlayer_tunnel::protocol::Features::STREAMS,
        initial_window: window,
    };
    (socket, buf, caps)
}

/// Credit windows bound what a truthful server lets the agent send. This
/// server grants 2 GiB windows, opens four streams to a service that writes
/// as fast as it can, and from then on reads nothing (it keeps sending
/// heartbeats, so the agent stays): the agent's read gate must stop reading
/// its local sockets instead of queueing for the WebSocket without bound.
/// The agent is the `zlayer-tunnel` binary, a process of its own, so that
/// the memory measured is the agent's, not this process's (whose service and
/// fake server hold buffers of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lies_about_its_window_cannot_make_the_agent_buffer() {
    const PER_STREAM: u64 = 256 << 20;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_port = service.local_addr().unwrap().port();
    let counted = written.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = service.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let chunk = vec![3u8; 1 << 20];
                for _ in 0..PER_STREAM >> 20 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                    counted.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                s
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/tunnel/v1", listener.local_addr().unwrap());
    let spec = format!("bulk:{service_port}:2222");
    // one link: this server serves the first connection it accepts
    let args = [
        "agent",
        "--server",
        &url,
        "--connections",
        "1",
        "--tcp",
        &spec,
    ];
    let agent = common::process::Proc::spawn(&args);
    let (mut socket, mut buf, caps) = upgraded(&listener, i32::MAX as u32).await;
    let mut service_id = None;
    while service_id.is_none() {
        let payload = read_frame(&mut socket, &mut buf).await.unwrap();
        match Message::decode(&payload).unwrap().0 {
            Message::Auth { .. } => {
                let ok = Message::AuthOk {
                    tunnel_id: Uuid::new_v4(),
                    capabilities: Some(caps),
                };
                write_frame(&mut socket, &ok.encode()).await;
            }
            Message::Register { .. } => {
                let id = Uuid::new_v4();
                let ok = Message::RegisterOk {
                    service_id: id,
                    port: Some(2222),
                };
                write_frame(&mut socket, &ok.encode()).await;
                service_id = Some(id);
            }
            _ => {}
        }
    }
    let pid = agent.child.id();
    let idle = common::rss_kib(pid);
    for _ in 0..4 {
        let connect = Message::connect(service_id.unwrap(), Uuid::new_v4(), "127.0.0.1:9").unwrap();
        write_frame(&mut socket, &connect.encode()).await;
    }
    // from here on nothing is read; heartbeats keep the agent's liveness
    let heartbeats = tokio::spawn(async move {
        loop {
            let beat = Message::Heartbeat { timestamp: 1 };
            write_frame(&mut socket, &beat.encode()).await;
            // the fake server's heartbeat interval, not a wait
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let last = common::wait_stalled(&written, Duration::from_secs(1), "the service").await;
    let grown_mib = common::rss_kib(pid).saturating_sub(idle) >> 10;
    let taken_mib = last >> 20;
    eprintln!("agent RSS +{grown_mib} MiB; the service stalled after {taken_mib} MiB");
    assert!(
        taken_mib < 4 * (PER_STREAM >> 20) / 2,
        "{taken_mib} MiB taken"
    );
    assert!(grown_mib < 48, "the agent's RSS grew by {grown_mib} MiB");
    heartbeats.abort();
    drop(agent);
}

/// Our agent acknowledges a stream (`ConnectAck`) with the next frame it
/// writes rather than in a write of its own: before that stream's first
/// reply, or, for a stream whose service stays silent, by its next
/// heartbeat at the latest. The server here speaks the data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_acknowledged_before_its_first_reply_or_by_the_next_heartbeat() {
    let echo = common::services::echo().await;
    let (agent, _task, mut socket, mut buf, caps) =
        agent_of_a_streams_server("echo", echo, 256 * 1024).await;
    // answers the control plane; returns the next stream message
    let mut service_id = None;
    let next = async |socket: &mut TcpStream, buf: &mut BytesMut, service: &mut Option<Uuid>| loop {
        let payload = read_frame(socket, buf).await.expect("the agent closed");
        let reply = match Message::decode(&payload).unwrap().0 {
            Message::Auth { .. } => Message::AuthOk {
                tunnel_id: Uuid::new_v4(),
                capabilities: Some(caps),
            },
            Message::Register { .. } => {
                let id = Uuid::new_v4();
                *service = Some(id);
                Message::RegisterOk {
                    service_id: id,
                    port: Some(2222),
                }
            }
            Message::Heartbeat { timestamp } => Message::HeartbeatAck { timestamp },
            stream => return stream,
        };
        write_frame(socket, &reply.encode()).await;
    };
    tokio::time::timeout(DEADLINE, async {
        while service_id.is_none() {
            let _ = tokio::time::timeout(
                Duration::from_millis(50),
                next(&mut socket, &mut buf, &mut service_id),
            )
            .await;
        }
    })
    .await
    .expect("no registration");
    let service = service_id.unwrap();

    // a stream whose first bytes come back: the ack, then the echo
    let talking = Uuid::new_v4();
    let connect = Message::connect(service, talking, "127.0.0.1:9").unwrap();
    write_frame(&mut socket, &connect.encode()).await;
    let hello = Message::data(talking, bytes::Bytes::from_static(b"hello")).unwrap();
    write_frame(&mut socket, &hello.encode()).await;
    let first = tokio::time::timeout(DEADLINE, next(&mut socket, &mut buf, &mut service_id))
        .await
        .unwrap();
    assert!(
        matches!(first, Message::ConnectAck { connection_id, .. } if connection_id == talking),
        "expected the ack first, got {first:?}"
    );
    let mut echoed = Vec::new();
    while echoed.len() < 5 {
        match tokio::time::timeout(DEADLINE, next(&mut socket, &mut buf, &mut service_id))
            .await
            .unwrap()
        {
            Message::Data {
                connection_id,
                data,
                ..
            } if connection_id == talking => echoed.extend_from_slice(&data),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    assert_eq!(echoed, b"hello");

    // a stream whose service says nothing: acknowledged by the next heartbeat
    let silent = Uuid::new_v4();
    let connect = Message::connect(service, silent, "127.0.0.1:9").unwrap();
    write_frame(&mut socket, &connect.encode()).await;
    let ack = tokio::time::timeout(
        Duration::from_secs(1), // the agent's heartbeat interval is 200 ms
        next(&mut socket, &mut buf, &mut service_id),
    )
    .await
    .expect("no ConnectAck within a second");
    assert!(
        matches!(ack, Message::ConnectAck { connection_id, .. } if connection_id == silent),
        "expected the ack, got {ack:?}"
    );
    agent.stop();
}

/// What one connection to [`original_servers`] saw: a message, or its end.
type Seen = (usize, Option<Message>);

/// Accepts agents, each connection numbered in order, and answers each like
/// the original server (no `Heartbeat` of its own); reports every message with its connection's number,
/// and `None` when a connection ends.
async fn original_servers(listener: TcpListener, seen: mpsc::UnboundedSender<Seen>) {
    let mut number = 0;
    while let Ok((socket, _)) = listener.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let serve = answer_as_original(socket, tx, false);
            let forward = async {
                while let Some(m) = rx.recv().await {
                    let _ = seen.send((number, Some(m)));
                }
            };
            tokio::join!(serve, forward);
            let _ = seen.send((number, None));
        });
        number += 1;
    }
}

/// Answers the agent on `socket` as the original server does, a
/// `Heartbeat` after `AuthOk` when `heartbeat` says; reports every message.
async fn answer_as_original(
    mut socket: TcpStream,
    seen: mpsc::UnboundedSender<Message>,
    heartbeat: bool,
) {
    let mut buf = accept_upgrade(&mut socket).await;
    while let Some(payload) = read_frame(&mut socket, &mut buf).await {
        let (message, _) = Message::decode(&payload).unwrap();
        let reply = match &message {
            Message::Auth { .. } => vec![
                Message::AuthOk {
                    tunnel_id: Uuid::new_v4(),
                    capabilities: None,
                },
                Message::Heartbeat { timestamp: 42 },
            ],
            Message::Register { .. } => vec![Message::RegisterOk {
                service_id: Uuid::new_v4(),
                port: None,
            }],
            Message::Heartbeat { timestamp } => vec![Message::HeartbeatAck {
                timestamp: *timestamp,
            }],
            _ => vec![],
        };
        let _ = seen.send(message);
        let own = |m: &Message| heartbeat || !matches!(m, Message::Heartbeat { .. });
        for m in reply.iter().filter(|m| own(m)) {
            write_frame(&mut socket, &m.encode()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_connection_to_an_original_server_stands_down_and_the_first_carries_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(original_servers(listener, tx));
    let config = common::agent_config(
        addr,
        "token",
        vec![ServiceConfig::tcp("ssh", 22).with_remote_port(2222)],
    )
    .with_connections(2);
    let (agent, task) = common::run_agent(zlayer_tunnel::TunnelAgent::new(config));

    // both links authenticate; the server announces no LINKS: one registers,
    // the other closes having sent nothing but its Auth
    let mut got: Vec<Seen> = Vec::new();
    let of = |got: &[Seen], n: usize| -> Vec<Option<Message>> {
        (got.iter().filter(|(c, _)| *c == n))
            .map(|(_, m)| m.clone())
            .collect()
    };
    let registered = |got: &[Seen]| {
        (got.iter()).find_map(|(c, m)| matches!(m, Some(Message::Register { .. })).then_some(*c))
    };
    let heartbeats = |got: &[Seen], n: usize| {
        (of(got, n).iter())
            .filter(|m| matches!(m, Some(Message::Heartbeat { .. })))
            .count()
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut next = async |got: &mut Vec<Seen>| {
        let m = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .unwrap_or_else(|_| panic!("no extra connection stood down: {got:?}"))
            .unwrap();
        got.push(m);
    };
    let stood_down = |got: &[Seen]| got.iter().any(|(_, m)| m.is_none());
    while registered(&got).is_none() || !stood_down(&got) {
        next(&mut got).await;
    }
    let first = registered(&got).unwrap();
    let (other, _) = *got.iter().find(|(_, m)| m.is_none()).unwrap();
    assert_ne!(first, other, "{got:?}");
    let others = of(&got, other);
    assert!(
        matches!(others.as_slice(), [Some(Message::Auth { .. }), None]),
        "the extra connection sent more than its Auth: {others:?}"
    );
    // it is not retried: a retry (50 ms apart here) would come before two
    // more heartbeats of the first link (200 ms apart)
    let enough = heartbeats(&got, first) + 2;
    while heartbeats(&got, first) < enough {
        next(&mut got).await;
    }
    let connections: std::collections::HashSet<usize> = got.iter().map(|(c, _)| *c).collect();
    assert_eq!(connections.len(), 2, "a third connection: {got:?}");
    let status = agent.status();
    let links: Vec<_> = (status.links.iter())
        .map(|l| (l.connection, l.state.clone()))
        .collect();
    assert!(
        matches!(
            links.as_slice(),
            [
                (0, TunnelState::Connected { .. }),
                (1, TunnelState::Stopped)
            ]
        ),
        "{links:?}"
    );
    agent.stop();
    let ended = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    assert!(ended.is_ok(), "{ended:?}");
}
