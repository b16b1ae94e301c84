//! A cluster of servers sharing tokens in a real etcd (Debian's
//! `etcd-server`, which `.ci/run` installs), started here on free ports with
//! a data directory of its own: `token add` and every server accepts the
//! token within a second; `token revoke` and its tunnels close on every
//! server within two seconds; etcd down, and the servers keep what they saw.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::free_ports;
use common::process::Proc;
use common::wait::wait_until;

/// A one-member etcd on loopback, stopped (and its data removed) on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd on two free ports; ready once it answers `/health`.
    async fn start() -> Self {
        let (client_port, _) = free_ports(1);
        let (peer_port, _) = free_ports(1);
        let dir =
            std::env::temp_dir().join(format!("zlt-etcd-{}-{client_port}", std::process::id()));
        let mut etcd = Self {
            child: Self::spawn(&dir, client_port, peer_port),
            dir,
            url: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
        };
        etcd.wait_healthy().await;
        etcd
    }

    fn spawn(dir: &std::path::Path, client_port: u16, peer_port: u16) -> Child {
        let initial = format!("m1=http://127.0.0.1:{peer_port}");
        member(dir, "m1", client_port, peer_port, &initial)
    }

    async fn wait_healthy(&mut self) {
        let port = self.client_port;
        wait_until(
            "etcd answers /health",
            || async move { healthy(port).await },
        )
        .await;
    }

    /// kill -9, then the same member again on the same data.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn restart(&mut self) {
        self.child = Self::spawn(&self.dir, self.client_port, self.peer_port);
        self.wait_healthy().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts etcd member `name` of the cluster `initial` (`m1=URL,m2=URL,...`).
fn member(
    dir: &std::path::Path,
    name: &str,
    client_port: u16,
    peer_port: u16,
    initial: &str,
) -> Child {
    let client = format!("http://127.0.0.1:{client_port}");
    etcd_command(dir, name, &client, peer_port, initial)
        .spawn()
        .expect("etcd (Debian's etcd-server; `bash .ci/run` installs it)")
}

/// The command of etcd member `name`, serving clients at `client`.
fn etcd_command(
    dir: &std::path::Path,
    name: &str,
    client: &str,
    peer_port: u16,
    initial: &str,
) -> Command {
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = Command::new("etcd");
    etcd.args(["--name", name, "--data-dir"])
        .arg(dir)
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", initial])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    etcd
}

/// etcd members, killed (and their data removed) on drop, a failed test
/// included.
struct Members(Vec<Child>, PathBuf);

