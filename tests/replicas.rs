//! Replicas: several agents (the binary, real sockets) registering one service
//! name on one server share its public port; each visitor goes to one of them,
//! and the port lives as long as one of them does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::process::{Proc, TOKEN};
use common::wait::wait_until;
use common::{echo_through, free_ports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes `socket`, counted in `served` once it carries a byte (a health
/// check connects and closes: not a visitor).
async fn echo_counted(mut socket: tokio::net::TcpStream, served: Arc<AtomicUsize>) {
    let mut first = [0u8; 1];
    if !matches!(socket.read(&mut first).await, Ok(1)) {
        return;
    }
    served.fetch_add(1, Ordering::SeqCst);
    let (mut read, mut write) = socket.split();
    let _ = write.write_all(&first).await;
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// An echo service that counts the visitors it serves.
async fn counting_echo() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(echo_counted(socket, count.clone()));
        }
    });
    (port, served)
}

/// A CLI server with public ports `range` and its agents' control URL.
fn server(range: (u16, u16), flags: &[&str]) -> (Proc, String) {
    let mut server = Proc::server(range, flags);
    let control = server.listening_addr("control channel listening");
    (server, format!("ws://{control}/tunnel/v1"))
}

/// An agent publishing `svc` from local port `local` on `public`, with one
/// link: one agent is one replica (the tests follow "replica joined" and
/// "replica left" once per agent).
fn agent(url: &str, local: u16, public: u16) -> Proc {
    Proc::spawn(&[
        "agent",
        "--server",
        url,
        "--connections",
        "1",
        "--tcp",
        &format!("svc:{local}:{public}"),
    ])
}

/// True once nothing accepts on `port`.
async fn closed(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

#[actix_web::test]
async fn two_agents_of_one_name_share_its_port_and_the_survivor_serves_alone() {
    let public = free_ports(1).0;
    let (mut server, url) = server((public, public), &[]);
    let (local_a, served_a) = counting_echo().await;
    let (local_b, served_b) = counting_echo().await;
    let mut a = agent(&url, local_a, public);
    assert_eq!(a.registered_port(), public);
    let mut b = agent(&url, local_b, public);
    assert_eq!(
        b.registered_port(),
        public,
        "the replica gets the same port"
    );
    server.wait_for("replica joined");

    let addr = ([127, 0, 0, 1], public).into();
    for seed in 0..200 {
        echo_through(addr, seed, 4096).await;
    }
    let (on_a, on_b) = (
        served_a.load(Ordering::SeqCst),
        served_b.load(Ordering::SeqCst),
    );
    assert_eq!(on_a + on_b, 200);
    assert!(on_a >= 60 && on_b >= 60, "spread {on_a} / {on_b}");

    // a visitor that stays open across the loss of the other replica
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    held.read_exact(&mut got).await.unwrap();
    let held_on_b = served_b.load(Ordering::SeqCst) > on_b;

    a.child.kill().unwrap(); // SIGKILL: only the kernel closes its socket
    server.wait_for("replica left");
    let before = served_b.load(Ordering::SeqCst);
    for seed in 200..260 {
        echo_through(addr, seed, 64 << 10).await;
    }
    assert_eq!(
        served_b.load(Ordering::SeqCst) - before,
        60,
        "every visitor after the loss went to the survivor"
    );
    if held_on_b {
        held.write_all(b"after!").await.unwrap();
        held.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"after!",
            "the survivor's open stream was not touched"
        );
    }

    b.child.kill().unwrap();
    server.wait_for("public port closed");
    wait_until("the port closes with its last replica", || closed(public)).await;
}

