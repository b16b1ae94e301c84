//! HA agents: one agent (the binary) linked to two servers (the binary, on
//! 127.0.0.1 and 127.0.0.2), its service on the same public port on both; a
//! server's death touches only its own link.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::Proc;
use common::{echo_through, free_ports, services};

/// A CLI server: control on 127.0.0.1:`control`, public ports `range` on `host`.
fn server(control: u16, (low, high): (u16, u16), host: &str) -> Proc {
    let listen = format!("127.0.0.1:{control}");
    let range = format!("{low}-{high}");
    let args = [
        "server",
        "--listen",
        &listen,
        "--port-range",
        &range,
        "--bind-host",
        host,
    ];
    let mut server = Proc::spawn(&args);
    server.wait_for("control channel listening");
    server
}

#[actix_web::test]
async fn one_agent_on_two_servers_keeps_one_port_and_survives_either() {
    let (c1, c2) = (free_ports(1).0, free_ports(1).0);
    let (p0, p2) = free_ports(3);
    let p1 = p0 + 1;
    // asked for any port, the second server would give p0: it is asked for
    // the port the first gave, p1
    let mut first = server(c1, (p1, p2), "127.0.0.1");
    let _second = server(c2, (p0, p2), "127.0.0.2");
    let echo = services::echo().await;
    let url = |c: u16| format!("ws://127.0.0.1:{c}/tunnel/v1");
    let spec = format!("svc:{echo}:0");
    let mut agent = Proc::spawn(&[
        "agent",
        "--server",
        &url(c1),
        "--server",
        &url(c2),
        "--connections",
        "1",
        "--tcp",
        &spec,
    ]);
    assert_eq!(agent.registered_port(), p1);
    assert_eq!(
        agent.registered_port(),
        p1,
        "the same port on the second server"
    );

    let via_first = ([127, 0, 0, 1], p1).into();
    let via_second = ([127, 0, 0, 2], p1).into();
    echo_through(via_first, 1, 256 << 10).await;
    echo_through(via_second, 2, 256 << 10).await;

    // the first server dies while a transfer runs through the second
    let transfer = tokio::spawn(echo_through(via_second, 3, 32 << 20));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    transfer
        .await
        .expect("the transfer through the other server completes");

    // back on its backoff, with the same port
    let _first = server(c1, (p1, p2), "127.0.0.1");
    assert_eq!(agent.registered_port(), p1);
    echo_through(via_first, 4, 256 << 10).await;
    echo_through(via_second, 5, 256 << 10).await;
}

/// A link whose settings cannot be used (the second server's `wss://`,
/// with a `ca_cert` that cannot be read) fails `run()` before any link
/// starts, naming the file: the first server never sees a session (before,
/// its link started and `run()` waited on it for ever), and the agent may
/// run again.
#[actix_web::test]
async fn a_link_that_cannot_start_fails_run_before_any_link_starts() {
    let (port, _) = free_ports(1);
    let server = common::spawn_server(common::fast_config((port, port)), "secret");
    let web = zlayer_tunnel::ServiceConfig::tcp("web", services::echo().await);
    let config = common::agent_config(server.addr, "secret", vec![web])
        .with_server("wss://127.0.0.1:9/tunnel/v1")
        .with_ca_cert("/nonexistent/ca.pem");
    let agent = zlayer_tunnel::TunnelAgent::new(config);
    for _ in 0..2 {
        let ran = tokio::time::timeout(common::DEADLINE, agent.run()).await;
        let error = ran.expect("run() never returned").unwrap_err();
        assert!(
            matches!(error, zlayer_tunnel::TunnelError::Config { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
        assert!(server.registry.list_tunnels().await.is_empty());
    }
}
