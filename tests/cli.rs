//! The `zlayer-tunnel` binary as an operator runs it: token utilities, a
//! hashed-token server and an agent moving bytes, a wrong token, bad flags,
//! and a prompt, clean stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::Proc;
use common::{echo_through, free_ports, services, wait_closed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_zlayer-tunnel");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("ZLAYER_TUNNEL_TOKEN")
        .output()
        .unwrap()
}

/// The binary with `args` and no token in its environment; killed on drop.
/// A CLI server (see `Proc::server`) without the test's token in its environment.
fn server(public: (u16, u16), flags: &[&str]) -> Proc {
    Proc::server_with(public, flags, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
    })
}

fn spawn(args: &[&str]) -> Proc {
    Proc::spawn_with(args, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
    })
}

/// A server on a control port of the OS's choosing publishing on port
/// `public` only, listening once this returns; and its control URL.
fn server_proc(public: u16) -> (Proc, String) {
    let mut server = Proc::server((public, public), &[]);
    let url = control_url(&mut server);
    (server, url)
}

/// The control URL of server `server` (told to listen on port 0), once it listens.
fn control_url(server: &mut Proc) -> String {
    format!("ws://{}/tunnel/v1", control_addr(server))
}

/// Where server `server` (told to listen on port 0) listens, once it does.
fn control_addr(server: &mut Proc) -> std::net::SocketAddr {
    server.listening_addr("control channel listening")
}

/// An agent for the one service `spec` at `url`, once it says it registered
/// (the server listens on the public port by then).
fn registered_agent(url: &str, spec: &str) -> Proc {
    let mut agent = Proc::spawn(&["agent", "--server", url, "--tcp", spec]);
    agent.registered_port();
    agent
}

/// A fresh directory for a test's files.
fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("zlt-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The first line `child` prints on its (piped) stdout, within the deadline.
async fn first_stdout_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line
    });
    tokio::time::timeout(common::DEADLINE, line)
        .await
        .expect("nothing printed on stdout")
        .unwrap()
}

/// Sends SIGTERM and waits for the exit; returns the status and how long it took.
fn terminate(process: &mut Proc) -> (std::process::ExitStatus, Duration) {
    process.stop_with("TERM")
}

#[test]
fn token_hash_prints_the_hash_and_nothing_else() {
    let out = run(&["token", "hash", "test"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
    );
    let out = run(&["token", "generate"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1], zlayer_tunnel::hash_token(lines[0]));
}

#[test]
fn help_and_bad_flags() {
    for cmd in [
        &["--help"][..],
        &["server", "--help"],
        &["agent", "--help"],
        &["token", "--help"],
    ] {
        let out = run(cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(String::from_utf8(out.stdout).unwrap().contains("Usage"));
    }
    let out = run(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--port-range",
        "9-3",
        "--token",
        "t",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("--port-range")
    );
    let out = run(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--port-range",
        "30000-30001",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("no token configured")
    );
}

#[actix_web::test]
async fn a_hashed_token_server_and_an_agent_move_bytes_and_stop_cleanly() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let hash = zlayer_tunnel::hash_token("s3cret");
    let mut server = server((public, public), &["--token-hash", &hash]);
    let control = control_addr(&mut server);
    let url = format!("ws://{control}/tunnel/v1");
    let spec = format!("echo:{echo}:0");
    let args = ["agent", "--server", &url, "--tcp", &spec];
    let mut agent = Proc::spawn_with(
        &[&args[..], &["--admin-listen", "127.0.0.1:0"]].concat(),
        |c| {
            c.env("ZLAYER_TUNNEL_TOKEN", "s3cret");
        },
    );
    assert_eq!(agent.registered_port(), public);

    echo_through(([127, 0, 0, 1], public).into(), 9, 3 << 20).await;

    // a scraper's kept-alive connection to the admin listener does not
    // hold the stop
    let admin = agent.listening_addr("admin endpoints listening");
    let mut scraper = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    scraper.write_all(request.as_bytes()).await.unwrap();
    let mut answer = [0; 64];
    let _ = scraper.read(&mut answer).await.unwrap();
    let (status, took) = terminate(&mut agent);
    assert!(
        status.success() && took < Duration::from_secs(1),
        "agent: {status} after {took:?}"
    );
    assert!(
        wait_closed(public, Duration::from_secs(1)).await,
        "public port open after the agent left"
    );
    let (status, took) = terminate(&mut server);
    assert!(
        status.success() && took < Duration::from_secs(2),
        "server: {status} after {took:?}"
    );
    assert!(wait_closed(control.port(), Duration::from_secs(1)).await);
    let log = agent.log();
    assert!(
        !log.contains("s3cret"),
        "the token leaked into the agent's log"
    );
}

#[actix_web::test]
async fn an_agent_with_a_wrong_token_exits_with_the_reason() {
    let public = free_ports(1).0;
    let range = format!("{public}-{public}");
    let mut server = spawn(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--port-range",
        &range,
        "--token",
        "right",
    ]);
    let url = control_url(&mut server);
    let mut agent = spawn(&["agent", "--server", &url, "--token", "wrong"]);
    let status = agent.exited_within(common::DEADLINE);
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let err = agent.log();
    let said = "error: the server does not accept this token (ZLAYER_TUNNEL_TOKEN or --token): \
                authentication error: invalid tunnel token";
    assert!(err.contains(said), "{err}");
    // so does access, saying it once
    let access = [
        "access",
        "--server",
        &url,
        "--service",
        "x",
        "--token",
        "wrong",
    ];
    let out = run(&access);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(said), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(last.matches("authentication error").count(), 1, "{err}");
    assert!(
        !err.contains("wrong\n") && !err.contains("\"wrong\""),
        "the token leaked: {err}"
    );
    terminate(&mut server);
}