impl Drop for Members {
    fn drop(&mut self) {
        for member in &mut self.0 {
            let _ = member.kill();
            let _ = member.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// True when etcd at `port` says it is healthy.
async fn healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let ask = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if s.write_all(ask.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    answer.contains("\"health\":\"true\"")
}

/// Runs a `zlayer-tunnel token ...` command to its end; its stdout.
fn token_command(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
        .arg("token")
        .args(args)
        .env_remove("ZLAYER_TUNNEL_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A server of the cluster at `etcd` on `bind_host`, public ports `range`,
/// a port held 2 s after its last registration.
fn server_on(etcd: &str, bind_host: &str, range: (u16, u16)) -> (Proc, String) {
    let flags = ["--etcd", etcd, "--port-hold", "2s"];
    let mut server = Proc::server_bound_with(bind_host, range, &flags, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
    });
    let control = server.listening_addr("control channel listening");
    server.wait_for("cluster store: tokens read");
    (server, format!("ws://{control}/tunnel/v1"))
}

/// An agent with `token` publishing an echo service on `url`.
fn agent(url: &str, token: &str, local: u16) -> Proc {
    named_agent(url, token, "svc", local)
}

/// An agent with `token` publishing service `name` on `url`, port 0.
fn named_agent(url: &str, token: &str, name: &str, local: u16) -> Proc {
    let service = format!("{name}:{local}:0");
    Proc::spawn_with(&["agent", "--server", url, "--tcp", &service], |c| {
        c.args(ONE_LINK).env("ZLAYER_TUNNEL_TOKEN", token);
    })
}

/// The cluster's agents keep one link to a server: these tests follow one
/// registration per server in the agents' logs (tests/replicas.rs has
/// agents of two links).
const ONE_LINK: [&str; 2] = ["--connections", "1"];

/// Waits until `proc` logs `text`; how long that took from `since`.
fn logged_within(proc: &mut Proc, text: &str, since: Instant) -> Duration {
    proc.wait_for(text);
    since.elapsed()
}

#[actix_web::test]
async fn a_stored_token_is_accepted_by_every_server_and_its_revocation_closes_every_tunnel() {
    let etcd = Etcd::start().await;
    let range = free_ports(1);
    let (mut one, url_1) = server_on(&etcd.url, "127.0.0.1", range);
    let (mut two, url_2) = server_on(&etcd.url, "127.0.0.2", range);
    let local = common::services::echo().await;

    let added = Instant::now();
    let hash = token_command(&[
        "add",
        "--etcd",
        &etcd.url,
        "--token",
        "cluster-token",
        "--register",
        "svc",
    ]);
    assert_eq!(hash.trim(), zlayer_tunnel::hash_token("cluster-token"));
    for server in [&mut one, &mut two] {
        let took = logged_within(server, "cluster store: tokens read tokens=1", added);
        assert!(took < Duration::from_secs(1), "accepted after {took:?}");
    }
    let listed = token_command(&["list", "--etcd", &etcd.url]);
    assert!(
        listed.contains(hash.trim()) && listed.contains("register=svc"),
        "{listed}"
    );

    let mut on_1 = agent(&url_1, "cluster-token", local);
    let mut on_2 = agent(&url_2, "cluster-token", local);
    let port_1 = on_1.registered_port();
    let port_2 = on_2.registered_port();
    assert_eq!(port_1, port_2, "one service, one port in the cluster");
    common::echo_through(([127, 0, 0, 1], port_1).into(), 1, 64 << 10).await;
    common::echo_through(([127, 0, 0, 2], port_2).into(), 2, 64 << 10).await;

    let revoked = Instant::now();
    token_command(&["revoke", "--etcd", &etcd.url, "--hash", hash.trim()]);
    for agent in [&mut on_1, &mut on_2] {
        let took = logged_within(agent, "token was revoked", revoked);
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
    }
    // a token from no flag and no store is refused
    let mut stranger = agent(&url_1, "never-added", local);
    stranger.wait_for("invalid tunnel token");
}

#[actix_web::test]
async fn with_the_store_down_servers_keep_the_tokens_they_read() {
    let mut etcd = Etcd::start().await;
    token_command(&["add", "--etcd", &etcd.url, "--token", "kept-token"]);
    // this one from its file: `etcd = [..]` and `cluster_prefix`
    let public = free_ports(1).0;
    let dir = std::env::temp_dir().join(format!("zlt-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("server.toml");
    let toml = format!(
        "etcd = [\"{}\"]\ncluster_prefix = \"/zlayer-tunnel\"\n",
        etcd.url
    );
    std::fs::write(&file, toml).unwrap();
    let file = file.to_str().unwrap();
    let mut server = Proc::server_with((public, public), &["--config", file], |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
    });
    let control = server.listening_addr("control channel listening");
    let url = format!("ws://{control}/tunnel/v1");
    server.wait_for("cluster store: tokens read");
    let read = server
        .seen()
        .iter()
        .any(|l| l.contains("tokens read tokens=1"));
    assert!(read, "{:?}", server.seen());
    let local = common::services::echo().await;
    let mut agent = agent(&url, "kept-token", local);
    let port = agent.registered_port();

    etcd.kill();
    server.wait_for("tokens not followed");
    common::echo_through(([127, 0, 0, 1], port).into(), 3, 256 << 10).await;
    // its token still opens a tunnel, and the service's port is the one the
    // server last leased for it (a second agent of it: a replica)
    let mut replica = named_agent(&url, "kept-token", "svc", local);
    assert_eq!(replica.registered_port(), port);
    server.wait_for("the service gets the port it was last leased here");

    // the store back: the server follows it again, no restart
    etcd.restart().await;
    server.wait_for("cluster store reachable again");
    token_command(&["revoke", "--etcd", &etcd.url, "--token", "kept-token"]);
    agent.wait_for("token was revoked");
    replica.wait_for("token was revoked");
    let public_gone = || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    };
    wait_until("the revoked tunnel's port closes", public_gone).await;
}

#[actix_web::test]
async fn services_registering_at_once_on_two_servers_get_two_ports_and_keep_them() {
    let mut etcd = Etcd::start().await;
    token_command(&["add", "--etcd", &etcd.url, "--token", "port-token"]);
    let range = free_ports(3);
    let (mut one, url_1) = server_on(&etcd.url, "127.0.0.1", range);
    let (_two, url_2) = server_on(&etcd.url, "127.0.0.2", range);
    let local = common::services::echo().await;

    // without the store both would take the range's first port
    let mut a = named_agent(&url_1, "port-token", "alpha", local);
    let mut b = named_agent(&url_2, "port-token", "beta", local);
    let (port_a, port_b) = (a.registered_port(), b.registered_port());
    assert_ne!(port_a, port_b, "two services, one port");
    common::echo_through(([127, 0, 0, 1], port_a).into(), 4, 64 << 10).await;
    common::echo_through(([127, 0, 0, 2], port_b).into(), 5, 64 << 10).await;

    // alpha again on the other server: its port follows it
    drop(a);
    let mut again = named_agent(&url_2, "port-token", "alpha", local);
    assert_eq!(again.registered_port(), port_a, "the service kept its port");

    // the store down: a new service cannot get a port, and says why
    etcd.kill();
    let mut gamma = named_agent(&url_1, "port-token", "gamma", local);
    let refused = gamma.wait_for("registration refused");
    assert!(refused.contains("unreachable"), "{refused}");
    // the store back: it registers on its own retry, no server restarted
    etcd.restart().await;
    gamma.registered_port();
    one.wait_for("cluster store reachable again");
}

/// Eight servers' worth of leases asked at the same instant, on one range:
/// every service gets its own port (etcd's compare-and-swap decides the
/// races), and a service asking again gets its own back.
#[actix_web::test]
async fn concurrent_leases_never_give_one_port_twice() {
    use zlayer_tunnel::ClusterStore;
    use zlayer_tunnel::cluster::{ClusterKeys, PortClaim};
    let etcd = Etcd::start().await;
    let options = |_| zlayer_tunnel::EtcdOptions {
        endpoints: vec![etcd.url.clone()],
        keys: ClusterKeys::default(),
        ..Default::default()
    };
    let mut stores = Vec::new();
    for i in 0..8 {
        stores.push(zlayer_tunnel::EtcdStore::connect(options(i)).await.unwrap());
    }
    let claim = |i: usize| PortClaim {
        name: format!("service-{i}"),
        requested: 0,
        ranges: vec![(40000, 40007)],
        hold: Duration::from_secs(5),
    };
    let asks = stores
        .iter()
        .enumerate()
        .map(|(i, s)| s.lease_port(claim(i)));
    let leases: Vec<_> = futures::future::join_all(asks).await;
    let mut ports: Vec<u16> = leases.iter().map(|l| l.as_ref().unwrap().port).collect();
    ports.sort_unstable();
    assert_eq!(ports, (40000..=40007).collect::<Vec<_>>(), "{leases:?}");
    let again = stores[0].lease_port(claim(3)).await.unwrap();
    assert_eq!(Some(again.port), leases[3].as_ref().ok().map(|l| l.port));
    let full = stores[0].lease_port(claim(8)).await.unwrap_err();
    assert!(full.to_string().contains("no free public port"), "{full}");
}

/// A server of the cluster with peers: control on `control`, routes gone 1 s
/// after its death.
fn peer_server(etcd: &str, host: &str, (low, high): (u16, u16), control: u16) -> (Proc, String) {
    let range = format!("{low}-{high}");
    let listen = format!("127.0.0.1:{control}");
    let url = format!("ws://{listen}/tunnel/v1");
    let args = [
        "server",
        "--listen",
        &listen,
        "--port-range",
        &range,
        "--bind-host",
        host,
        "--etcd",
        etcd,
        "--peer-token",
        "peer-secret",
        "--advertise",
        &url,
        "--route-ttl",
        "1s",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let mut server = Proc::spawn_with(&args, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
    });
    server.wait_for("cluster store: tokens read");
    (server, url)
}

/// True if `len` bytes echo back whole through `addr` within two seconds.
async fn echoes(addr: SocketAddr, seed: u64, len: usize) -> bool {
    let attempt = tokio::spawn(common::echo_through(addr, seed, len));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(_))
    )
}

#[actix_web::test]
async fn any_server_answers_any_visitor_and_a_dead_one_stops_being_routed_to() {
    let etcd = Etcd::start().await;
    token_command(&["add", "--etcd", &etcd.url, "--token", "ha-token"]);
    let range = free_ports(1);
    let controls = free_ports(3).0;
    let (mut one, url_1) = peer_server(&etcd.url, "127.0.0.1", range, controls);
    let (_two, url_2) = peer_server(&etcd.url, "127.0.0.2", range, controls + 1);
    let (mut three, _) = peer_server(&etcd.url, "127.0.0.3", range, controls + 2);
    let local = common::services::echo().await;
    let service = format!("svc:{local}:0");
    let mut agent = Proc::spawn_with(
        &[
            "agent", "--server", &url_1, "--server", &url_2, "--tcp", &service,
        ],
        |c| {
            c.args(ONE_LINK).env("ZLAYER_TUNNEL_TOKEN", "ha-token");
        },
    );
    let port = agent.registered_port();
    three.wait_for("forwarding public port to a peer");
    for (host, seed) in [
        ([127, 0, 0, 1], 10),
        ([127, 0, 0, 2], 11),
        ([127, 0, 0, 3], 12),
    ] {
        common::echo_through((host, port).into(), seed, 1 << 20).await;
    }
    // server 3 says what it forwards, and the peer token is not logged
    let admin = three.listening_addr("admin endpoints listening");
    let forwarded = format!(
        "zlayer_tunnel_cluster_forwarded_streams_total{{service=\"svc\",protocol=\"tcp\",port=\"{port}\"}} 1\n"
    );
    // (the figures are those of the last round, twice a second)
    let counted = || {
        let forwarded = forwarded.clone();
        async move {
            let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
            metrics.contains(&forwarded) && metrics.contains("zlayer_tunnel_cluster_servers 2\n")
        }
    };
    wait_until("server 3 counts its forwarded stream", counted).await;
    let status = common::http_get(&format!("http://{admin}/status")).await;
    let reachable = status.contains("\"store_reachable\":true");
    assert!(reachable && status.contains("\"forwards\""), "{status}");
    let logged = three.seen().join("\n");
    assert!(!logged.contains("peer-secret"), "the peer token was logged");

    // four visitors held open through server 3: the fewest streams first,
    // two on each peer link
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut visitor = tokio::net::TcpStream::connect(("127.0.0.3", port))
            .await
            .unwrap();
        visitor.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        visitor.read_exact(&mut byte).await.unwrap();
        held.push(visitor);
    }
    let spread = || async move {
        let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
        let streams = |control: u16| {
            format!(
                "zlayer_tunnel_cluster_peer_link_streams{{peer=\"ws://127.0.0.1:{control}/tunnel/v1\"}} 2\n"
            )
        };
        metrics.contains(&streams(controls)) && metrics.contains(&streams(controls + 1))
    };
    wait_until("two held streams on each peer link", spread).await;
    drop(held);

    // server 1 dies during a transfer through 2: that one completes whole
    let through_two = tokio::spawn(common::echo_through(
        ([127, 0, 0, 2], port).into(),
        13,
        16 << 20,
    ));
    one.child.kill().unwrap();
    through_two.await.unwrap();
    // server 3 stops routing to 1 once its route expires: every visitor served
    let all_served = || async move {
        let mut served = true;
        for seed in 0..4 {
            served &= echoes(([127, 0, 0, 3], port).into(), 20 + seed, 4096).await;
        }
        served
    };
    wait_until("server 3 routes to server 2 alone", all_served).await;
    assert!(echoes(([127, 0, 0, 2], port).into(), 30, 1 << 20).await);
}

/// An agent's two links (the default) to one server of a cluster register
/// its service once: one port leased (two were free), each link a replica of
/// it, and visitors of either server reach the service through both links,
/// byte for byte.
#[actix_web::test]
async fn an_agents_two_links_share_one_leased_port_and_both_carry_visitors() {
    let etcd = Etcd::start().await;
    token_command(&["add", "--etcd", &etcd.url, "--token", "links-token"]);
    let range = free_ports(2);
    let controls = free_ports(2).0;
    let (mut one, url_1) = peer_server(&etcd.url, "127.0.0.1", range, controls);
    let (mut two, _) = peer_server(&etcd.url, "127.0.0.2", range, controls + 1);
    let local = common::services::echo().await;
    let service = format!("svc:{local}:0");
    let mut agent = Proc::spawn_with(&["agent", "--server", &url_1, "--tcp", &service], |c| {
        c.env("ZLAYER_TUNNEL_TOKEN", "links-token");
    });
    let port = agent.registered_port();
    assert_eq!(
        agent.registered_port(),
        port,
        "the second link took another port"
    );
    two.wait_for("forwarding public port to a peer");
    let visits = (0..8u64).map(|seed| {
        let host = [127, 0, 0, 1 + (seed % 2) as u8];
        common::echo_through((host, port).into(), 40 + seed, 1 << 20)
    });
    futures::future::join_all(visits).await;
    // server 1 counts each link's streams under the link's client id
    let admin = one.listening_addr("admin endpoints listening");
    let both_carried = || async move {
        let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
        let counts = metrics.lines().filter(|l| {
            l.starts_with("zlayer_tunnel_service_connections_total{service=\"svc\"")
                && !l.ends_with(" 0")
        });
        counts.count() == 2
    };
    wait_until("server 1 counts visitors on both links", both_carried).await;
}

/// Sends `count` datagrams of 1 B to 9 KB from `socket` to `to`, one at a
/// time, each resent until its echo comes back whole (UDP may lose one);
/// false if one never does within two seconds.
async fn datagrams_echo(
    socket: &tokio::net::UdpSocket,
    to: SocketAddr,
    seed: u64,
    count: u32,
) -> bool {
    let mut buf = vec![0u8; 65536];
    for seq in 0..count {
        let len = [1, 64, 1200, 1400, 9000][seq as usize % 5];
        let mut sent = common::pattern(seed << 32 | u64::from(seq), len);
        if len >= 4 {
            sent[..4].copy_from_slice(&seq.to_be_bytes());
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let echoed = loop {
            if Instant::now() >= deadline {
                break false;
            }
            socket.send_to(&sent, to).await.unwrap();
            let wait = tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf));
            // an echo of an earlier resend is skipped by its sequence number
            if let Ok(Ok(n)) = wait.await
                && buf[..n] == sent[..]
            {
                break true;
            }
        };
        if !echoed {
            return false;
        }
    }
    true
}

