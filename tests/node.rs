//! Node-to-node tunnels, two nodes in one process: node A publishes a local
//! service on node B's tunnel server; bytes cross both ways, byte-exact; the
//! status tells the truth through a restart of node B; a bad token fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{DEADLINE, echo_through, fast_config, free_ports, services, spawn_server_on};
use zlayer_tunnel::{NodeTunnel, NodeTunnelManager, TunnelServerConfig, TunnelState};

/// The name of a state, without its fields.
fn kind(state: &TunnelState) -> &'static str {
    match state {
        TunnelState::Connecting => "Connecting",
        TunnelState::Connected { .. } => "Connected",
        TunnelState::Reconnecting { .. } => "Reconnecting",
        TunnelState::Failed { .. } => "Failed",
        TunnelState::Stopped => "Stopped",
    }
}

/// Polls the status of `name` until `done` holds, recording each new state
/// kind (every 2 ms, to see the brief ones).
async fn watch(
    manager: &NodeTunnelManager,
    name: &str,
    seen: &mut Vec<&'static str>,
    done: impl Fn(&TunnelState) -> bool,
) -> TunnelState {
    let mut state = TunnelState::Connecting;
    let reached = common::poll_every(DEADLINE, Duration::from_millis(2), || {
        state = manager.get_status(name).unwrap().state;
        if seen.last() != Some(&kind(&state)) {
            seen.push(kind(&state));
        }
        std::future::ready(done(&state))
    })
    .await;
    assert!(reached, "stuck in {state:?}; saw {seen:?}");
    state
}