#[actix_web::test]
async fn config_files_drive_server_and_agent_and_flags_override_them() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let dir = temp_dir();
    let server_toml = dir.join("server.toml");
    std::fs::write(
        &server_toml,
        format!(
            "listen = [\"127.0.0.1:0\"]\ntoken_hashes = [\"{}\"]\n[tunnel]\ndata_port_range = [1, 2]\nbind_host = \"127.0.0.1\"\n",
            zlayer_tunnel::hash_token("filetoken")
        ),
    )
    .unwrap();
    // the flag overrides the file's port range
    let range = format!("{public}-{public}");
    let mut server = spawn(&[
        "server",
        "--config",
        server_toml.to_str().unwrap(),
        "--port-range",
        &range,
    ]);
    let url = control_url(&mut server);
    let agent_toml = dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!("server_url = \"{url}\"\n[[services]]\nname = \"echo\"\nlocal_port = {echo}\n"),
    )
    .unwrap();
    let mut agent = Proc::spawn_with(&["agent", "--config", agent_toml.to_str().unwrap()], |c| {
        c.env("ZLAYER_TUNNEL_TOKEN", "filetoken");
    });
    assert_eq!(agent.registered_port(), public);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", public))
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    terminate(&mut agent);
    terminate(&mut server);
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "listen = [\"127.0.0.1:1\"]\nlisten_typo = 1\n").unwrap();
    let out = run(&["server", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("listen_typo")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `[[tokens]]` entry's `ports` in the server's file holds its agent to
/// those public ports: a service asking for any port gets the scope's.
#[actix_web::test]
async fn a_token_file_scope_holds_an_agent_to_its_ports() {
    let (low, high) = free_ports(2);
    let echo = services::echo().await;
    let dir = temp_dir();
    let server_toml = dir.join("server.toml");
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\n[[tokens]]\nhash = \"{}\"\nports = [[{high}, {high}]]\n[tunnel]\ndata_port_range = [{low}, {high}]\nbind_host = \"127.0.0.1\"\n",
        zlayer_tunnel::hash_token(common::process::TOKEN)
    );
    std::fs::write(&server_toml, text).unwrap();
    let mut server = Proc::spawn(&["server", "--config", server_toml.to_str().unwrap()]);
    let url = control_url(&mut server);
    let _agent = registered_agent(&url, &format!("echo:{echo}:0"));
    // without the scope, port 0 would be the range's lowest, `low`
    echo_through(([127, 0, 0, 1], high).into(), 1, 64 << 10).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[actix_web::test]
async fn status_and_metrics_count_a_real_transfer_byte_for_byte() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let mut server = server(
        (public, public),
        &["--token", "t", "--admin-listen", "127.0.0.1:0"],
    );
    let url = control_url(&mut server);
    let admin_addr = server.listening_addr("admin endpoints listening");
    let spec = format!("web:{echo}:{public}");
    let agent_args = ["agent", "--server", &url, "--token", "t", "--tcp", &spec];
    let mut agent = Proc::spawn_with(&agent_args, |c| {
        c.args(["--admin-listen", "127.0.0.1:0", "--connections", "1"])
            .stdout(Stdio::piped());
    });
    let agent_admin = agent.listening_addr("admin endpoints listening");
    // the agent prints each public address on stdout, once registered
    let first = first_stdout_line(&mut agent.child).await;
    assert_eq!(first, format!("web tcp 127.0.0.1:{public}\n"));
    let client = awc::Client::new();
    let get = |path: &str| client.get(format!("http://{admin_addr}{path}")).send();
    let baseline: serde_json::Value = get("/status").await.unwrap().json().await.unwrap();
    let before = &baseline["tunnels"][0]["services"][0]["stats"];
    let (in0, out0) = (
        before["bytes_in"].as_u64().unwrap(),
        before["bytes_out"].as_u64().unwrap(),
    );

    const LEN: usize = 1_234_567;
    let data = common::pattern(3, LEN);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", public))
        .await
        .unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, got) = tokio::join!(send, r.read_to_end(&mut back));
    got.unwrap();
    assert_eq!(back.len(), LEN);

    let status: serde_json::Value = get("/status").await.unwrap().json().await.unwrap();
    let service = &status["tunnels"][0]["services"][0];
    assert_eq!(service["name"], "web");
    assert_eq!(service["port"], public);
    assert_eq!(
        service["stats"]["bytes_in"].as_u64().unwrap() - in0,
        LEN as u64
    );
    assert_eq!(
        service["stats"]["bytes_out"].as_u64().unwrap() - out0,
        LEN as u64
    );
    let metrics = String::from_utf8(
        get("/metrics")
            .await
            .unwrap()
            .body()
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    // the server's series carry the registration's client id (replicas share a name and port)
    let series = format!(
        "zlayer_tunnel_service_bytes_total{{service=\"web\",protocol=\"tcp\",port=\"{public}\",client_id=\""
    );
    let value = format!("\",direction=\"in\"}} {}", in0 + LEN as u64);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&series) && l.ends_with(&value)),
        "{series}...{value} not in\n{metrics}"
    );
    assert!(metrics.contains("zlayer_tunnel_tunnels 1\n"));
    let health = get("/healthz").await.unwrap().body().await.unwrap();
    assert_eq!(&health[..], b"ok\n");

    // the agent's own admin listener counts the same bytes
    let agent_get = |path: &str| client.get(format!("http://{agent_admin}{path}")).send();
    let status: serde_json::Value = agent_get("/status").await.unwrap().json().await.unwrap();
    assert_eq!(status["connected"], true, "{status}");
    let service = &status["services"][0];
    assert_eq!(
        (&service["name"], &service["port"]),
        (&"web".into(), &public.into())
    );
    assert_eq!(service["stats"]["bytes_in"].as_u64().unwrap(), LEN as u64);
    assert_eq!(service["stats"]["bytes_out"].as_u64().unwrap(), LEN as u64);
    let body = agent_get("/metrics").await.unwrap().body().await.unwrap();
    let metrics = String::from_utf8(body.to_vec()).unwrap();
    let connected =
        format!("zlayer_tunnel_agent_connected{{server=\"{url}\",connection=\"0\"}} 1\n");
    assert!(
        metrics.contains(&connected),
        "{connected} not in\n{metrics}"
    );
    let line = format!(
        "zlayer_tunnel_service_bytes_total{{service=\"web\",protocol=\"tcp\",port=\"{public}\",direction=\"out\"}} {LEN}"
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    terminate(&mut agent);
    terminate(&mut server);
}

