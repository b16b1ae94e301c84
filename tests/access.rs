//! On-demand access sessions: through a tunnel server to the agent that
//! registered the endpoint (relay), or dialed directly; checksummed transfers
//! with exact accounting, and the TTL enforced live: at expiry the listener
//! closes and an open connection is closed mid-transfer after the grace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    DEADLINE, echo_through, fast_config, free_ports, services, spawn_published, spawn_server,
    spawn_server_with_tokens, wait_closed,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zlayer_tunnel::AccessManager;

#[actix_web::test]
async fn a_session_carries_bytes_both_ways_and_counts_them_exactly() {
    let echo = services::echo().await;
    let manager =
        std::sync::Arc::new(AccessManager::new().with_default_ttl(Duration::from_secs(60)));
    let session = manager
        .start_session("echo".into(), format!("127.0.0.1:{echo}"), None, None)
        .await
        .unwrap();
    let len = echo_through(session.local_addr, 11, 5 << 20).await;

    common::wait_until("the connection closed", || {
        let info = manager.list_sessions().pop().unwrap();
        std::future::ready(info.stats.connections_active == 0)
    })
    .await;
    let info = manager.list_sessions().pop().unwrap();
    assert_eq!(info.endpoint, "echo");
    assert_eq!(info.remote_addr, format!("127.0.0.1:{echo}"));
    assert_eq!((info.stats.bytes_in, info.stats.bytes_out), (len, len));
    assert_eq!(info.stats.connections_total, 1);
    assert!(info.remaining.unwrap() > Duration::from_secs(50));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let idle_ms = now_ms.saturating_sub(info.stats.last_activity_ms);
    assert!(idle_ms < 60_000, "last activity {idle_ms} ms ago");
    // the same figures on the admin endpoints
    let admin = free_ports(1).0;
    let server = manager
        .serve_admin(&[([127, 0, 0, 1], admin).into()])
        .unwrap();
    actix_web::rt::spawn(server);
    let metrics = common::http_get(&format!("http://127.0.0.1:{admin}/metrics")).await;
    let line = format!(
        "zlayer_tunnel_access_session_bytes_total{{session=\"{}\",endpoint=\"echo\",local=\"{}\",direction=\"in\"}} {len}",
        info.id, info.local_addr
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    assert!(manager.end_session(info.id));
    assert!(wait_closed(session.local_addr.port(), DEADLINE).await);
    assert!(manager.list_sessions().is_empty());
}

#[actix_web::test]
async fn the_ttl_closes_the_listener_and_open_connections_mid_transfer() {
    let echo = services::echo().await;
    let manager = AccessManager::new().with_grace(Duration::from_millis(200));
    let session = manager
        .start_session(
            "echo".into(),
            format!("127.0.0.1:{echo}"),
            None,
            Some(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(session.local_addr)
        .await
        .unwrap();
    // a transfer that would outlive the session: 16 KiB every 20 ms, echoed
    let transfer = async {
        let chunk = [7u8; 16 * 1024];
        let mut back = vec![0u8; chunk.len()];
        loop {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            match s.read_exact(&mut back).await {
                // the pace of the transfer (what is tested), not a wait
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => return,
            }
        }
    };
    tokio::time::timeout(DEADLINE, transfer)
        .await
        .expect("the open connection outlived its session");
    assert!(
        wait_closed(session.local_addr.port(), DEADLINE).await,
        "listener still open"
    );
    let info = manager.list_sessions().pop().unwrap();
    assert!(info.expired && info.remaining.is_none(), "{info:?}");
    assert!(info.stats.bytes_in > 0, "nothing crossed before the expiry");
    assert_eq!(manager.cleanup_expired(), 1);
    assert!(manager.list_sessions().is_empty());
}

#[actix_web::test]
async fn a_session_through_the_server_reaches_the_agents_service() {
    let (port, _) = free_ports(1);
    let server = spawn_server(fast_config((port, port)), "secret");
    let echo = services::echo().await;
    let (_agent, _task, published) = spawn_published(
        server.addr,
        "secret",
        vec![zlayer_tunnel::ServiceConfig::tcp("db", echo).with_remote_port(port)],
    );
    published.wait(1).await;
    let manager =
        AccessManager::new().with_server(format!("ws://{}/tunnel/v1", server.addr), "secret");
    // the remote address is only shown: the agent dials its own service
    let session = manager
        .start_session("db".into(), "10.0.0.50:5432".into(), None, None)
        .await
        .unwrap();
    let mut moved = echo_through(session.local_addr, 1, 4 << 20).await;
    moved += echo_through(session.local_addr, 2, 4 << 20).await;
    common::wait_until("the connections closed", || {
        let stats = manager.list_sessions().pop().unwrap().stats;
        std::future::ready(stats.connections_active == 0)
    })
    .await;
    let stats = manager.list_sessions().pop().unwrap().stats;
    assert_eq!((stats.bytes_in, stats.bytes_out), (moved, moved));
    assert_eq!(stats.connections_total, 2);

    // an endpoint nobody registered: refused at once (the server is asked
    // first), no local port opened
    let nowhere = manager
        .start_session("nope".into(), String::new(), None, None)
        .await
        .unwrap_err();
    let said = nowhere.to_string();
    assert!(said.contains("no tcp service named \"nope\""), "{said}");
    assert_eq!(
        manager.list_sessions().len(),
        1,
        "a session was opened for it"
    );
}

/// Whether a connection to `addr` gets an echo back (false: closed or reset).
async fn echoes(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("left hanging");
    read.is_ok() && &buf == b"ping"
}

#[actix_web::test]
async fn token_scopes_limit_what_is_registered_and_accessed() {
    use zlayer_tunnel::{TokenScope, TokenStore, hash_token};
    let scope = |register: Option<&[&str]>, access: Option<&[&str]>| TokenScope {
        register: register.map(|r| r.iter().map(|s| (*s).to_owned()).collect()),
        access: access.map(|a| a.iter().map(|s| (*s).to_owned()).collect()),
        ports: None,
        visitors: Default::default(),
        peer: false,
    };
    let store = TokenStore::new()
        .with_hash(&hash_token("agent"), scope(Some(&["web", "db"]), Some(&[])))
        .unwrap()
        .with_hash(&hash_token("viewer"), scope(Some(&[]), Some(&["web"])))
        .unwrap();
    let (low, high) = free_ports(3);
    let server = spawn_server_with_tokens(fast_config((low, high)), store);
    let echo = services::echo().await;
    // "mail" first: the server answers registrations in order, so once the
    // other two are published, its answer has come
    let (agent, _task, published) = spawn_published(
        server.addr,
        "agent",
        vec![
            zlayer_tunnel::ServiceConfig::tcp("mail", echo).with_remote_port(high),
            zlayer_tunnel::ServiceConfig::tcp("web", echo).with_remote_port(low),
            zlayer_tunnel::ServiceConfig::tcp("db", echo).with_remote_port(low + 1),
        ],
    );
    let names: Vec<String> = published
        .wait(2)
        .await
        .into_iter()
        .map(|s| s.name)
        .collect();
    // "mail" is outside the agent token's scope: refused, never published
    assert_eq!(names, ["web", "db"]);
    assert!(wait_closed(high, Duration::ZERO).await);
    assert!(agent.status().services.iter().all(|s| s.name != "mail"));

    let url = format!("ws://{}/tunnel/v1", server.addr);
    let viewer = AccessManager::new().with_server(url, "viewer");
    let web = viewer
        .start_session("web".into(), String::new(), None, None)
        .await
        .unwrap();
    assert!(echoes(web.local_addr).await, "an allowed access failed");
    let db = viewer
        .start_session("db".into(), String::new(), None, None)
        .await
        .unwrap_err();
    let said = db.to_string();
    assert!(
        said.contains("token may not access service \"db\""),
        "{said}"
    );
}

#[actix_web::test]
async fn the_ttl_also_ends_relayed_connections() {
    let (port, _) = free_ports(1);
    let server = spawn_server(fast_config((port, port)), "secret");
    let echo = services::echo().await;
    let (_agent, _task, published) = spawn_published(
        server.addr,
        "secret",
        vec![zlayer_tunnel::ServiceConfig::tcp("db", echo).with_remote_port(port)],
    );
    published.wait(1).await;
    let manager = AccessManager::new()
        .with_server(format!("ws://{}/tunnel/v1", server.addr), "secret")
        .with_grace(Duration::from_millis(200));
    let session = manager
        .start_session(
            "db".into(),
            String::new(),
            None,
            Some(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(session.local_addr)
        .await
        .unwrap();
    let transfer = async {
        let chunk = [9u8; 16 * 1024];
        let mut back = vec![0u8; chunk.len()];
        let mut rounds = 0u32;
        loop {
            if s.write_all(&chunk).await.is_err() || s.read_exact(&mut back).await.is_err() {
                return rounds;
            }
            rounds += 1;
            // the pace of the transfer (what is tested), not a wait
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let rounds = tokio::time::timeout(DEADLINE, transfer)
        .await
        .expect("the relayed connection outlived its session");
    assert!(rounds > 0, "nothing crossed before the expiry");
    assert!(wait_closed(session.local_addr.port(), DEADLINE).await);
}

/// A service whose agent takes no access streams (an original agent) is
/// refused at the start of a session too: the probe says so, as every
/// connection would.
#[actix_web::test]
async fn a_service_whose_agent_takes_no_access_streams_is_refused_at_start() {
    use zlayer_tunnel::{Message, ServiceProtocol};
    let (p, _) = free_ports(1);
    let server = spawn_server(fast_config((p, p)), "secret");
    let mut legacy = common::RawWs::connect(server.addr, "/tunnel/v1").await;
    legacy.auth_legacy("secret").await;
    let register = Message::register("legacy", ServiceProtocol::Tcp, 22, 0).unwrap();
    legacy.send(&register).await;
    loop {
        match legacy.expect().await {
            Some(Message::RegisterOk { .. }) => break,
            Some(Message::Heartbeat { timestamp }) => {
                legacy.send(&Message::HeartbeatAck { timestamp }).await;
            }
            other => panic!("expected RegisterOk, got {other:?}"),
        }
    }
    let url = format!("ws://{}/tunnel/v1", server.addr);
    let manager = AccessManager::new().with_server(url, "secret");
    let refused = manager
        .start_session("legacy".into(), String::new(), None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("does not take access streams"),
        "{refused}"
    );
}
