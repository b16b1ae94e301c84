//! The server's control plane over real WebSockets on 127.0.0.1: auth,
//! registration in order, heartbeats, takeover, limits and hostile input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{RawWs, fast_config, free_ports, spawn_server};
use uuid::Uuid;
use zlayer_tunnel::protocol::{Capabilities, Features, Message, ServiceProtocol};

const PATH: &str = "/tunnel/v1";

async fn authed(ws: &mut RawWs, token: &str, client_id: Uuid) -> Uuid {
    let caps = Some(Capabilities::new(Features::ALL));
    ws.send(&Message::auth(token, client_id, caps).unwrap())
        .await;
    let Some(Message::AuthOk {
        tunnel_id,
        capabilities,
    }) = ws.expect().await
    else {
        panic!("no AuthOk");
    };
    assert!(
        capabilities.is_some(),
        "an extended agent gets an extension block"
    );
    assert!(
        matches!(ws.expect().await, Some(Message::Heartbeat { .. })),
        "heartbeat right after AuthOk"
    );
    tunnel_id
}

#[actix_web::test]
async fn auth_register_in_order_and_release_on_close() {
    let (p, last) = free_ports(3);
    let server = spawn_server(fast_config((p, last)), "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    authed(&mut ws, "secret", Uuid::new_v4()).await;
    for (name, port) in [("a", 0), ("b", last), ("c", last), ("d", p - 1), ("e", 0)] {
        ws.send(&Message::register(name, ServiceProtocol::Tcp, 22, port).unwrap())
            .await;
    }
    let mut replies = Vec::new();
    while replies.len() < 5 {
        match ws.expect().await.unwrap() {
            Message::Heartbeat { timestamp } => ws.send(&Message::HeartbeatAck { timestamp }).await,
            other => replies.push(other),
        }
    }
    let ports: Vec<String> = replies
        .iter()
        .map(|m| match m {
            Message::RegisterOk { port, .. } => format!("ok {}", port.unwrap()),
            Message::RegisterFail { reason, .. } => format!("fail {reason}"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        ports,
        [
            format!("ok {p}"),
            format!("ok {last}"),
            format!("fail port {last} is already in use"),
            format!("fail port {} is outside the range {p}-{last}", p - 1),
            format!("ok {}", p + 1),
        ]
    );
    assert_eq!(server.registry.available_ports().await, 0);
    drop(ws);
    common::wait_until("the ports released", || async {
        server.registry.available_ports().await == 3
    })
    .await;
    assert_eq!(server.registry.tunnel_count().await, 0);
}

#[actix_web::test]
async fn a_wrong_token_gets_auth_fail_and_close() {
    let server = spawn_server(fast_config(free_ports(1)), "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    ws.send(&Message::auth("nope", Uuid::new_v4(), None).unwrap())
        .await;
    match ws.expect().await {
        Some(Message::AuthFail { reason, .. }) => {
            assert!(reason.contains("invalid tunnel token"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(ws.closed_within(Duration::from_secs(2)).await);
}

/// One `Auth` on a fresh socket; the `AuthFail` reason, or `None` on `AuthOk`.
async fn try_auth(addr: std::net::SocketAddr, token: &str) -> Option<String> {
    let mut ws = RawWs::connect(addr, PATH).await;
    ws.send(&Message::auth(token, Uuid::new_v4(), None).unwrap())
        .await;
    match ws.expect().await {
        Some(Message::AuthFail { reason, .. }) => Some(reason),
        Some(Message::AuthOk { .. }) => None,
        other => panic!("{other:?}"),
    }
}

#[actix_web::test]
async fn repeated_failures_lock_the_address_out_without_checking_tokens() {
    let server = spawn_server(fast_config(free_ports(1)), "secret");
    for attempt in 1..=zlayer_tunnel::throttle::FREE_FAILURES + 1 {
        let reason = try_auth(server.addr, "guess").await.unwrap();
        assert!(
            reason.contains("invalid tunnel token"),
            "attempt {attempt}: {reason}"
        );
    }
    // locked out: even the right token is refused, unchecked
    let reason = try_auth(server.addr, "secret").await.unwrap();
    assert!(
        reason.contains("too many failed authentications"),
        "{reason}"
    );
    assert!(!reason.contains("secret"));
    // once the lockout (1 s) is over, the right token gets in and clears the record
    let admitted = common::poll_every(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async {
            let reason = try_auth(server.addr, "secret").await;
            if let Some(reason) = &reason {
                assert!(reason.contains("too many"), "{reason}");
            }
            reason.is_none()
        },
    )
    .await;
    assert!(admitted, "still locked out");
    let reason = try_auth(server.addr, "guess").await.unwrap();
    assert!(
        reason.contains("invalid tunnel token"),
        "counting restarted: {reason}"
    );
}

#[actix_web::test]
async fn a_legacy_agent_gets_no_extension() {
    let server = spawn_server(fast_config(free_ports(1)), "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    ws.send(&Message::auth("secret", Uuid::new_v4(), None).unwrap())
        .await;
    let Some(Message::AuthOk { capabilities, .. }) = ws.expect().await else {
        panic!()
    };
    assert_eq!(capabilities, None);
}

#[actix_web::test]
async fn an_unauthenticated_socket_is_closed_at_the_deadline() {
    let mut config = fast_config(free_ports(1));
    config.auth_timeout = Duration::from_millis(300);
    let server = spawn_server(config, "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    assert!(
        ws.closed_within(Duration::from_secs(3)).await,
        "silent socket kept open"
    );
}

#[actix_web::test]
async fn a_silent_agent_is_dropped_and_its_ports_freed() {
    let server = spawn_server(fast_config(free_ports(1)), "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    authed(&mut ws, "secret", Uuid::new_v4()).await;
    ws.send(&Message::register("svc", ServiceProtocol::Tcp, 22, 0).unwrap())
        .await;
    let mut disconnected = false;
    while let Some(m) = ws.expect().await {
        if let Message::Disconnect { reason, .. } = m {
            assert_eq!(reason, "heartbeat timeout");
            disconnected = true;
        }
    }
    assert!(disconnected);
    common::wait_until("the port released", || async {
        server.registry.available_ports().await == 1
    })
    .await;
}

#[actix_web::test]
async fn a_reconnecting_agent_takes_over_its_session() {
    let (p, _) = free_ports(1);
    let server = spawn_server(fast_config((p, p)), "secret");
    let client_id = Uuid::new_v4();
    let mut old = RawWs::connect(server.addr, PATH).await;
    authed(&mut old, "secret", client_id).await;
    old.send(&Message::register("svc", ServiceProtocol::Tcp, 22, p).unwrap())
        .await;
    assert_eq!(register_ok(&mut old).await, p);

    let mut new = RawWs::connect(server.addr, PATH).await;
    authed(&mut new, "secret", client_id).await;
    new.send(&Message::register("svc", ServiceProtocol::Tcp, 22, p).unwrap())
        .await;
    assert_eq!(register_ok(&mut new).await, p);
    let mut reason = String::new();
    while let Some(m) = old.expect().await {
        if let Message::Disconnect { reason: r, .. } = m {
            reason = r;
        }
    }
    assert!(reason.contains("taken over"), "{reason:?}");
}

/// Sends a binary frame header declaring 64 MiB, then up to `payload` bytes
/// of it, 64 KiB at a time through a small send buffer (no autotuning), for
/// at most 3 s; the bytes the server took, and whether a write failed (the
/// server closed the connection).
async fn send_oversized_frame(ws: &mut RawWs, payload: usize) -> (usize, bool) {
    use tokio::io::AsyncWriteExt;
    socket2::SockRef::from(&ws.stream)
        .set_send_buffer_size(64 << 10)
        .unwrap();
    let mut header = vec![0x82, 0x80 | 127];
    header.extend((64u64 << 20).to_be_bytes());
    header.extend([1, 2, 3, 4]);
    ws.stream.write_all(&header).await.unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let mut accepted = 0;
    let failed = tokio::time::timeout(Duration::from_secs(3), async {
        while accepted < payload {
            if ws.stream.write_all(&chunk).await.is_err() {
                return true;
            }
            accepted += chunk.len();
        }
        false
    })
    .await
    .expect("the server stopped reading the refused frame but kept the connection open");
    (accepted, failed)
}

/// The server is the `zlayer-tunnel` binary, a process of its own, so that
/// the memory measured is the server's, not this process's (whose client
/// holds buffers of its own).
#[actix_web::test]
async fn a_64_mib_frame_header_is_refused_and_the_server_still_answers() {
    let range = format!("{0}-{0}", free_ports(1).0);
    let mut server = common::process::Proc::spawn(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--port-range",
        &range,
    ]);
    let control = server.listening_addr("control channel listening");
    let resident_bytes = || common::rss_kib(server.child.id()) * 1024;
    let mut ws = RawWs::connect(control, PATH).await;
    let (before, started) = (resident_bytes(), Instant::now());
    // 48 of the 64 MiB: a server buffering the frame would hold all of it, waiting for the rest
    let (accepted, _) = send_oversized_frame(&mut ws, 48 << 20).await;
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "the server's memory grew by {grown} bytes as it took {accepted} bytes of a refused frame"
    );
    // actix-web reads and discards what follows for its client-disconnect
    // timeout (1 s by default), then closes
    assert!(ws.closed_within(Duration::from_secs(3)).await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed {:?} after the header",
        started.elapsed()
    );
    // and the next agent is served
    let mut next = RawWs::connect(control, PATH).await;
    authed(&mut next, common::process::TOKEN, Uuid::new_v4()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_frame_header_on_a_raw_socket_closes_it_at_once() {
    let (p, _) = free_ports(1);
    let addr = raw_server(fast_config((p, p))).await;
    let mut ws = RawWs::connect(addr, PATH).await;
    let (accepted, refused) = send_oversized_frame(&mut ws, 16 << 20).await;
    assert!(refused, "the server took all 16 MiB of a refused frame");
    assert!(
        accepted < 1 << 20,
        "the server took {accepted} bytes of a refused frame before closing"
    );
    assert!(ws.closed_within(Duration::from_secs(1)).await);
}

#[actix_web::test]
async fn garbage_after_auth_ends_that_session_only() {
    let (p, last) = free_ports(2);
    let server = spawn_server(fast_config((p, last)), "secret");
    let mut good = RawWs::connect(server.addr, PATH).await;
    authed(&mut good, "secret", Uuid::new_v4()).await;
    let mut bad = RawWs::connect(server.addr, PATH).await;
    authed(&mut bad, "secret", Uuid::new_v4()).await;
    bad.send_raw(b"\x99garbage").await;
    let mut saw_disconnect = false;
    while let Some(m) = bad.expect().await {
        saw_disconnect |= matches!(m, Message::Disconnect { ref reason, .. } if reason.contains("protocol error"));
    }
    assert!(saw_disconnect);
    good.send(&Message::register("svc", ServiceProtocol::Tcp, 22, 0).unwrap())
        .await;
    loop {
        match good.expect().await.unwrap() {
            Message::RegisterOk { port, .. } => break assert_eq!(port, Some(p)),
            Message::Heartbeat { timestamp } => {
                good.send(&Message::HeartbeatAck { timestamp }).await
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Connections that never authenticate hold a bounded number of places:
/// `max_unauthenticated_per_address` from one address, `max_unauthenticated`
/// in all. A newcomer is never refused: the oldest of its address (when that
/// has its share), or of all, is closed with code 1013 and the reason. A
/// place comes back when its connection authenticates or closes, and an
/// authenticated connection is never dropped for a newcomer.
async fn unauthenticated_connections_are_bounded(addr: std::net::SocketAddr, token: &str) {
    let from = |last: u8| std::net::IpAddr::from([127, 0, 0, last]);
    let upgrade = |last: u8| async move {
        RawWs::try_connect_from(addr, PATH, from(last))
            .await
            .unwrap_or_else(|refused| panic!("a newcomer was refused: {refused}"))
    };
    let mut a1 = upgrade(1).await;
    let mut a2 = upgrade(1).await;
    let mut a3 = upgrade(1).await;
    // 127.0.0.1 has its share (3): its oldest makes room
    let _a4 = upgrade(1).await;
    assert_dropped_to_make_room(&mut a1).await;
    let mut b1 = upgrade(2).await;
    let _b2 = upgrade(2).await;
    // every place (5) taken: the oldest of all makes room, whatever its address
    let _c1 = upgrade(3).await;
    assert_dropped_to_make_room(&mut a2).await;
    // authenticating gives the place back; an authenticated session stays
    authed(&mut b1, token, Uuid::new_v4()).await;
    let _c2 = upgrade(3).await; // takes b1's place: nobody dropped
    let _d: Vec<_> = futures::future::join_all([4, 4, 5, 5].map(upgrade)).await;
    assert_dropped_to_make_room(&mut a3).await;
    b1.send(&Message::register("b1", ServiceProtocol::Tcp, 53, 0).unwrap())
        .await;
    register_ok(&mut b1).await;
}

/// The connection is closed with 1013 (try again later) and says why.
async fn assert_dropped_to_make_room(ws: &mut RawWs) {
    let close = tokio::time::timeout(common::DEADLINE, async {
        loop {
            match ws.frame().await {
                Some((8, payload)) => break Some(payload),
                Some(_) => {}
                None => break None,
            }
        }
    })
    .await
    .expect("the oldest connection awaiting authentication was not dropped")
    .expect("closed without a close frame");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1013);
    let reason = String::from_utf8_lossy(&close[2..]);
    assert!(
        reason.contains("the oldest was dropped to make room"),
        "{reason}"
    );
}

/// A squatter on the only place cannot keep an agent out: the agent takes
/// its place and publishes.
#[actix_web::test]
async fn an_agent_gets_in_past_a_squatter_on_the_only_place() {
    let (p, _) = free_ports(1);
    let mut config = fast_config((p, p));
    config.max_unauthenticated = 1;
    let server = spawn_server(config, "secret");
    let mut squatter = RawWs::connect(server.addr, PATH).await;
    let echo = common::services::echo().await;
    let services = vec![zlayer_tunnel::ServiceConfig::tcp("e", echo)];
    let (agent, _task, published) = common::spawn_published(server.addr, "secret", services);
    assert_eq!(published.port(1).await, p);
    assert_dropped_to_make_room(&mut squatter).await;
    assert!(agent.status().connected);
    agent.stop();
}

fn few_unauthenticated(port: u16) -> zlayer_tunnel::TunnelServerConfig {
    let mut config = fast_config((port, port));
    config.max_unauthenticated = 5;
    config.max_unauthenticated_per_address = 3;
    config
}

#[actix_web::test]
async fn unauthenticated_connections_are_bounded_on_a_mounted_route() {
    let (p, _) = free_ports(1);
    let server = spawn_server(few_unauthenticated(p), "secret");
    unauthenticated_connections_are_bounded(server.addr, "secret").await;
    // what `/status` and `/metrics` report: the connections dropped, and no
    // place left taken once they are all closed
    let evicted = zlayer_tunnel::log_limit::RemoteEvent::AuthEvicted.index();
    assert_eq!(server.registry.guards().remote_events[evicted], 6);
    common::wait_until("no place taken", || async {
        server.registry.guards().awaiting_auth == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_bounded_on_raw_sockets() {
    let (p, _) = free_ports(1);
    let addr = raw_server(few_unauthenticated(p)).await;
    unauthenticated_connections_are_bounded(addr, "anything").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_connection_serves_raw_sockets_from_plain_tokio() {
    let (p, _) = free_ports(1);
    let addr = raw_server(fast_config((p, p))).await;
    let mut ws = RawWs::connect(addr, PATH).await;
    authed(&mut ws, "anything", Uuid::new_v4()).await;
    ws.send(&Message::register("svc", ServiceProtocol::Tcp, 53, 0).unwrap())
        .await;
    assert_eq!(register_ok(&mut ws).await, p);
}

/// A server on plain tokio: `handle_connection` for each accepted socket; any token goes.
async fn raw_server(config: zlayer_tunnel::TunnelServerConfig) -> std::net::SocketAddr {
    let registry = std::sync::Arc::new(zlayer_tunnel::TunnelRegistry::new(config.data_port_range));
    let handler = zlayer_tunnel::ControlHandler::new(
        registry,
        config,
        std::sync::Arc::new(zlayer_tunnel::accept_all_tokens),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle_connection(stream, peer).await });
        }
    });
    addr
}

/// The next `RegisterOk`'s port, answering heartbeats on the way.
async fn register_ok(ws: &mut RawWs) -> u16 {
    loop {
        match ws.expect().await {
            Some(Message::RegisterOk {
                port: Some(port), ..
            }) => return port,
            Some(Message::Heartbeat { timestamp }) => {
                ws.send(&Message::HeartbeatAck { timestamp }).await
            }
            other => panic!("expected RegisterOk, got {other:?}"),
        }
    }
}

/// The next message other than a `Heartbeat` (answered on the way).
async fn next_reply(ws: &mut RawWs) -> Message {
    loop {
        match ws.expect().await {
            Some(Message::Heartbeat { timestamp }) => {
                ws.send(&Message::HeartbeatAck { timestamp }).await
            }
            Some(other) => return other,
            None => panic!("closed while waiting for a reply"),
        }
    }
}

/// A token scoped to some public ports gets only those: port 0 takes the
/// lowest free one of them, a port outside them is refused naming them, and
/// a full scope says so; other tokens are unaffected.
#[actix_web::test]
async fn a_token_scoped_to_ports_gets_only_those() {
    use zlayer_tunnel::{TokenScope, TokenStore, hash_token};
    let (p, last) = free_ports(4);
    let scope = TokenScope {
        ports: Some(vec![(p + 1, p + 2)]),
        ..TokenScope::default()
    };
    let store = TokenStore::new()
        .with_hash(&hash_token("tenant"), scope)
        .unwrap()
        .with_token("other");
    let server = common::spawn_server_with_tokens(fast_config((p, last)), store);
    let mut tenant = RawWs::connect(server.addr, PATH).await;
    authed(&mut tenant, "tenant", Uuid::new_v4()).await;
    let register = |name: &'static str, port: u16| {
        Message::register(name, ServiceProtocol::Tcp, 22, port).unwrap()
    };
    tenant.send(&register("outside", p)).await;
    match next_reply(&mut tenant).await {
        Message::RegisterFail { reason, .. } => assert_eq!(
            reason,
            format!(
                "token may not use port {p} (its ports: {}-{})",
                p + 1,
                p + 2
            )
        ),
        other => panic!("{other:?}"),
    }
    tenant.send(&register("a", 0)).await;
    assert_eq!(register_ok(&mut tenant).await, p + 1);
    tenant.send(&register("b", p + 2)).await;
    assert_eq!(register_ok(&mut tenant).await, p + 2);
    tenant.send(&register("c", 0)).await;
    match next_reply(&mut tenant).await {
        Message::RegisterFail { reason, .. } => assert!(
            reason.contains(&format!(
                "no free port among those this token may use ({}-{})",
                p + 1,
                p + 2
            )),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    let mut other = RawWs::connect(server.addr, PATH).await;
    authed(&mut other, "other", Uuid::new_v4()).await;
    other.send(&register("d", 0)).await;
    assert_eq!(register_ok(&mut other).await, p);
}

#[actix_web::test]
async fn a_registration_over_max_services_per_tunnel_is_refused_naming_the_limit() {
    let (p, last) = free_ports(3);
    let mut config = fast_config((p, last));
    config.max_services_per_tunnel = 2;
    let server = spawn_server(config, "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    authed(&mut ws, "secret", Uuid::new_v4()).await;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        ws.send(&Message::register(name, ServiceProtocol::Tcp, 22, 0).unwrap())
            .await;
        match next_reply(&mut ws).await {
            Message::RegisterOk { service_id, .. } => ids.push(service_id),
            other => panic!("{other:?}"),
        }
    }
    ws.send(&Message::register("c", ServiceProtocol::Tcp, 22, 0).unwrap())
        .await;
    match next_reply(&mut ws).await {
        Message::RegisterFail { reason, .. } => assert!(
            reason.contains("limit of 2 services"),
            "the reason does not name the limit: {reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.registry.available_ports().await, 1);
    // the session goes on; a freed slot takes the next registration
    ws.send(&Message::Unregister { service_id: ids[0] }).await;
    ws.send(&Message::register("c", ServiceProtocol::Tcp, 22, 0).unwrap())
        .await;
    assert!(matches!(
        next_reply(&mut ws).await,
        Message::RegisterOk { .. }
    ));
}

#[actix_web::test]
async fn a_service_name_is_one_service_in_a_tunnel_and_a_replica_across_agents() {
    let server = spawn_server(fast_config(free_ports(3)), "secret");
    let mut first = RawWs::connect(server.addr, PATH).await;
    authed(&mut first, "secret", Uuid::new_v4()).await;
    let ssh = Message::register("ssh", ServiceProtocol::Tcp, 22, 0).unwrap();
    first.send(&ssh).await;
    let Message::RegisterOk { port, .. } = next_reply(&mut first).await else {
        panic!("the first registration of a name is taken");
    };
    // the same agent asks again: refused, naming the service
    first.send(&ssh).await;
    match next_reply(&mut first).await {
        Message::RegisterFail { reason, .. } => {
            assert!(
                reason.contains("\"ssh\" is already registered by this agent"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // another agent of the same token: a replica, on the same port
    // (another token is refused: tests/replicas.rs)
    let mut second = RawWs::connect(server.addr, PATH).await;
    authed(&mut second, "secret", Uuid::new_v4()).await;
    second.send(&ssh).await;
    match next_reply(&mut second).await {
        Message::RegisterOk { port: joined, .. } => assert_eq!(joined, port),
        other => panic!("{other:?}"),
    }
}

#[actix_web::test]
async fn an_agent_over_max_tunnels_gets_auth_fail_with_the_reason() {
    let mut config = fast_config(free_ports(1));
    config.max_tunnels = 1;
    config.heartbeat_timeout = Duration::from_secs(30); // the first agent answers no heartbeat
    let server = spawn_server(config, "secret");
    let mut first = RawWs::connect(server.addr, PATH).await;
    authed(&mut first, "secret", Uuid::new_v4()).await;
    let mut second = RawWs::connect(server.addr, PATH).await;
    second
        .send(&Message::auth("secret", Uuid::new_v4(), None).unwrap())
        .await;
    match second.expect().await {
        Some(Message::AuthFail { reason, .. }) => assert!(
            reason.contains("limit of 1 tunnels"),
            "the reason does not name the limit: {reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(second.closed_within(Duration::from_secs(2)).await);
    assert_eq!(server.registry.tunnel_count().await, 1);
    // once the first agent leaves, the next one gets in
    drop(first);
    common::wait_until("the first tunnel gone", || async {
        server.registry.tunnel_count().await == 0
    })
    .await;
    let mut third = RawWs::connect(server.addr, PATH).await;
    authed(&mut third, "secret", Uuid::new_v4()).await;
}

#[actix_web::test]
async fn a_visitor_over_max_connections_per_service_is_closed_and_the_others_keep_working() {
    let (p, _) = free_ports(1);
    let mut config = fast_config((p, p));
    config.max_connections_per_service = 2;
    let server = spawn_server(config, "secret");
    let echo = common::services::echo().await;
    let (agent, _task, published) = common::spawn_published(
        server.addr,
        "secret",
        vec![zlayer_tunnel::ServiceConfig::tcp("e", echo).with_remote_port(p)],
    );
    // no readiness probe on the port: its stream could take a slot
    published.wait(1).await;
    let active = || async {
        let tunnels = server.registry.list_tunnels().await;
        tunnels[0].services[0].stats.connections_active
    };
    let mut first = visit(p).await;
    ping(&mut first, 1).await;
    let mut second = visit(p).await;
    ping(&mut second, 2).await;

    let mut third = visit(p).await;
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::io::AsyncReadExt::read(&mut third, &mut buf).await
    })
    .await
    .expect("the visitor over the limit was left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    ping(&mut first, 3).await;
    ping(&mut second, 4).await;
    // a closed visitor frees its slot
    drop(first);
    common::wait_until("one connection active", || async { active().await == 1 }).await;
    let mut fourth = visit(p).await;
    ping(&mut fourth, 5).await;
    agent.stop();
}

async fn visit(port: u16) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap()
}

/// One small round trip through an echo.
async fn ping(visitor: &mut tokio::net::TcpStream, seed: u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let msg = [seed; 64];
    visitor.write_all(&msg).await.unwrap();
    let mut back = [0u8; 64];
    tokio::time::timeout(common::DEADLINE, visitor.read_exact(&mut back))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(back, msg);
}

#[actix_web::test]
async fn a_legacy_agent_answering_heartbeats_keeps_its_port_until_it_falls_silent() {
    let (p, _) = free_ports(1);
    let config = fast_config((p, p));
    let timeout = config.heartbeat_timeout; // 600 ms
    let server = spawn_server(config, "secret");
    let mut ws = RawWs::connect(server.addr, PATH).await;
    // the seed's Auth: no capability bytes after the client id
    ws.auth_legacy("secret").await;
    ws.send(&Message::register("legacy", ServiceProtocol::Tcp, 22, 0).unwrap())
        .await;
    assert_eq!(register_ok(&mut ws).await, p);

    // it answers each Heartbeat with a HeartbeatAck, and sends nothing
    // else, for 2.5 heartbeat timeouts: the time it stays is what is tested
    let until = Instant::now() + timeout * 5 / 2;
    let mut answered = 0;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, ws.message()).await {
            Err(_) => break,
            Ok(Some(Message::Heartbeat { timestamp })) => {
                ws.send(&Message::HeartbeatAck { timestamp }).await;
                answered += 1;
            }
            Ok(other) => panic!("the legacy agent got {other:?} while answering heartbeats"),
        }
    }
    assert!(
        answered >= 5,
        "{answered} heartbeats in {:?}",
        timeout * 5 / 2
    );
    let tunnels = server.registry.list_tunnels().await;
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].ports, [p]);
    // it listens (since before its RegisterOk)
    tokio::net::TcpStream::connect(("127.0.0.1", p))
        .await
        .expect("the legacy agent's port is closed");

    // now silent: dropped within the timeout, plus a heartbeat tick
    let silent = Instant::now();
    let mut reason = None;
    while let Some(m) = ws.expect().await {
        if let Message::Disconnect { reason: r, .. } = m {
            reason = Some(r);
        }
    }
    let took = silent.elapsed();
    assert_eq!(reason.as_deref(), Some("heartbeat timeout"));
    assert!(
        took < Duration::from_secs(2),
        "dropped {took:?} after falling silent"
    );
    assert!(common::wait_closed(p, Duration::from_secs(1)).await);
    assert_eq!(server.registry.tunnel_count().await, 0);
}

/// At the limit of tunnels, an agent without a link displaces another
/// agent's extra link (`connections = 2`): that agent keeps serving on its
/// other link, the newcomer serves too, and the displaced link waits its
/// turn (refused while the server stays at its limit).
#[actix_web::test]
async fn at_the_limit_of_tunnels_an_extra_link_gives_way_to_an_agent_without_one() {
    use zlayer_tunnel::{ServiceConfig, TunnelAgent, TunnelState};
    let (low, high) = free_ports(2);
    let mut config = fast_config((low, high));
    config.max_tunnels = 2;
    let server = spawn_server(config, "t");
    let (echo_a, echo_b) = (
        common::services::echo().await,
        common::services::echo().await,
    );
    let a_service = ServiceConfig::tcp("a", echo_a).with_remote_port(low);
    let a_config = common::agent_config(server.addr, "t", vec![a_service]).with_connections(2);
    let (a, _a_task) = common::run_agent(TunnelAgent::new(a_config));
    let connected =
        |l: &zlayer_tunnel::status::LinkStatus| matches!(l.state, TunnelState::Connected { .. });
    common::wait_until("both of A's links registered", || async {
        a.status().links.iter().all(connected)
    })
    .await;
    assert_eq!(server.registry.tunnel_count().await, 2);

    let b_service = ServiceConfig::tcp("b", echo_b).with_remote_port(high);
    let (b, _b_task, b_published) = common::spawn_published(server.addr, "t", vec![b_service]);
    b_published.wait(1).await;
    let states = || {
        let links = a.status().links;
        let up = |l: &&zlayer_tunnel::status::LinkStatus| connected(l);
        let waiting = |l: &&zlayer_tunnel::status::LinkStatus| {
            matches!(
                l.state,
                TunnelState::Reconnecting { .. } | TunnelState::Connecting
            )
        };
        (
            links.iter().filter(up).count(),
            links.iter().filter(waiting).count(),
        )
    };
    common::wait_until("one of A's links gave way", || async { states() == (1, 1) }).await;
    common::echo_through(([127, 0, 0, 1], low).into(), 1, 256 << 10).await;
    common::echo_through(([127, 0, 0, 1], high).into(), 2, 256 << 10).await;
    assert_eq!(server.registry.tunnel_count().await, 2);
    assert!(matches!(b.status().state, TunnelState::Connected { .. }));
    a.stop();
    b.stop();
}