#[actix_web::test]
async fn a_frozen_agent_is_dropped_and_comes_back_when_thawed() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let mut server = server(
        (public, public),
        &[
            "--token",
            "t",
            "--heartbeat-interval",
            "300ms",
            "--heartbeat-timeout",
            "1500ms",
        ],
    );
    let url = control_url(&mut server);
    let spec = format!("echo:{echo}:{public}");
    let mut agent = spawn(&["agent", "--server", &url, "--token", "t", "--tcp", &spec]);
    // each of its two links (the default) registers
    assert_eq!(agent.registered_port(), public);
    assert_eq!(agent.registered_port(), public);
    let public_addr = ([127, 0, 0, 1], public).into();
    echo_through(public_addr, 1, 64 << 10).await;

    agent.signal("STOP");
    let frozen = Instant::now();
    // the server says when it drops the agent; no probe visitors meanwhile
    // (each would be a stream the frozen agent must open when it thaws)
    server.wait_for("heartbeat timeout");
    let dropped_after = frozen.elapsed();
    assert!(
        wait_closed(public, Duration::from_secs(1)).await,
        "the server kept a frozen agent's port"
    );
    // within the heartbeat timeout, plus a watchdog tick (a timeout short
    // enough to drop a live agent that the tests' load stalls made it flaky)
    assert!(
        dropped_after < Duration::from_secs(4),
        "dropped after {dropped_after:?}"
    );

    agent.signal("CONT");
    // the agent noticed, reconnected, got its port back on both links
    assert_eq!(agent.registered_port(), public);
    assert_eq!(agent.registered_port(), public);
    echo_through(public_addr, 1, 64 << 10).await;
    terminate(&mut agent);
    terminate(&mut server);
}

