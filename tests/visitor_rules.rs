//! Who may connect: a service's visitor address lists (the agent's `allow`
//! and `deny`, the token's `visitors_allow` and `visitors_deny` on the
//! server), enforced by the server when a visitor connects, with real
//! sockets from several loopback source addresses (127.0.0.2, .3, ...).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::free_ports;
use common::process::{Proc, TOKEN};
use common::wait::wait_until;

/// A server with an admin listener; its control URL and admin address.
fn server(flags: &[&str]) -> (Proc, String, SocketAddr) {
    let public = free_ports(1);
    let mut all = vec!["--admin-listen", "127.0.0.1:0"];
    all.extend_from_slice(flags);
    let mut server = Proc::server(public, &all);
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    (server, format!("ws://{control}/tunnel/v1"), admin)
}

/// An agent on `url` publishing an echo service `svc` (`protocol`:
/// `--tcp` or `--udp`) with `flags`; it and the service's public port.
async fn agent_of(url: &str, protocol: &str, flags: &[&str]) -> (Proc, u16) {
    let local = match protocol {
        "--udp" => common::services::udp_echo(),
        _ => common::services::echo().await,
    };
    let spec = format!("svc:{local}:0");
    let mut args = vec!["agent", "--server", url, protocol, &spec];
    args.extend_from_slice(flags);
    let mut agent = Proc::spawn(&args);
    let port = agent.registered_port();
    (agent, port)
}

/// `len` bytes echoed whole through `port` from source address `from`;
/// false if the connection is refused (reset or closed with nothing back).
async fn echoes_from(from: &str, port: u16, seed: u64) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let Ok(mut s) = socket.connect(([127, 0, 0, 1], port).into()).await else {
        return false;
    };
    let data = common::pattern(seed, 64 << 10);
    let (mut r, mut w) = s.split();
    let send = async {
        // a refused visitor's write may meet the reset
        let _ = w.write_all(&data).await;
        let _ = w.shutdown().await;
    };
    let mut back = Vec::new();
    let (_, got) = tokio::join!(send, r.read_to_end(&mut back));
    if got.is_err() || back.is_empty() {
        return false;
    }
    common::assert_same(&back, &data, "the echo");
    true
}

/// The server's `/metrics` has `zlayer_tunnel_visitors_refused_total` of
/// `count` for service `svc` and `reason`.
async fn refused_counted(admin: SocketAddr, reason: &str, count: u32) {
    let wanted = format!("reason=\"{reason}\"}} {count}\n");
    wait_until("the refusals counted", || {
        let wanted = wanted.clone();
        async move {
            let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
            metrics.lines().any(|l| {
                l.starts_with("zlayer_tunnel_visitors_refused_total{service=\"svc\"")
                    && l.ends_with(wanted.trim_end())
            })
        }
    })
    .await;
}

