//! What anyone who can reach the server can make it do, done as a flood: the
//! server's log stays bounded (one line per kind per second, with the count
//! held back) and every event is counted in `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::Proc;
use common::{RawWs, free_ports};
use zlayer_tunnel::protocol::Message;

const GUESSES: usize = 300;

#[actix_web::test]
async fn a_flood_of_wrong_tokens_leaves_a_bounded_log_and_a_count() {
    let public = free_ports(1).0;
    let mut server = Proc::server((public, public), &["--admin-listen", "127.0.0.1:0"]);
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    let started = std::time::Instant::now();
    for _ in 0..GUESSES {
        let mut ws = RawWs::connect(control, "/tunnel/v1").await;
        let guess = Message::auth("a wrong guess", uuid::Uuid::new_v4(), None).unwrap();
        ws.send(&guess).await;
        // refused: AuthFail, then the close
        assert!(matches!(ws.expect().await, Some(Message::AuthFail { .. })));
    }
    let seconds = started.elapsed().as_secs() + 1;
    let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
    let count = |event: &str| -> u64 {
        let key = format!("zlayer_tunnel_remote_events_total{{event=\"{event}\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&key)).unwrap();
        line[key.len()..].parse().unwrap()
    };
    assert_eq!(
        count("auth_refused") + count("auth_locked_out"),
        GUESSES as u64,
        "{metrics}"
    );
    server.signal("TERM");
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("authentication")).count();
    // two kinds (refused, refused unchecked during a lockout), a line a second each
    let bound = 2 * seconds as usize + 2;
    assert!(
        lines <= bound,
        "{lines} log lines for {GUESSES} guesses in {seconds} s (at most {bound}):\n{log}"
    );
    assert!(
        log.contains("held_back="),
        "the lines say how many were held back"
    );
}

/// 1024 connections that never authenticate, from 32 addresses (every place
/// the defaults give), reconnecting as soon as one is dropped: a genuine
/// agent still gets in at its first attempt, and publishes. (Before, the
/// flood held every place for the whole `auth_timeout`, 10 s, and the agent
/// was answered 503 each time it tried.)
#[actix_web::test]
async fn a_flood_of_idle_connections_cannot_keep_an_agent_out() {
    const ADDRESSES: u8 = 32;
    const EACH: usize = 32;
    let public = free_ports(1).0;
    let mut server = Proc::server((public, public), &["--admin-listen", "127.0.0.1:0"]);
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flood = tokio::task::JoinSet::new();
    for last in 0..ADDRESSES {
        let source = std::net::IpAddr::from([127, 0, 1, last]);
        for _ in 0..EACH {
            flood.spawn(hold_a_place(control, source, stop.clone()));
        }
    }
    common::wait_until("the flood holds every place", || async {
        let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
        metrics.contains("\nzlayer_tunnel_awaiting_auth 1024\n")
    })
    .await;
    let echo = common::services::echo().await;
    let url = format!("ws://{control}/tunnel/v1");
    let spec = format!("echo:{echo}:{public}");
    let mut agent = Proc::spawn(&["agent", "--server", &url, "--tcp", &spec]);
    assert_eq!(agent.registered_port(), public);
    common::echo_through(([127, 0, 0, 1], public).into(), 1, 64 << 10).await;
    let attempts = agent.seen().join("\n");
    assert!(
        // (not "503" alone: a port number can hold it, as 38503 once did)
        !attempts.contains("reconnecting") && !attempts.contains("503 Service Unavailable"),
        "the agent did not get in at its first attempt:\n{attempts}"
    );
    stop.cancel();
    let reconnects: usize = flood.join_all().await.into_iter().sum();
    assert!(reconnects >= 1, "the agent took no flooder's place");
}

/// Holds a place awaiting authentication from `source`, taking another
/// each time the server drops it, until `stop`; how many times it was dropped.
async fn hold_a_place(
    control: std::net::SocketAddr,
    source: std::net::IpAddr,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let mut dropped = 0;
    loop {
        let Ok(mut ws) = RawWs::try_connect_from(control, "/tunnel/v1", source).await else {
            panic!("a connection of the flood was refused its upgrade");
        };
        tokio::select! {
            () = stop.cancelled() => return dropped,
            _ = ws.frame() => dropped += 1,
        }
    }
}

const VISITORS: usize = 200;

/// Visitors of a service whose local end is down: the agent refuses each
/// (`ConnectFail`), and the server says so, a line a second with the count
/// held back, every refusal counted in `/metrics`.
#[actix_web::test]
async fn visitors_the_agent_refuses_leave_a_bounded_log_and_a_count() {
    let public = free_ports(1).0;
    let mut server = Proc::server((public, public), &["--admin-listen", "127.0.0.1:0"]);
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    let down = free_ports(1).0; // nothing listens there
    let url = format!("ws://{control}/tunnel/v1");
    let spec = format!("down:{down}:{public}");
    let mut agent = Proc::spawn(&["agent", "--server", &url, "--tcp", &spec]);
    assert_eq!(agent.registered_port(), public);
    let started = std::time::Instant::now();
    for i in 0..VISITORS {
        // refused: reset, or closed without a byte; the refusal can come
        // before the connect is seen complete, when the test thread is slow
        let refused = tokio::time::timeout(common::DEADLINE, async {
            let mut visitor = tokio::net::TcpStream::connect(("127.0.0.1", public)).await?;
            tokio::io::AsyncReadExt::read(&mut visitor, &mut [0u8; 1]).await
        });
        match refused.await {
            Ok(Ok(0)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("visitor {i}: {other:?}, not refused"),
        }
    }
    let seconds = started.elapsed().as_secs() + 1;
    let count = || async {
        let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
        let key = "zlayer_tunnel_remote_events_total{event=\"agent_refused_visitor\"} ";
        let line = metrics.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..].parse::<usize>().unwrap()
    };
    common::wait_until("every refusal counted", || async {
        count().await == VISITORS
    })
    .await;
    server.signal("TERM");
    let log = server.log();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("the agent refused a visitor"))
        .collect();
    let bound = seconds as usize + 1;
    assert!(
        !lines.is_empty() && lines.len() <= bound,
        "{} lines for {VISITORS} refusals in {seconds} s (at most {bound}):\n{log}",
        lines.len()
    );
    assert!(lines[0].contains("reason="), "{}", lines[0]);
}