#[actix_web::test]
async fn the_server_listens_and_publishes_on_ipv6() {
    // a port of the test window (free on 127.0.0.1 when handed out; nothing
    // else in this process binds it, on any address)
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let range = format!("{public}-{public}");
    let mut server = spawn(&[
        "server",
        "--listen",
        "[::1]:0",
        "--port-range",
        &range,
        "--bind-host",
        "::1",
        "--token",
        "t",
    ]);
    let control = control_addr(&mut server);
    assert!(control.is_ipv6(), "{control}");
    let url = format!("ws://{control}/tunnel/v1");
    let spec = format!("echo:{echo}:{public}");
    let public_addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, public));
    let agent_args = ["agent", "--server", &url, "--token", "t", "--tcp", &spec];
    let mut agent = Proc::spawn_with(&agent_args, |c| {
        c.stdout(Stdio::piped());
    });
    let first = first_stdout_line(&mut agent.child).await;
    assert_eq!(first, format!("echo tcp [::1]:{public}\n"));
    echo_through(public_addr, 1, 64 << 10).await;
    terminate(&mut agent);
    terminate(&mut server);
}

#[actix_web::test]
async fn an_agent_stops_promptly_while_waiting_to_reconnect() {
    let public = free_ports(1).0;
    let (server, url) = server_proc(public);
    let spec = format!("svc:1:{public}");
    let mut agent = registered_agent(&url, &spec);
    drop(server);
    // the second wait is 1-2 s long: stop in the middle of it
    agent.wait_for("reconnecting after a delay");
    agent.wait_for("reconnecting after a delay");
    let (status, took) = terminate(&mut agent);
    assert!(
        status.success() && took < Duration::from_secs(1),
        "agent: {status} after {took:?}"
    );
}

#[actix_web::test]
async fn a_udp_service_through_the_binaries() {
    let public = free_ports(1).0;
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let (_server, url) = server_proc(public);
    let spec = format!("dns:{echo_port}:{public}");
    let mut agent = Proc::spawn(&["agent", "--server", &url, "--udp", &spec]);
    agent.wait_for("service registered");
    let visitor = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..10u8 {
        let query = [i; 100];
        visitor
            .send_to(&query, ("127.0.0.1", public))
            .await
            .unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), visitor.recv_from(&mut buf))
            .await
            .expect("no UDP answer through the binaries")
            .unwrap();
        assert_eq!(&buf[..n], &query[..]);
    }
}