/// True if a few bytes sent from source address `from` to `to:port` come
/// back whole (false if the visitor is refused: reset or closed).
async fn echoes_from(from: [u8; 4], to: [u8; 4], port: u16) -> bool {
    exchange_from(from, (to, port), b"hello").await == b"hello"
}

/// What a visitor from source address `from` gets back from `to` for
/// `sent` and its end of stream (nothing if it is refused: reset or closed).
async fn exchange_from(from: [u8; 4], to: ([u8; 4], u16), sent: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut back = Vec::new();
    // a refused visitor's reset may come before the connect returns
    let Ok(mut s) = socket.connect(to.into()).await else {
        return back;
    };
    let _ = s.write_all(sent).await;
    let _ = s.shutdown().await;
    let _ = s.read_to_end(&mut back).await;
    back
}

/// Two servers of one cluster (127.0.0.1 and 127.0.0.2) and an agent
/// linked to the first with `token` and `agent_args`; the second forwards
/// the agent's service to the first.
struct TwoServers {
    _etcd: Etcd,
    _one: Proc,
    two: Proc,
    _agent: Proc,
    /// The service's public port (on both).
    port: u16,
}

async fn two_servers_with_agent(token: &str, agent_args: &[&str]) -> TwoServers {
    let etcd = Etcd::start().await;
    token_command(&["add", "--etcd", &etcd.url, "--token", token]);
    let range = free_ports(1);
    let controls = free_ports(2).0;
    let (one, url_1) = peer_server(&etcd.url, "127.0.0.1", range, controls);
    let (mut two, _) = peer_server(&etcd.url, "127.0.0.2", range, controls + 1);
    let mut args = vec!["agent", "--server", &url_1];
    args.extend_from_slice(agent_args);
    let mut agent = Proc::spawn_with(&args, |c| {
        c.args(ONE_LINK).env("ZLAYER_TUNNEL_TOKEN", token);
    });
    let port = agent.registered_port();
    two.wait_for("forwarding public port to a peer");
    TwoServers {
        _etcd: etcd,
        _one: one,
        two,
        _agent: agent,
        port,
    }
}