#[actix_web::test]
async fn a_replica_is_refused_another_port_or_another_token() {
    let (public, other) = free_ports(2);
    let tokens = ["--token", TOKEN, "--token", "second-token"];
    let (mut server, url) = server((public, other), &tokens);
    let (local, _) = counting_echo().await;
    let mut first = agent(&url, local, public);
    assert_eq!(first.registered_port(), public);

    let mut wrong_port = agent(&url, local, other);
    let line = wrong_port.wait_for(&format!("already has public port {public}"));
    assert!(line.contains("svc"), "{line}");

    let mut other_token = Proc::spawn_with(
        &[
            "agent",
            "--server",
            &url,
            "--tcp",
            &format!("svc:{local}:0"),
        ],
        |c| {
            c.env("ZLAYER_TUNNEL_TOKEN", "second-token");
        },
    );
    other_token.wait_for("already registered on this server by another agent");
    server.wait_for("already registered on this server by another agent");
    // the service is undisturbed
    echo_through(([127, 0, 0, 1], public).into(), 1, 64 << 10).await;
}

/// A UDP service that answers each datagram with its tag, then the datagram.
async fn tagged_udp(tag: u8) -> u16 {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = vec![tag];
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    port
}

/// One exchange on `socket`: the tag of the replica that answered.
async fn ask(socket: &tokio::net::UdpSocket, query: &[u8]) -> Option<u8> {
    let mut buf = [0u8; 2048];
    for _ in 0..20 {
        socket.send(query).await.unwrap();
        let wait = std::time::Duration::from_millis(250);
        if let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buf)).await {
            assert_eq!(&buf[1..n], query, "the answer is the query, intact");
            return Some(buf[0]);
        }
    }
    None
}

#[actix_web::test]
async fn udp_flows_spread_over_replicas_and_stay_on_theirs() {
    let public = free_ports(1).0;
    let (mut server, url) = server((public, public), &[]);
    let spec = |local: u16| format!("dns:{local}:{public}");
    // one link each: one agent is one replica
    let mut a = Proc::spawn(&[
        "agent",
        "--server",
        &url,
        "--connections",
        "1",
        "--udp",
        &spec(tagged_udp(b'a').await),
    ]);
    assert_eq!(a.registered_port(), public);
    let mut b = Proc::spawn(&[
        "agent",
        "--server",
        &url,
        "--connections",
        "1",
        "--udp",
        &spec(tagged_udp(b'b').await),
    ]);
    assert_eq!(b.registered_port(), public);
    server.wait_for("replica joined");

    let mut sockets = Vec::new();
    let mut tags = Vec::new();
    for i in 0..20u8 {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(("127.0.0.1", public)).await.unwrap();
        tags.push(ask(&socket, &[i; 100]).await.expect("answered"));
        sockets.push(socket);
    }
    let on_a = tags.iter().filter(|t| **t == b'a').count();
    assert!((6..=14).contains(&on_a), "flows spread: {on_a} of 20 on a");
    // a flow stays on its replica for its life
    for (socket, tag) in sockets.iter().zip(&tags) {
        for round in 0..5u8 {
            assert_eq!(ask(socket, &[round; 300]).await, Some(*tag));
        }
    }

    a.child.kill().unwrap();
    server.wait_for("replica left");
    // every visitor is answered by the survivor, those that were on a included
    for socket in &sockets {
        assert_eq!(ask(socket, b"after").await, Some(b'b'));
    }
    b.child.kill().unwrap();
    server.wait_for("public UDP port closed");
}

/// An echo service on a port of its own that can be stopped (nothing
/// listens there) and started again on the same port.
struct Switchable {
    port: u16,
    served: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Switchable {
    async fn start(port: u16, served: Arc<AtomicUsize>) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = served.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(echo_counted(socket, count.clone()));
            }
        });
        Self {
            port,
            served,
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await; // the listener is dropped: its port refuses
        }
    }
}