/// What a user meets first, each error naming the flag (or the file's
/// key) and what to do; none a `Debug` dump.
#[actix_web::test]
async fn errors_name_the_flag_and_what_to_do() {
    let out = run(&[
        "agent",
        "--server",
        "ws://127.0.0.1:1/tunnel/v1",
        "--tcp",
        "a:1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: no token: set ZLAYER_TUNNEL_TOKEN (or give --token"),
        "{err}"
    );
    let out = run(&["agent", "--token", "t", "--tcp", "a:1:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: no server: give --server ws://"),
        "{err}"
    );
    let out = run(&["agent", "--token", "t", "--server", "http://x/tunnel/v1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--server (`server_url` in the --config file): "),
        "{err}"
    );

    // a control port another process holds: its address, and what to do
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["server", "--listen", &addr, "--token", "t"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let said = format!("cannot listen on {addr} for the control channel (--listen)");
    assert!(err.contains(&said), "{err}");
    assert!(err.contains("another process listens there"), "{err}");
    assert!(
        !err.contains(" { ") && !err.contains("Os {"),
        "a Debug dump: {err}"
    );
}

/// The demo is the README's first command: one process, every byte checked,
/// figures a person reads (no `Debug` dump).
#[test]
fn the_demo_moves_checksummed_bytes_and_prints_figures() {
    let out = run(&["demo", "4"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("result    checksums match both ways"),
        "{said}"
    );
    assert!(
        said.contains("agent     1 connection, 4.0 MiB in, 4.0 MiB out"),
        "{said}"
    );
    assert!(!said.contains('{'), "{said}");
}

#[actix_web::test]
async fn the_access_command_opens_a_local_port_until_its_ttl() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let (_server, url) = server_proc(public);
    let spec = format!("db:{echo}:{public}");
    let _agent = registered_agent(&url, &spec);
    let access_args = ["access", "--server", &url, "--service", "db", "--ttl", "2s"];
    let mut access = Proc::spawn_with(&access_args, |c| {
        c.stdout(Stdio::piped());
    });
    let line = first_stdout_line(&mut access.child).await;
    let local: std::net::SocketAddr = line.trim().parse().unwrap();
    echo_through(local, 1, 64 << 10).await;
    // an unknown service fails at once, with no local address printed
    let nosuch = ["access", "--server", &url, "--service", "nosuch"];
    let (out, err) = Proc::failed(&nosuch);
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("error: --service nosuch: "), "{err}");
    assert!(err.contains("no tcp service named \"nosuch\""), "{err}");
    // it exits by itself when the TTL ends
    let status = access.exited_within(Duration::from_secs(5));
    let status = status.expect("still running after its TTL");
    assert!(status.success(), "{status}");
    assert!(wait_closed(local.port(), Duration::from_secs(1)).await);
}

#[actix_web::test]
async fn two_nodes_as_two_processes_with_a_node_tunnel() {
    let (public_a, public_b) = (free_ports(1).0, free_ports(1).0);
    let echo = services::echo().await;
    let (_node_b, url_b) = server_proc(public_b);
    // node A runs its own server and a node tunnel that publishes its echo on node B
    let range_a = format!("{public_a}-{public_a}");
    let tunnel = format!("db:{echo}:{public_b}@{url_b}");
    let mut node_a = Proc::spawn(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--port-range",
        &range_a,
        "--bind-host",
        "127.0.0.1",
        "--node-id",
        "node-a",
        "--node-tunnel",
        &tunnel,
        "--node-token",
        common::process::TOKEN,
    ]);
    let line = node_a.wait_for("state=connected");
    // connected: registered on node B, which listens there since
    assert!(line.contains("tunnel=db"), "{line}");
    echo_through(([127, 0, 0, 1], public_b).into(), 1, 64 << 10).await;
}