/// A UDP service registered on server 1 answers visitors of server 2 too:
/// each visitor address is a flow through the peer link, byte-exact both ways.
#[actix_web::test]
async fn udp_visitors_of_a_server_without_the_service_go_through_a_peer() {
    let service = format!("dns:{}:0", common::services::udp_echo());
    // (bound whole: its servers and agent live until the test ends)
    let mut cluster = two_servers_with_agent("udp-token", &["--udp", &service]).await;
    let (two, port) = (&mut cluster.two, cluster.port);
    let direct = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert!(datagrams_echo(&direct, ([127, 0, 0, 1], port).into(), 1, 20).await);
    // three visitors at once through server 2: three flows over the peer link
    let visitors = (0..3u64).map(|v| async move {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        datagrams_echo(&socket, ([127, 0, 0, 2], port).into(), 10 + v, 100).await
    });
    let echoed = futures::future::join_all(visitors).await;
    assert_eq!(echoed, [true; 3], "every datagram echoed through the peer");
    let admin = two.listening_addr("admin endpoints listening");
    let flows = format!(
        "zlayer_tunnel_cluster_forwarded_streams_total{{service=\"dns\",protocol=\"udp\",port=\"{port}\"}} 3\n"
    );
    let counted = || {
        let flows = flows.clone();
        async move {
            let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
            metrics.contains(&flows)
        }
    };
    wait_until("server 2 counts the three forwarded flows", counted).await;
}