/// An agent from a config file: `svc` from `local` on `public`, checked every 100 ms.
fn checked_agent(dir: &std::path::Path, url: &str, local: u16, public: u16) -> Proc {
    let path = dir.join(format!("agent-{local}.toml"));
    let text = format!(
        "server_url = \"{url}\"\n[[services]]\nname = \"svc\"\nlocal_port = {local}\nremote_port = {public}\n\
         health_check = \"tcp\"\nhealth_interval = \"100ms\"\nhealth_failures = 2\n"
    );
    std::fs::write(&path, text).unwrap();
    Proc::spawn(&["agent", "--config", path.to_str().unwrap()])
}

#[actix_web::test]
async fn a_replica_whose_service_fails_its_checks_gets_no_visitor_until_it_passes() {
    let public = free_ports(1).0;
    let (mut server, url) = server((public, public), &["--admin-listen", "127.0.0.1:0"]);
    let admin = server.listening_addr("admin endpoints listening");
    let dir = std::env::temp_dir().join(format!("zlt-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let served_a = Arc::new(AtomicUsize::new(0));
    let mut service_a = Switchable::start(0, served_a.clone()).await;
    let (local_b, served_b) = counting_echo().await;
    let mut a = checked_agent(&dir, &url, service_a.port, public);
    assert_eq!(a.registered_port(), public);
    let mut b = checked_agent(&dir, &url, local_b, public);
    assert_eq!(b.registered_port(), public);
    server.wait_for("replica joined");
    let addr = ([127, 0, 0, 1], public).into();

    service_a.stop().await;
    a.wait_for("fails its health checks");
    let line = server.wait_for("replica health changed");
    assert!(line.contains("healthy=false"), "{line}");
    let (before_a, before_b) = (
        served_a.load(Ordering::SeqCst),
        served_b.load(Ordering::SeqCst),
    );
    for seed in 0..30 {
        echo_through(addr, seed, 16 << 10).await; // none is refused
    }
    assert_eq!(served_b.load(Ordering::SeqCst) - before_b, 30);
    assert_eq!(served_a.load(Ordering::SeqCst), before_a);
    // /status and /metrics say which replica is out
    let status = common::http_get(&format!("http://{admin}/status")).await;
    let replicas = status.matches("\"healthy\":").count();
    assert!(
        replicas >= 2 && status.contains("\"healthy\":false"),
        "{status}"
    );
    let healthy = |metrics: &str, v: &str| {
        (metrics.lines())
            .filter(|l| l.starts_with("zlayer_tunnel_replica_healthy{") && l.ends_with(v))
            .count()
    };
    // each agent's two links (`connections` by default) are two replicas,
    // each link checking and reporting on its own
    wait_until("both of A's links out, both of B's in", || async {
        let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
        (healthy(&metrics, " 0"), healthy(&metrics, " 1")) == (2, 2)
    })
    .await;

    let _service_a = Switchable::start(service_a.port, service_a.served.clone()).await;
    a.wait_for("passes its health check again");
    let mut seed = 100;
    wait_until("the recovered replica gets visitors again", || {
        seed += 1;
        let served = served_a.clone();
        async move {
            let before = served.load(Ordering::SeqCst);
            echo_through(addr, seed, 4096).await;
            served.load(Ordering::SeqCst) > before
        }
    })
    .await;
    drop(b);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Agent A's service is down and A keeps two links (`--connections 2`):
/// a visitor one of A's links refuses is offered to B, never to A's other
/// link (which would dial the same dead service).
#[actix_web::test]
async fn a_visitor_the_first_replica_refuses_is_served_by_another_byte_exact() {
    let public = free_ports(1).0;
    let (mut server, url) = server((public, public), &[]);
    let down = free_ports(1).0; // nothing listens there: agent A's dial fails
    let (local_b, served_b) = counting_echo().await;
    let mut a = Proc::spawn(&[
        "agent",
        "--server",
        &url,
        "--connections",
        "2",
        "--tcp",
        &format!("svc:{down}:{public}"),
    ]);
    assert_eq!(a.registered_port(), public);
    let mut b = agent(&url, local_b, public);
    assert_eq!(b.registered_port(), public);
    // three replicas: the first starts the listener, two join it
    server.wait_for("replica joined");
    server.wait_for("replica joined");

    // every visitor sends its bytes and its FIN at once, before any agent
    // answers: those refused by A reach B whole
    let addr = ([127, 0, 0, 1], public).into();
    for round in 0..10u64 {
        let visitors = (0..10u64).map(|i| {
            let seed = round * 10 + i;
            echo_through(addr, seed, 1 + (seed as usize * 997) % (12 << 10))
        });
        futures::future::join_all(visitors).await;
    }
    assert_eq!(
        served_b.load(Ordering::SeqCst),
        100,
        "B served every visitor"
    );
    server.wait_for("the agent refused a visitor"); // A did get its share first

    // with B gone, A's refusal is the visitor's: no echo
    b.child.kill().unwrap();
    server.wait_for("replica left");
    // the reset may come before the connect or the write is done (a busy
    // machine: the RST was in before tokio read the connect's outcome);
    // either way, no echo
    match tokio::net::TcpStream::connect(addr).await {
        Ok(mut visitor) => {
            let _ = visitor.write_all(b"anyone?").await;
            let mut back = Vec::new();
            let got = visitor.read_to_end(&mut back).await;
            assert!(
                got.is_err() || back.is_empty(),
                "a refused visitor got {back:?}"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    a.child.kill().unwrap();
}

/// `--connections 2`: one agent keeps two links to the server, the second
/// a replica on a thread of its own; a visitor held open on one link does
/// not keep the others from the other, every byte arrives both ways, and
/// the agent stops at once with both links.
#[actix_web::test]
async fn an_agent_with_two_connections_is_two_replicas_and_every_byte_arrives() {
    let public = free_ports(1).0;
    let (mut server, url) = server((public, public), &["--admin-listen", "127.0.0.1:0"]);
    let server_admin = server.listening_addr("admin endpoints listening");
    let (local, served) = counting_echo().await;
    let mut agent = Proc::spawn(&[
        "agent",
        "--server",
        &url,
        "--connections",
        "2",
        "--admin-listen",
        "127.0.0.1:0",
        "--tcp",
        &format!("svc:{local}:{public}"),
    ]);
    let agent_admin = agent.listening_addr("admin endpoints listening");
    assert_eq!(agent.registered_port(), public);
    server.wait_for("replica joined");

    let addr = ([127, 0, 0, 1], public).into();
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(b"held").await.unwrap();
    let mut got = [0u8; 4];
    held.read_exact(&mut got).await.unwrap();
    let transfers: Vec<_> = (0..8)
        .map(|seed| tokio::spawn(echo_through(addr, seed, 1 << 20)))
        .collect();
    for transfer in transfers {
        transfer.await.unwrap();
    }
    held.write_all(b"more").await.unwrap();
    held.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"more", "the held visitor's stream was not touched");
    assert_eq!(served.load(Ordering::SeqCst), 9);
    // both links carried visitors: the server counts them per replica
    let metrics = common::http_get(&format!("http://{server_admin}/metrics")).await;
    let per_link: Vec<u64> = (metrics.lines())
        .filter(|l| l.starts_with("zlayer_tunnel_service_connections_total{service=\"svc\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(per_link.len(), 2, "{metrics}");
    assert!(per_link.iter().all(|&n| n > 0), "{per_link:?}");
    assert_eq!(per_link.iter().sum::<u64>(), 9);
    // and the agent names each link by server and connection number
    let metrics = common::http_get(&format!("http://{agent_admin}/metrics")).await;
    for n in 0..2 {
        let line =
            format!("zlayer_tunnel_agent_connected{{server=\"{url}\",connection=\"{n}\"}} 1\n");
        assert!(metrics.contains(&line), "{metrics}");
    }

    let (status, took) = agent.stop_with("TERM");
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        took < std::time::Duration::from_secs(3),
        "the agent took {took:?} to stop its two links"
    );
}