#[actix_web::test]
async fn a_killed_agents_port_is_free_within_a_second() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let (_server, url) = server_proc(public);
    let spec = format!("echo:{echo}:{public}");
    let mut agent = registered_agent(&url, &spec);
    let public_addr = ([127, 0, 0, 1], public).into();
    echo_through(public_addr, 1, 64 << 10).await;

    let killed = Instant::now();
    agent.child.kill().unwrap(); // SIGKILL: no goodbye, only the kernel closing its socket
    assert!(
        wait_closed(public, Duration::from_secs(1)).await,
        "the public port of a killed agent was still open after {:?}",
        killed.elapsed()
    );
    agent.child.wait().unwrap();
    // the port is free for real: the next agent gets it
    let _next = registered_agent(&url, &spec);
    echo_through(public_addr, 2, 64 << 10).await;
}

#[actix_web::test]
async fn the_server_logs_an_agent_refused_over_max_tunnels() {
    let public = free_ports(1).0;
    let echo = services::echo().await;
    let dir = temp_dir();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[tunnel]\nmax_tunnels = 1\n\
             data_port_range = [{public}, {public}]\nbind_host = \"127.0.0.1\"\n"
        ),
    )
    .unwrap();
    let mut server = Proc::spawn(&["server", "--config", config.to_str().unwrap()]);
    let url = control_url(&mut server);
    let spec = format!("echo:{echo}:{public}");
    let _first = registered_agent(&url, &spec);
    let mut second = Proc::spawn(&["agent", "--server", &url]);
    let line = second.wait_for("authentication refused");
    assert!(line.contains("limit of 1 tunnels"), "{line}");
    let line = server.wait_for("limit of 1 tunnels");
    assert!(
        line.contains("WARN") && line.contains("authentication refused"),
        "{line}"
    );
    // the first agent is undisturbed
    echo_through(([127, 0, 0, 1], public).into(), 1, 64 << 10).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Minor page faults of process `pid` so far (`/proc/PID/stat`, field 10).
fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // the fields after the command name, which is in parentheses
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(7).unwrap().parse().unwrap()
}

/// The binary settles glibc's allocator before any traffic (see
/// `settle` in src/main/allocator.rs). Without it, the buffers a transfer
/// allocates and frees cycle their pages through the kernel: measured, 2,300 to
/// 28,500 faults for the 32,768 pages of a 128 MiB upload (a million for 4 GiB),
/// and twice the CPU. With it, 215-240.
#[cfg(target_os = "linux")]
#[actix_web::test]
async fn an_upload_through_the_binaries_costs_the_server_almost_no_page_faults() {
    const SIZE: usize = 128 << 20;
    let public = free_ports(1).0;
    let digest = services::digest().await;
    let (server, url) = server_proc(public);
    let spec = format!("digest:{digest}:{public}");
    let _agent = registered_agent(&url, &spec);
    warm_up_through_digest(public).await;

    let before = minor_faults(server.child.id());
    let chunk: Vec<u8> = common::pattern(7, 1 << 20);
    let mut visitor = tokio::net::TcpStream::connect(("127.0.0.1", public))
        .await
        .unwrap();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for _ in 0..SIZE >> 20 {
        visitor.write_all(&chunk).await.unwrap();
        sha2::Digest::update(&mut hasher, &chunk);
    }
    visitor.shutdown().await.unwrap();
    let mut answer = [0u8; 40];
    visitor.read_exact(&mut answer).await.unwrap();
    let faults = minor_faults(server.child.id()) - before;
    let sent: [u8; 32] = sha2::Digest::finalize(hasher).into();
    assert_eq!(answer[..32], sent, "the service got other bytes");
    assert_eq!(
        u64::from_be_bytes(answer[32..].try_into().unwrap()),
        SIZE as u64
    );
    eprintln!("server page faults during a 128 MiB upload: {faults}");
    assert!(faults < 600, "{faults} page faults for 32768 pages moved");
}

/// One small transfer first, so that what a first connection allocates for
/// good is not counted.
async fn warm_up_through_digest(public: u16) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", public))
        .await
        .unwrap();
    s.write_all(&[1u8; 4096]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer.len(), 40);
}