/// A three-member etcd on loopback, one member killed: the tunnels, a new
/// token and a new service's port go on through the other two.
#[actix_web::test]
async fn one_etcd_member_of_three_lost_changes_nothing() {
    let clients = free_ports(3).0;
    let peers = free_ports(3).0;
    let initial = (0..3)
        .map(|i| format!("m{i}=http://127.0.0.1:{}", peers + i))
        .collect::<Vec<_>>()
        .join(",");
    let base = std::env::temp_dir().join(format!("zlt-etcd3-{}-{clients}", std::process::id()));
    let mut members = Members(Vec::new(), base.clone());
    members.0 = (0..3)
        .map(|i| {
            member(
                &base.join(i.to_string()),
                &format!("m{i}"),
                clients + i,
                peers + i,
                &initial,
            )
        })
        .collect();
    for i in 0..3 {
        let port = clients + i;
        wait_until("the member answers /health", || async move {
            healthy(port).await
        })
        .await;
    }
    let endpoints = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", clients + i))
        .collect::<Vec<_>>()
        .join(",");
    token_command(&["add", "--etcd", &endpoints, "--token", "three-token"]);
    let range = free_ports(2);
    let (mut server, url) = server_on(&endpoints, "127.0.0.1", range);
    let local = common::services::echo().await;
    let mut first = named_agent(&url, "three-token", "first", local);
    let port = first.registered_port();

    let _ = members.0[0].kill();
    let _ = members.0[0].wait();
    common::echo_through(([127, 0, 0, 1], port).into(), 40, 1 << 20).await;
    token_command(&["add", "--etcd", &endpoints, "--token", "later-token"]);
    // (its watch may have been on the lost member: the server watches anew)
    server.wait_for("tokens read tokens=2");
    let mut second = named_agent(&url, "later-token", "second", local);
    let other = second.registered_port();
    assert_ne!(other, port);
    common::echo_through(([127, 0, 0, 1], other).into(), 41, 1 << 20).await;
}

