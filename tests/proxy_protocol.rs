//! The PROXY protocol, checked by consumers no one here wrote: nginx
//! (`listen ... proxy_protocol`, logging `$proxy_protocol_addr` and
//! `$proxy_protocol_port`) and HAProxy (`accept-proxy`, logging `%ci:%cp`),
//! both from Debian's packages (`bash .ci/run` installs them); for IPv4 and
//! IPv6 visitors, the logged address is the visitor's. UDP (v2, one header
//! per datagram) is read by a service in this file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::free_ports;
use common::host::{TempDir, installed};
use common::process::Proc;
use common::wait::wait_until;

/// A child killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server with public port `port` bound on `bind_host`; its control URL.
fn server_on(bind_host: &str, port: u16) -> (Proc, String) {
    let mut server = Proc::server_bound_with(bind_host, (port, port), &[], |_| {});
    let control = server.listening_addr("control channel listening");
    (server, format!("ws://{control}/tunnel/v1"))
}

/// An agent publishing `local` (TCP or UDP) on `url` with PROXY protocol `version`.
fn agent(url: &str, protocol: &str, local: u16, version: &str) -> Proc {
    let spec = format!("svc:{local}:0");
    let args = [
        "agent",
        "--server",
        url,
        protocol,
        &spec,
        "--proxy-protocol",
        version,
    ];
    Proc::spawn(&args)
}

/// Connects to `public` from a fresh socket, sends an HTTP request, reads
/// the answer; the visitor's own address, or what went wrong.
async fn visit(public: SocketAddr) -> std::io::Result<SocketAddr> {
    let mut visitor = tokio::net::TcpStream::connect(public).await?;
    let me = visitor.local_addr()?;
    let request = "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    visitor.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    visitor.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    Ok(me)
}

/// Waits until `file` has a line `want`.
async fn logged(file: &Path, want: String) {
    let file = file.to_owned();
    wait_until("the consumer logs the visitor", move || {
        let (file, want) = (file.clone(), want.clone());
        async move {
            let log = std::fs::read_to_string(&file).unwrap_or_default();
            log.lines().any(|l| l == want)
        }
    })
    .await;
}

