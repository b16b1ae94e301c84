//! Our agent against a server that breaks the rules on purpose. The server
//! here is written by hand (`common::raw_server`) and the agent runs as the
//! `zlayer-tunnel` binary, so that its memory is measured alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::Proc;
use common::raw_server::{accept_upgrade, read_frame, write_frame};
use common::{DEADLINE, rss_kib};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use uuid::Uuid;
use zlayer_tunnel::protocol::{Capabilities, Features, Message};

/// One WebSocket binary frame (unmasked, server to client) holding `payload`.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x82, u8::try_from(payload.len()).unwrap()];
    frame.extend_from_slice(payload);
    frame
}

/// `AuthOk` with every feature, as our server answers.
fn auth_ok() -> Message {
    Message::AuthOk {
        tunnel_id: Uuid::new_v4(),
        capabilities: Some(Capabilities {
            features: Features::ALL,
            initial_window: 65_536,
        }),
    }
}

/// Accepts agents; for each: reads its `Auth`, answers `AuthOk`, then sends
/// `Heartbeat`s as fast as it can and never reads again. Reports each new
/// connection.
async fn flooding_server(listener: TcpListener, connections: mpsc::UnboundedSender<()>) {
    while let Ok((mut socket, _)) = listener.accept().await {
        connections.send(()).unwrap();
        tokio::spawn(async move {
            let mut buf = accept_upgrade(&mut socket).await;
            let _auth = read_frame(&mut socket, &mut buf).await;
            write_frame(&mut socket, &auth_ok().encode()).await;
            let heartbeat = ws_frame(&Message::Heartbeat { timestamp: 1 }.encode());
            let block: Vec<u8> = heartbeat
                .iter()
                .copied()
                .cycle()
                .take(heartbeat.len() * 4096)
                .collect();
            // never reads: what the agent writes piles up in its socket, then in the agent
            while socket.write_all(&block).await.is_ok() {}
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_sends_and_never_reads_cannot_grow_the_agent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut connections) = mpsc::unbounded_channel();
    tokio::spawn(flooding_server(listener, tx));
    let url = format!("ws://{addr}/tunnel/v1");
    // one link: the flood and the memory measured are one connection's
    let mut agent = Proc::spawn(&["agent", "--server", &url, "--connections", "1"]);
    tokio::time::timeout(DEADLINE, connections.recv())
        .await
        .unwrap()
        .unwrap();
    let start = rss_kib(agent.child.id());
    // every Heartbeat is owed a HeartbeatAck that can never be written: the
    // answers owed are bounded and the link ends, whatever the server sends
    let line = agent.wait_for("does not read");
    assert!(line.contains("reconnecting"), "{line}");
    let peak = rss_kib(agent.child.id());
    assert!(
        peak < start + 32 * 1024,
        "the agent grew from {start} KiB to {peak} KiB under the flood"
    );
    // and it comes back, to meet the same server again
    tokio::time::timeout(DEADLINE, connections.recv())
        .await
        .expect("the agent did not reconnect")
        .unwrap();
    let again = agent.wait_for("does not read");
    assert!(again.contains("WARN"), "{again}");
}

/// Accepts one agent: authenticates it, takes its registration, then asks
/// it to open `flows` flows (streams, for a TCP service) at once. Sends the agent's answers to
/// `answers`.
async fn flow_asking_server(
    listener: TcpListener,
    flows: usize,
    answers: mpsc::UnboundedSender<Message>,
) {
    let (mut socket, _) = listener.accept().await.unwrap();
    let mut buf = accept_upgrade(&mut socket).await;
    while let Some(payload) = read_frame(&mut socket, &mut buf).await {
        let (message, _) = Message::decode(&payload).unwrap();
        match message {
            Message::Auth { .. } => {
                write_frame(&mut socket, &auth_ok().encode()).await;
            }
            Message::Register { .. } => {
                let service_id = Uuid::new_v4();
                let ok = Message::RegisterOk {
                    service_id,
                    port: Some(5353),
                };
                write_frame(&mut socket, &ok.encode()).await;
                for _ in 0..flows {
                    let connect =
                        Message::connect(service_id, Uuid::new_v4(), "192.0.2.7:53").unwrap();
                    write_frame(&mut socket, &connect.encode()).await;
                }
            }
            other => {
                if answers.send(other).is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_make_the_agent_open_sockets_without_end() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut answers) = mpsc::unbounded_channel();
    tokio::spawn(flow_asking_server(listener, 300, tx));
    let fds = common::fd_count(std::process::id());
    let mut config = common::agent_config(
        addr,
        "token",
        vec![zlayer_tunnel::ServiceConfig::udp("dns", 53)],
    );
    config.max_flows = 16;
    let (agent, _task) = common::run_agent(zlayer_tunnel::TunnelAgent::new(config));
    let answered = count_answers(&mut answers, 300, "limit of 16 UDP flows").await;
    assert_eq!(answered, (16, 284));
    let held = common::fd_count(std::process::id()).saturating_sub(fds);
    assert!(
        held < 64,
        "the agent holds {held} more descriptors for 16 flows"
    );
    agent.stop();
}

/// The same for streams: a server asking for 300 streams to a TCP service
/// gets the agent's `max_streams` (16) dialed and the rest refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_make_the_agent_dial_without_end() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut answers) = mpsc::unbounded_channel();
    tokio::spawn(flow_asking_server(listener, 300, tx));
    let echo = common::services::echo().await;
    let fds = common::fd_count(std::process::id());
    let mut config = common::agent_config(
        addr,
        "token",
        vec![zlayer_tunnel::ServiceConfig::tcp("ssh", echo)],
    );
    config.max_streams = 16;
    let (agent, _task) = common::run_agent(zlayer_tunnel::TunnelAgent::new(config));
    let answered = count_answers(&mut answers, 300, "limit of 16 streams").await;
    assert_eq!(answered, (16, 284));
    // each stream is two descriptors here: the agent's and the echo's end
    let held = common::fd_count(std::process::id()).saturating_sub(fds);
    assert!(
        held < 96,
        "the agent holds {held} more descriptors for 16 streams"
    );
    agent.stop();
}

/// The agent's answers to `asked` `Connect`s: (accepted, refused), every
/// refusal naming `limit`.
async fn count_answers(
    answers: &mut mpsc::UnboundedReceiver<Message>,
    asked: usize,
    limit: &str,
) -> (usize, usize) {
    let (mut accepted, mut refused) = (0, 0);
    while accepted + refused < asked {
        let answer = tokio::time::timeout(DEADLINE, answers.recv())
            .await
            .unwrap()
            .unwrap();
        match answer {
            Message::ConnectAck { .. } => accepted += 1,
            Message::ConnectFail { reason, .. } => {
                assert!(reason.contains(limit), "{reason}");
                refused += 1;
            }
            _ => {}
        }
    }
    (accepted, refused)
}