/// `token add` reads the token from stdin; what is wrong is said plainly.
#[actix_web::test]
async fn token_commands_read_stdin_and_say_what_is_wrong() {
    use std::io::Write as _;
    let etcd = Etcd::start().await;
    let mut add = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
        .args(["token", "add", "--etcd", &etcd.url, "--access", "db"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"piped-token\n")
        .unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = zlayer_tunnel::hash_token("piped-token");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hash);
    let listed = token_command(&["list", "--etcd", &etcd.url]);
    assert!(
        listed.contains(&format!("{hash} register=* access=db ports=*")),
        "{listed}"
    );

    let failed = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
            .arg("token")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let unknown = failed(&["revoke", "--etcd", &etcd.url, "--hash", &"0".repeat(64)]);
    assert!(unknown.contains("no token with hash"), "{unknown}");
    let bad = failed(&["add", "--etcd", &etcd.url, "--hash", "abc"]);
    assert!(bad.contains("64 hex digits"), "{bad}");
    let empty = failed(&["add", "--etcd", &etcd.url]);
    assert!(empty.contains("no token"), "{empty}");
}

/// An etcd with authentication on: the commands and the servers sign in
/// with `--etcd-user` and the password in the environment; without them
/// they are refused, saying so.
#[actix_web::test]
async fn an_etcd_with_authentication_is_reached_with_its_credentials() {
    let etcd = Etcd::start().await;
    let mut admin = etcd_client::Client::connect([etcd.url.as_str()], None)
        .await
        .unwrap();
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let signed_in = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
            .arg("token")
            .args(args)
            .args(["--etcd-user", "root"])
            .env("ZLAYER_TUNNEL_ETCD_PASSWORD", "root-secret")
            .output()
            .unwrap()
    };
    let added = signed_in(&["add", "--etcd", &etcd.url, "--token", "authed-token"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let anonymous = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
        .args(["token", "list", "--etcd", &etcd.url])
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "an anonymous list was answered"
    );

    let public = free_ports(1).0;
    let mut server = Proc::server_with(
        (public, public),
        &["--etcd", &etcd.url, "--etcd-user", "root"],
        |c| {
            c.env_remove("ZLAYER_TUNNEL_TOKEN");
            c.env("ZLAYER_TUNNEL_ETCD_PASSWORD", "root-secret");
        },
    );
    let control = server.listening_addr("control channel listening");
    server.wait_for("cluster store: tokens read tokens=1");
    let url = format!("ws://{control}/tunnel/v1");
    let local = common::services::echo().await;
    let mut agent = agent(&url, "authed-token", local);
    let port = agent.registered_port();
    common::echo_through(([127, 0, 0, 1], port).into(), 50, 64 << 10).await;
    assert!(
        !server.seen().join("\n").contains("root-secret"),
        "the password was logged"
    );
}