#[actix_web::test]
async fn a_node_tunnel_carries_bytes_and_tells_the_truth_through_a_restart() {
    let (control, public) = (free_ports(1).0, free_ports(1).0);
    let node_b = spawn_server_on(fast_config((public, public)), "tun-secret", control);
    let echo = services::echo().await;
    let node_a = std::sync::Arc::new(NodeTunnelManager::new(
        "node-a",
        TunnelServerConfig::default(),
    ));
    let tunnel = NodeTunnel::new("db", "node-a", "node-b")
        .with_ports(echo, public)
        .with_token("tun-secret");
    node_a.add_tunnel(tunnel).unwrap();
    assert_eq!(
        kind(&node_a.get_status("db").unwrap().state),
        "Stopped",
        "not started yet"
    );
    let url = format!("ws://127.0.0.1:{control}/tunnel/v1");
    node_a.start_outbound("db", url).unwrap();

    let mut seen = Vec::new();
    watch(&node_a, "db", &mut seen, |s| {
        matches!(s, TunnelState::Connected { .. })
    })
    .await;
    assert_eq!(node_a.get_status("db").unwrap().public_port, Some(public));
    let mut moved = echo_through(([127, 0, 0, 1], public).into(), 1, 3 << 20).await;

    // node B goes away: Reconnecting, with the error; it comes back: Connected, same port
    node_b.handle.stop(true).await;
    let state = watch(&node_a, "db", &mut seen, |s| {
        matches!(s, TunnelState::Reconnecting { .. })
    })
    .await;
    let TunnelState::Reconnecting { last_error, .. } = state else {
        unreachable!()
    };
    assert!(!last_error.is_empty());
    let node_b = spawn_server_on(fast_config((public, public)), "tun-secret", control);
    // connected: every service registered, its port listening
    watch(&node_a, "db", &mut seen, |s| {
        matches!(s, TunnelState::Connected { .. })
    })
    .await;
    let second = echo_through(([127, 0, 0, 1], public).into(), 2, 1 << 20).await;
    moved += second;
    // node B's side (the public socket) counted the same bytes, exactly, on
    // the node tunnel's links together (two by default)
    let on_b = || async {
        let tunnels = node_b.registry.list_tunnels().await;
        let all = tunnels.iter().flat_map(|t| &t.services).map(|s| s.stats);
        all.fold((0, 0, 0), |(open, i, o), s| {
            (open + s.connections_active, i + s.bytes_in, o + s.bytes_out)
        })
    };
    common::wait_until("node B's connection closed", || async {
        on_b().await.0 == 0
    })
    .await;
    let (_, bytes_in, bytes_out) = on_b().await;
    assert_eq!((bytes_in, bytes_out), (second, second));

    // accounting: exactly the payload, each way, across both sessions
    let stats = node_a.get_status("db").unwrap().stats;
    assert_eq!((stats.bytes_in, stats.bytes_out), (moved, moved));
    // and through the node's admin endpoints
    let admin = free_ports(1).0;
    let server = node_a
        .serve_admin(&[([127, 0, 0, 1], admin).into()])
        .unwrap();
    actix_web::rt::spawn(server);
    let client = awc::Client::new();
    let get = |path: &str| client.get(format!("http://127.0.0.1:{admin}{path}")).send();
    let status: serde_json::Value = get("/status").await.unwrap().json().await.unwrap();
    assert_eq!(
        status["node_tunnels"][0]["state"]["state"], "connected",
        "{status}"
    );
    let body = get("/metrics").await.unwrap().body().await.unwrap();
    let metrics = String::from_utf8(body.to_vec()).unwrap();
    let line = format!(
        "zlayer_tunnel_node_tunnel_bytes_total{{tunnel=\"db\",from=\"node-a\",to=\"node-b\",direction=\"out\"}} {moved}"
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    assert!(
        metrics.contains(
            "zlayer_tunnel_node_tunnel_up{tunnel=\"db\",from=\"node-a\",to=\"node-b\"} 1"
        )
    );

    node_a.remove_tunnel("db").unwrap();
    watch(&node_a, "db", &mut seen, |s| {
        matches!(s, TunnelState::Stopped)
    })
    .await;
    // "Reconnecting" may repeat while node B is down; the order is what counts
    seen.dedup();
    assert_eq!(
        seen,
        [
            "Connecting",
            "Connected",
            "Reconnecting",
            "Connected",
            "Stopped"
        ],
        "statuses in order"
    );
}

#[actix_web::test]
async fn a_bad_token_fails_and_bad_tunnels_are_refused() {
    let (control, public) = (free_ports(1).0, free_ports(1).0);
    let _node_b = spawn_server_on(fast_config((public, public)), "right", control);
    let node_a = NodeTunnelManager::new("node-a", TunnelServerConfig::default());
    node_a
        .add_tunnel(
            NodeTunnel::new("t", "node-a", "node-b")
                .with_ports(1, public)
                .with_token("wrong"),
        )
        .unwrap();
    node_a
        .start_outbound("t", format!("ws://127.0.0.1:{control}/tunnel/v1"))
        .unwrap();
    let mut seen = Vec::new();
    let state = watch(&node_a, "t", &mut seen, |s| {
        matches!(s, TunnelState::Failed { .. })
    })
    .await;
    assert!(
        format!("{state:?}").contains("invalid tunnel token"),
        "{state:?}"
    );
    assert!(
        !format!("{state:?}").contains("wrong"),
        "the token leaked: {state:?}"
    );

    let elsewhere = NodeTunnel::new("x", "node-c", "node-b")
        .with_ports(1, 2)
        .with_token("t");
    assert!(
        node_a
            .add_tunnel(elsewhere)
            .unwrap_err()
            .to_string()
            .contains("from_node")
    );
    assert!(
        node_a
            .start_outbound("nope", "ws://127.0.0.1:1/tunnel/v1".into())
            .is_err()
    );
    // several servers: none is refused, a bad one is named
    node_a
        .add_tunnel(
            NodeTunnel::new("ha", "node-a", "node-b")
                .with_ports(1, public)
                .with_token("t"),
        )
        .unwrap();
    let none = node_a.start_outbound_to("ha", Vec::new()).unwrap_err();
    assert!(none.to_string().contains("no server URL"), "{none}");
    let urls = vec![
        "ws://127.0.0.1:1/tunnel/v1".to_owned(),
        "http://b".to_owned(),
    ];
    let bad = node_a.start_outbound_to("ha", urls).unwrap_err();
    assert!(bad.to_string().contains("servers[0]"), "{bad}");
}
