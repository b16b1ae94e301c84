//! The example programs `examples/server.rs` and `examples/agent.rs` as a
//! user runs them: a server and an agent moving bytes, then stopped by
//! SIGTERM or SIGINT, promptly, their ports closed.
//!
//! Cargo builds examples for a plain `cargo test` (into
//! `target/<profile>/examples/`, beside the `zlayer-tunnel` binary) but not
//! for `cargo test --test examples` alone; then build them first with
//! `cargo build --example server --example agent`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::process::Proc;
use common::{echo_through, free_ports, services, wait_closed, wait_listening};

/// The example binary `name`, built by cargo next to the `zlayer-tunnel` binary.
fn example(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_zlayer-tunnel"));
    let path = bin.parent().unwrap().join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds the examples, `cargo test --test examples` does not; \
         run `cargo build --example server --example agent` (with the same profile) first",
        path.display()
    );
    path
}

/// Starts the server and agent examples with an echo service and checks
/// bytes through them; the two processes, the control and the public port.
async fn server_and_agent() -> (Proc, Proc, u16, u16) {
    // the example binds the address it is given and logs it as given, not
    // as bound: its control port comes from the test window, not port 0
    let (control, public) = (free_ports(1).0, free_ports(1).0);
    let echo = services::echo().await;
    let (listen, range) = (format!("127.0.0.1:{control}"), format!("{public}-{public}"));
    let mut server = Proc::spawn_exe(&example("server"), &[&listen, &range, "ex-token"]);
    server.wait_for("tunnel server listening");
    wait_listening(control).await;
    let url = format!("ws://127.0.0.1:{control}/tunnel/v1");
    let spec = format!("echo:{echo}:0");
    let mut agent = Proc::spawn_exe(&example("agent"), &[&url, "ex-token", &spec]);
    assert_eq!(agent.registered_port(), public);
    let addr = ([127, 0, 0, 1], public).into();
    echo_through(addr, 1, 1 << 20).await;
    echo_through(addr, 2, 3 << 20).await;
    (server, agent, control, public)
}

/// Stops `process` with `signal`; asserts a clean exit within 2 s.
fn stop(process: &mut Proc, signal: &str, what: &str) {
    let (status, took) = process.stop_with(signal);
    assert!(
        status.success() && took < Duration::from_secs(2),
        "{what}: {status} {took:?} after SIG{signal}"
    );
}

#[actix_web::test]
async fn sigterm_stops_the_agent_then_the_server_and_frees_their_ports() {
    let (mut server, mut agent, control, public) = server_and_agent().await;
    stop(&mut agent, "TERM", "agent");
    assert!(
        wait_closed(public, Duration::from_secs(1)).await,
        "the public port stayed open after the agent left"
    );
    stop(&mut server, "TERM", "server");
    assert!(
        wait_closed(control, Duration::from_secs(1)).await,
        "the control port stayed open after the server exited"
    );
}

#[actix_web::test]
async fn sigint_stops_the_server_with_an_agent_connected_then_the_agent() {
    let (mut server, mut agent, control, public) = server_and_agent().await;
    // a live WebSocket must not hold the server's exit (actix-web would wait 30 s)
    stop(&mut server, "INT", "server");
    assert!(wait_closed(control, Duration::from_secs(1)).await);
    assert!(wait_closed(public, Duration::from_secs(1)).await);
    // the agent, now retrying, stops promptly too
    agent.wait_for("reconnecting after a delay");
    stop(&mut agent, "INT", "agent");
}