/// etcd serving its clients over TLS with a private CA: servers and `token`
/// commands reach it with `--etcd-ca`; without it they are refused, saying so.
#[actix_web::test]
async fn an_etcd_over_tls_is_reached_with_its_ca() {
    let (ca, pem) = common::certs::private_ca();
    let (client_port, _) = free_ports(1);
    let (peer_port, _) = free_ports(1);
    let base =
        std::env::temp_dir().join(format!("zlt-etcd-tls-{}-{client_port}", std::process::id()));
    let pki = base.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let (cert, key, ca_file) = (
        pki.join("etcd.pem"),
        pki.join("etcd.key"),
        pki.join("ca.pem"),
    );
    std::fs::write(&cert, &pem.cert).unwrap();
    std::fs::write(&key, &pem.key).unwrap();
    std::fs::write(&ca_file, &ca).unwrap();
    let client = format!("https://127.0.0.1:{client_port}");
    let initial = format!("m1=http://127.0.0.1:{peer_port}");
    let etcd = etcd_command(&base.join("data"), "m1", &client, peer_port, &initial)
        .arg("--cert-file")
        .arg(&cert)
        .arg("--key-file")
        .arg(&key)
        .spawn()
        .expect("etcd (Debian's etcd-server; `bash .ci/run` installs it)");
    let _members = Members(vec![etcd], base.clone());
    let ca_arg = ca_file.to_str().unwrap().to_owned();
    let listed = |with_ca: bool| {
        let mut list = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"));
        list.args(["token", "list", "--etcd", &client]);
        if with_ca {
            list.args(["--etcd-ca", &ca_arg]);
        }
        list.env_remove("ZLAYER_TUNNEL_TOKEN").output().unwrap()
    };
    let answered = || {
        let out = listed(true);
        async move { out.status.success() }
    };
    wait_until("etcd answers over TLS", answered).await;
    let untrusted = listed(false);
    assert!(
        !untrusted.status.success(),
        "etcd's certificate was trusted without its CA"
    );
    token_command(&[
        "add",
        "--etcd",
        &client,
        "--etcd-ca",
        &ca_arg,
        "--token",
        "tls-token",
    ]);

    let public = free_ports(1).0;
    let args = ["--etcd", client.as_str(), "--etcd-ca", ca_arg.as_str()];
    let mut server = Proc::server_with((public, public), &args, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
    });
    let control = server.listening_addr("control channel listening");
    server.wait_for("cluster store: tokens read tokens=1");
    let local = common::services::echo().await;
    let mut agent = agent(&format!("ws://{control}/tunnel/v1"), "tls-token", local);
    let port = agent.registered_port();
    common::echo_through(([127, 0, 0, 1], port).into(), 60, 64 << 10).await;
}

/// A service's address lists hold on every server: a server that forwards
/// the service to a peer checks them before passing a visitor on.
#[actix_web::test]
async fn a_services_address_lists_hold_on_the_servers_that_forward_it() {
    let service = format!("svc:{}:0", common::services::echo().await);
    let agent = ["--tcp", service.as_str(), "--deny", "127.0.0.5"];
    let mut cluster = two_servers_with_agent("lists-token", &agent).await;
    let (two, port) = (&mut cluster.two, cluster.port);
    let visit = |from: [u8; 4]| echoes_from(from, [127, 0, 0, 2], port);
    assert!(
        visit([127, 0, 0, 6]).await,
        "an admitted visitor through the peer"
    );
    assert!(
        !visit([127, 0, 0, 5]).await,
        "a denied one, refused by server 2"
    );
    let admin = two.listening_addr("admin endpoints listening");
    let counted = || async move {
        let status = common::http_get(&format!("http://{admin}/status")).await;
        status.contains("\"visitors_refused\":[1,0,0]")
    };
    wait_until("server 2 counts the refusal", counted).await;
}