/// nginx on a free port with `proxy_protocol`, logging each request's
/// PROXY address and port to `access.log` in `dir`.
fn nginx(exe: &Path, dir: &Path, listen: &str) -> Killed {
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  log_format proxied '$proxy_protocol_addr $proxy_protocol_port';\n  \
         access_log {dir}/access.log proxied;\n  client_body_temp_path {dir}/body;\n  \
         proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n  \
         uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  \
         server {{\n    listen {listen} proxy_protocol;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(exe)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

/// HAProxy on `listen` with `accept-proxy`, logging `%ci %cp` of each
/// request to stdout, which goes to `log` in `dir`.
fn haproxy(exe: &Path, dir: &Path, listen: &str) -> Killed {
    let conf = format!(
        "global\n  log stdout format raw local0\n\
         defaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 5s\n  timeout server 5s\n\
         frontend visitors\n  bind {listen} accept-proxy\n  log-format \"%ci %cp\"\n  \
         http-request return status 200 content-type text/plain string ok\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let child = Command::new(exe)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

/// Waits until something accepts TCP connections at `addr`.
async fn listening(addr: SocketAddr) {
    wait_until("the consumer listens", || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// Through a tunnel whose public port is bound on `bind_host` (`visitor_ip`
/// visits), with PROXY protocol `version`, the consumer logs the visitor.
async fn consumer_logs_the_visitor(
    (consumer, exe): (&str, &Path),
    version: &str,
    (bind_host, visitor_ip): (&str, &str),
) {
    let dir = TempDir::new(&format!("{consumer}-{version}-{}", visitor_ip.len()));
    let local = free_ports(1).0;
    let listen = format!("127.0.0.1:{local}");
    let (_consumer, log) = match consumer {
        "nginx" => (nginx(exe, &dir.0, &listen), dir.0.join("access.log")),
        _ => (haproxy(exe, &dir.0, &listen), dir.0.join("log")),
    };
    listening(listen.parse().unwrap()).await;
    let public = free_ports(1).0;
    let (_server, url) = server_on(bind_host, public);
    let mut agent = agent(&url, "--tcp", local, version);
    let port = agent.registered_port();
    let public: SocketAddr = format!("{visitor_ip}:{port}").parse().unwrap();
    for _ in 0..3 {
        let me = match visit(public).await {
            Ok(me) => me,
            // the agent says why a visitor was reset, and the consumer's log
            // what it saw: both in the failure
            Err(e) => {
                drop(_consumer);
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                agent.signal("KILL");
                panic!(
                    "{consumer} visit: {e}\nagent:\n{}\n{consumer}:\n{said}",
                    agent.log()
                );
            }
        };
        logged(&log, format!("{} {}", me.ip(), me.port())).await;
    }
}

#[actix_web::test]
async fn nginx_logs_the_visitors_address_from_v1_and_v2_over_ipv4_and_ipv6() {
    let Some(nginx) = installed("nginx", "nginx") else {
        return;
    };
    for version in ["v1", "v2"] {
        let consumer = ("nginx", nginx.as_path());
        consumer_logs_the_visitor(consumer, version, ("127.0.0.1", "127.0.0.1")).await;
        consumer_logs_the_visitor(consumer, version, ("::1", "[::1]")).await;
    }
}

#[actix_web::test]
async fn haproxy_logs_the_visitors_address_from_v1_and_v2_over_ipv4_and_ipv6() {
    let Some(haproxy) = installed("haproxy", "haproxy") else {
        return;
    };
    for version in ["v1", "v2"] {
        let consumer = ("haproxy", haproxy.as_path());
        consumer_logs_the_visitor(consumer, version, ("127.0.0.1", "127.0.0.1")).await;
        consumer_logs_the_visitor(consumer, version, ("::1", "[::1]")).await;
    }
}

/// A UDP service that answers each datagram with what its PROXY v2 header
/// says (`source destination`) and the bytes after the header.
fn udp_v2_reader() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let answer = match parse_v2(&buf[..n]) {
                Some((source, destination, rest)) => {
                    let mut a = format!("{source} {destination}|").into_bytes();
                    a.extend_from_slice(rest);
                    a
                }
                None => b"no header|".to_vec(),
            };
            let _ = socket.send_to(&answer, from);
        }
    });
    port
}

/// A PROXY v2 header over UDP (DGRAM, IPv4 or IPv6), as the spec lays it out.
fn parse_v2(datagram: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let signature = b"\r\n\r\n\0\r\nQUIT\n";
    if datagram.len() < 16 || &datagram[..12] != signature || datagram[12] != 0x21 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([datagram[14], datagram[15]]));
    let body = datagram.get(16..16 + len)?;
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (source, destination) = match datagram[13] {
        0x12 => {
            let ip = |at: usize| {
                std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&body[at..at + 4]).unwrap())
            };
            (
                SocketAddr::from((ip(0), port(8))),
                SocketAddr::from((ip(4), port(10))),
            )
        }
        0x22 => {
            let ip = |at: usize| {
                std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&body[at..at + 16]).unwrap())
            };
            (
                SocketAddr::from((ip(0), port(32))),
                SocketAddr::from((ip(16), port(34))),
            )
        }
        _ => return None,
    };
    Some((source, destination, &datagram[16 + len..]))
}

#[actix_web::test]
async fn each_datagram_of_a_udp_flow_carries_a_v2_header_with_the_visitor() {
    let local = udp_v2_reader();
    let public = free_ports(1).0;
    let (_server, url) = server_on("127.0.0.1", public);
    let mut agent = agent(&url, "--udp", local, "v2");
    let port = agent.registered_port();
    let visitor = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = visitor.local_addr().unwrap();
    let mut buf = vec![0u8; 65536];
    for (seq, len) in [1usize, 512, 1400, 9000].into_iter().enumerate() {
        let sent = common::pattern(seq as u64, len);
        let mut answered = None;
        for _ in 0..20 {
            visitor.send_to(&sent, ("127.0.0.1", port)).await.unwrap();
            let wait = tokio::time::timeout(Duration::from_millis(200), visitor.recv(&mut buf));
            if let Ok(Ok(n)) = wait.await {
                answered = Some(buf[..n].to_vec());
                break;
            }
        }
        let answer = answered.expect("the service answers through the tunnel");
        let mut expected = format!("{me} 127.0.0.1:{port}|").into_bytes();
        expected.extend_from_slice(&sent);
        assert_eq!(
            String::from_utf8_lossy(&answer[..expected.len().min(answer.len()).min(64)]),
            String::from_utf8_lossy(&expected[..expected.len().min(64)])
        );
        assert_eq!(answer, expected, "datagram {seq}: header and bytes whole");
    }
}

#[actix_web::test]
async fn v1_for_a_udp_service_is_refused_saying_what_to_use() {
    let out = Command::new(env!("CARGO_BIN_EXE_zlayer-tunnel"))
        .args([
            "agent",
            "--server",
            "ws://127.0.0.1:1/tunnel/v1",
            "--udp",
            "dns:53:0",
        ])
        .args(["--proxy-protocol", "v1"])
        .env("ZLAYER_TUNNEL_TOKEN", "t")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("v1 is for TCP services"), "{stderr}");
}