/// The binary gives back what a burst freed (`release_after_activity` in
/// src/main/allocator.rs): glibc keeps freed memory below live allocations.
/// Here the agent holds a window of data for each of 200 streams whose service
/// is not reading, then they all drain and close.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[actix_web::test]
async fn after_a_burst_the_agent_gives_its_memory_back() {
    const STREAMS: u64 = 200;
    const SIZE: usize = 256 << 10;
    let public = free_ports(1).0;
    let (gated, gate) = services::gated_digest().await;
    let (_server, url) = server_proc(public);
    let agent = registered_agent(&url, &format!("gated:{gated}:{public}"));
    warm_up_through_digest_gate(public, &gate).await;
    let pid = agent.child.id();
    let before = common::rss_anon_kib(pid);

    let uploads: Vec<_> = (0..STREAMS)
        .map(|seed| tokio::spawn(common::upload_digest(public, seed, SIZE)))
        .collect();
    // the agent takes a window of each stream (32 KiB, and read buffers)
    let mut held = before;
    let took = common::poll(common::DEADLINE, || {
        held = common::rss_anon_kib(pid);
        std::future::ready(held >= before + 4096)
    })
    .await;
    assert!(
        took,
        "the burst never took the agent's memory up: {held} KiB"
    );
    gate.send_replace(true);
    for upload in uploads {
        upload.await.unwrap();
    }
    let drained = common::rss_anon_kib(pid);
    let mut now = drained;
    common::poll_every(Duration::from_secs(5), Duration::from_millis(100), || {
        now = common::rss_anon_kib(pid);
        std::future::ready(now <= before + 3072)
    })
    .await;
    eprintln!(
        "agent RssAnon: {before} KiB before, {held} held, {drained} drained, {now} at the end"
    );
    assert!(now <= before + 3072, "{now} KiB resident, {before} before");
}

async fn warm_up_through_digest_gate(public: u16, gate: &tokio::sync::watch::Sender<bool>) {
    gate.send_replace(true);
    warm_up_through_digest(public).await;
    gate.send_replace(false);
}

/// A registration the token's scope refuses is a lasting refusal: the agent
/// says so at ERROR, asks again only at its longest delay, keeps its other
/// services, and shows the refused one under `refused` in `/status`.
#[actix_web::test]
async fn a_registration_the_scope_refuses_waits_the_longest_delay_and_is_shown() {
    let (low, high) = free_ports(2);
    let echo = services::echo().await;
    let dir = temp_dir();
    let server_toml = dir.join("server.toml");
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\n[[tokens]]\nhash = \"{}\"\nregister = [\"web\"]\n[tunnel]\ndata_port_range = [{low}, {high}]\nbind_host = \"127.0.0.1\"\n",
        zlayer_tunnel::hash_token(common::process::TOKEN)
    );
    std::fs::write(&server_toml, text).unwrap();
    let mut server = Proc::spawn(&["server", "--config", server_toml.to_str().unwrap()]);
    let url = control_url(&mut server);
    let (web, db) = (format!("web:{echo}:0"), format!("db:{echo}:0"));
    let args = [
        "agent",
        "--server",
        &url,
        "--tcp",
        &web,
        "--tcp",
        &db,
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let mut agent = Proc::spawn(&args);
    let port = agent.registered_port();
    let line = agent.wait_for("asking again soon cannot help");
    assert!(
        line.contains("ERROR") && line.contains("service=db"),
        "{line}"
    );
    // at the longest delay (60 s by default: drawn from 30-60 s), not 1 s
    let retry_in = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("retry_in="))
        .unwrap();
    let seconds: u64 = retry_in
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    assert!(retry_in.ends_with('m') || seconds >= 30, "{line}");
    let admin = agent.listening_addr("admin endpoints listening");
    let status = common::http_get(&format!("http://{admin}/status")).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let refused = &status["refused"][0];
    assert_eq!(refused["name"], "db", "{status}");
    assert_eq!(refused["lasting"], true, "{status}");
    assert!(
        refused["reason"].as_str().unwrap().contains("db"),
        "{status}"
    );
    // the other service works meanwhile
    echo_through(([127, 0, 0, 1], port).into(), 1, 64 << 10).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