#[actix_web::test]
async fn an_agents_lists_admit_and_refuse_tcp_visitors_before_any_stream() {
    let (mut server, url, admin) = server(&[]);
    let (_agent, port) = agent_of(
        &url,
        "--tcp",
        &["--allow", "127.0.0.0/24", "--deny", "127.0.0.3"],
    )
    .await;
    assert!(
        echoes_from("127.0.0.2", port, 1).await,
        "an allowed visitor"
    );
    assert!(!echoes_from("127.0.0.3", port, 2).await, "a denied visitor");
    assert!(
        !echoes_from("127.0.1.1", port, 3).await,
        "a visitor not allowed"
    );
    refused_counted(admin, "denied", 1).await;
    refused_counted(admin, "not_allowed", 1).await;
    // a flood of refused visitors: counted each, logged at most once a second
    for seed in 0..40 {
        assert!(!echoes_from("127.0.0.3", port, seed).await);
    }
    refused_counted(admin, "denied", 41).await;
    assert!(
        echoes_from("127.0.0.2", port, 4).await,
        "the allowed still pass"
    );
    // a second later, the next refusal's line says how many were held back
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!echoes_from("127.0.0.3", port, 5).await);
    let held_back = |line: &str| -> u32 {
        (line.split_whitespace())
            .find_map(|f| f.strip_prefix("held_back="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let held = (0..3)
        .map(|_| held_back(&server.wait_for("visitor refused by the service's rules")))
        .find(|&held| held > 0)
        .expect("a line with the refusals held back");
    let lines = (server.seen().iter())
        .filter(|l| l.contains("visitor refused by the service's rules"))
        .count();
    assert!(
        lines <= 3 && held >= 38,
        "{lines} lines, {held} held back, for 43 refusals"
    );
    let status = common::http_get(&format!("http://{admin}/status")).await;
    assert!(status.contains("\"visitors_refused\":[42,1,0]"), "{status}");
}

#[actix_web::test]
async fn a_tokens_lists_on_the_server_apply_to_every_service_it_registers() {
    let dir = std::env::temp_dir().join(format!("zlt-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("server.toml");
    let hash = zlayer_tunnel::hash_token(TOKEN);
    let toml =
        format!("listen = []\n[[tokens]]\nhash = \"{hash}\"\nvisitors_deny = [\"127.0.0.4/32\"]\n");
    std::fs::write(&config, toml).unwrap();
    let (_server, url, admin) = server(&["--config", config.to_str().unwrap()]);
    let local = common::services::echo().await;
    let spec = format!("svc:{local}:0");
    // the agent's own list narrows the token's further
    let mut agent = Proc::spawn(&[
        "agent",
        "--server",
        &url,
        "--tcp",
        &spec,
        "--deny",
        "127.0.0.5",
    ]);
    let port = agent.registered_port();
    assert!(echoes_from("127.0.0.2", port, 1).await);
    assert!(!echoes_from("127.0.0.4", port, 2).await, "the token's deny");
    assert!(
        !echoes_from("127.0.0.5", port, 3).await,
        "the registration's deny"
    );
    refused_counted(admin, "denied", 2).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn a_udp_services_lists_refuse_datagrams_before_they_take_a_flow() {
    let (_server, url, admin) = server(&[]);
    let (_agent, port) = agent_of(&url, "--udp", &["--deny", "127.0.0.3"]).await;
    let answered = |from: &'static str| async move {
        let socket = tokio::net::UdpSocket::bind((from.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            socket.send_to(b"ping", ("127.0.0.1", port)).await.unwrap();
            let wait = tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf));
            if let Ok(Ok(n)) = wait.await {
                return &buf[..n] == b"ping";
            }
        }
        false
    };
    assert!(
        answered("127.0.0.2").await,
        "an admitted visitor is answered"
    );
    assert!(!answered("127.0.0.3").await, "a denied visitor is not");
    refused_counted(admin, "denied", 5).await;
}

#[actix_web::test]
async fn a_bad_block_is_refused_by_the_agent_naming_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
        .args([
            "agent",
            "--server",
            "ws://127.0.0.1:1/tunnel/v1",
            "--tcp",
            "a:22:0",
        ])
        .args(["--allow", "10.0.0.0/33"])
        .env("ZLAYER_TUNNEL_TOKEN", "t")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"10.0.0.0/33\" is not an address block"),
        "{stderr}"
    );
}

#[actix_web::test]
async fn a_visitor_over_the_services_connection_rate_is_refused() {
    let (_server, url, admin) = server(&[]);
    let (_agent, port) = agent_of(&url, "--tcp", &["--visitor-rate", "5"]).await;
    // a burst of 5 a second per address: the 3 more are refused
    let mut admitted = 0;
    for seed in 0..8 {
        admitted += u32::from(echoes_from("127.0.0.2", port, seed).await);
    }
    assert!((5..=6).contains(&admitted), "{admitted} of 8 admitted");
    assert!(
        echoes_from("127.0.0.3", port, 9).await,
        "another address has its own"
    );
    refused_counted(admin, "rate_limited", 8 - admitted).await;
    let status = common::http_get(&format!("http://{admin}/status")).await;
    assert!(status.contains("\"visitor_rate\":5"), "{status}");
}

#[actix_web::test]
async fn a_services_bandwidth_is_held_by_reading_less_with_every_byte_delivered() {
    let (_server, url, admin) = server(&[]);
    let (_agent, port) = agent_of(&url, "--tcp", &["--bandwidth", "1048576"]).await;
    // 3 MiB each way at 1 MiB/s with a burst of one second's worth: two
    // seconds at least, two streams sharing the limit, every byte whole
    let started = std::time::Instant::now();
    let both = futures::future::join(
        common::echo_through(([127, 0, 0, 1], port).into(), 1, 3 << 19),
        common::echo_through(([127, 0, 0, 1], port).into(), 2, 3 << 19),
    );
    assert_eq!(both.await, (3 << 19, 3 << 19));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800), "3 MiB in {took:?}");
    let status = common::http_get(&format!("http://{admin}/status")).await;
    assert!(status.contains("\"bandwidth\":1048576"), "{status}");
}