/// A service's visitor rate and bandwidth hold on a server that forwards
/// it: server 2 reads its visitors no faster than the service's bandwidth
/// (an upload: server 1 gets it from the peer link, unpaced, and the agent
/// paces only what it reads from the service), and admits new connections
/// from one address no more often than its rate.
#[actix_web::test]
async fn a_services_rate_and_bandwidth_hold_on_the_servers_that_forward_it() {
    let service = format!("svc:{}:0", common::services::digest().await);
    let limits = ["--visitor-rate", "1", "--bandwidth", "262144"];
    let agent = [&["--tcp", service.as_str()][..], &limits].concat();
    let mut cluster = two_servers_with_agent("limits-token", &agent).await;
    let (two, port) = (&mut cluster.two, cluster.port);
    // 768 KiB at 256 KiB/s with a burst of one second's worth: 2 s at least
    let started = Instant::now();
    common::upload_digest_to(([127, 0, 0, 2], port).into(), 1, 768 << 10).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800), "768 KiB in {took:?}");

    // one new connection a second from 127.0.0.7, with a burst of one
    let started = Instant::now();
    let mut admitted = 0;
    for _ in 0..6 {
        admitted += usize::from(answered_from([127, 0, 0, 7], [127, 0, 0, 2], port).await);
    }
    let allowed = 1 + started.elapsed().as_secs() as usize;
    assert!(
        (1..=allowed).contains(&admitted),
        "{admitted} of 6 admitted, {allowed} allowed"
    );
    let admin = two.listening_addr("admin endpoints listening");
    let refused = 6 - admitted;
    let counted = || async move {
        let status = common::http_get(&format!("http://{admin}/status")).await;
        status.contains(&format!("\"visitors_refused\":[0,0,{refused}]"))
    };
    wait_until("server 2 counts the refusals", counted).await;
}

/// True if a digest service behind `to:port` answers a visitor from `from`
/// (false if the visitor is refused: reset or closed).
async fn answered_from(from: [u8; 4], to: [u8; 4], port: u16) -> bool {
    exchange_from(from, (to, port), b"x").await.len() == 40
}

/// A service that answers each connection with its first line (the PROXY
/// protocol v1 header its agent writes) and closes.
async fn first_line_service() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while s.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let _ = s.write_all(&line).await;
            });
        }
    });
    port
}

/// A visitor forwarded through a peer link keeps its address: the agent's
/// PROXY header names the visitor and the public address it reached, as
/// for a visitor of the server the agent is linked to.
#[actix_web::test]
async fn a_forwarded_visitors_address_reaches_the_service_in_its_proxy_header() {
    let service = format!("px:{}:0", first_line_service().await);
    let agent = ["--tcp", service.as_str(), "--proxy-protocol", "v1"];
    let cluster = two_servers_with_agent("proxy-token", &agent).await;
    let port = cluster.port;
    let header_seen = |from: [u8; 4], server: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((from, 0).into()).unwrap();
        let mut s = socket.connect((server, port).into()).await.unwrap();
        let me = s.local_addr().unwrap();
        let mut line = String::new();
        s.read_to_string(&mut line).await.unwrap();
        (me, line)
    };
    let (me, line) = header_seen([127, 0, 0, 8], [127, 0, 0, 1]).await;
    assert_eq!(
        line,
        format!("PROXY TCP4 127.0.0.8 127.0.0.1 {} {port}\r", me.port())
    );
    let (me, line) = header_seen([127, 0, 0, 7], [127, 0, 0, 2]).await;
    assert_eq!(
        line,
        format!("PROXY TCP4 127.0.0.7 127.0.0.2 {} {port}\r", me.port())
    );
}

/// A stored token's visitor lists (`token add --visitors-deny`) hold for
/// the services it registers, on any server of the cluster.
#[actix_web::test]
async fn a_stored_tokens_visitor_lists_apply_to_its_services() {
    let etcd = Etcd::start().await;
    let add = ["add", "--etcd", &etcd.url, "--token", "listed-token"];
    token_command(&[&add[..], &["--visitors-deny", "127.0.0.9"]].concat());
    let listed = token_command(&["list", "--etcd", &etcd.url]);
    assert!(listed.contains("visitors_deny=127.0.0.9/32"), "{listed}");
    let (_server, url) = server_on(&etcd.url, "127.0.0.1", free_ports(1));
    let local = common::services::echo().await;
    let mut agent = agent(&url, "listed-token", local);
    let port = agent.registered_port();
    let visit = |from: [u8; 4]| echoes_from(from, [127, 0, 0, 1], port);
    assert!(visit([127, 0, 0, 10]).await);
    assert!(!visit([127, 0, 0, 9]).await, "the token's deny list");
}
