//! `zlayer-tunnel demo [MIB]`: a tunnel server, an agent and a local service
//! on 127.0.0.1, all in this process, and a visitor that sends MIB MiB
//! through the tunnel and gets them back. Every byte is checked (SHA-256
//! both ways) and the figures are printed. It is the README's first
//! command: the binary it builds is the one the Quick start runs next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{App, HttpServer};
use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use zlayer_tunnel::{
    ControlHandler, ServiceConfig, TokenStore, TunnelAgent, TunnelClientConfig, TunnelRegistry,
    TunnelServerConfig,
};

const TOKEN: &str = "demo-token";

/// Runs the demo with `mib` MiB each way.
pub(crate) fn run(mib: usize) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(demo(mib))
}

async fn demo(mib: usize) -> anyhow::Result<()> {
    let len = mib << 20;
    let service = start_digest_service().await?;
    let control = start_server().await?;
    println!("server    ws://{control}/tunnel/v1 (public ports on 127.0.0.1)");
    println!("service   127.0.0.1:{service} (hashes what it receives, then sends it back)");

    let (published, mut port) = watch::channel(0);
    let config = TunnelClientConfig::new(format!("ws://{control}/tunnel/v1"), TOKEN)
        .with_service(ServiceConfig::tcp("demo", service));
    let agent = TunnelAgent::new(config).on_published(Arc::new(move |service| {
        published.send_replace(service.public_port);
    }));
    let runner = agent.clone();
    let agent_task = actix_web::rt::spawn(async move { runner.run().await });
    let wait = port.wait_for(|port| *port != 0);
    let public = *tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .context("the agent did not publish its service within 10 s")??;
    println!("agent     connected; service \"demo\" published on 127.0.0.1:{public}");

    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761) as u8 ^ (i >> 13) as u8)
        .collect();
    let sent_hash = Sha256::digest(&data);
    let start = Instant::now();
    let (reply, up_time) = round_trip(public, &data).await?;
    let total = start.elapsed();
    ensure!(
        reply.len() == 32 + len,
        "got {} bytes back, expected {}",
        reply.len(),
        32 + len
    );
    let service_saw = &reply[..32];
    let echoed_hash = Sha256::digest(&reply[32..]);
    let ok = service_saw == sent_hash.as_slice() && echoed_hash == sent_hash;
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    println!(
        "visitor   sent {mib} MiB in {:.2} s ({:.0} MiB/s)",
        secs(up_time),
        mib as f64 / secs(up_time)
    );
    println!(
        "visitor   received {mib} MiB back; round trip {:.2} s",
        secs(total)
    );
    println!("sha256    sent     {}", hex(&sent_hash));
    println!("sha256    service  {}", hex(service_saw));
    println!("sha256    returned {}", hex(&echoed_hash));
    let stats = agent.stats();
    println!(
        "agent     {} connection, {} in, {} out",
        stats.connections_total,
        mebibytes(stats.bytes_in),
        mebibytes(stats.bytes_out)
    );
    agent.stop();
    agent_task.await??;
    if !ok {
        bail!("checksum mismatch: the tunnel corrupted data");
    }
    println!("result    checksums match both ways");
    Ok(())
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Sends `data`, half-closes, and reads the reply (hash + echo).
async fn round_trip(port: u16, data: &[u8]) -> anyhow::Result<(Vec<u8>, Duration)> {
    let mut visitor = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut r, mut w) = visitor.split();
    let start = Instant::now();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(start.elapsed())
    };
    let mut reply = Vec::with_capacity(data.len() + 32);
    let (up, got) = tokio::join!(send, r.read_to_end(&mut reply));
    got?;
    Ok((reply, up?))
}

/// A service that reads until EOF, then answers SHA-256 and the bytes themselves.
async fn start_digest_service() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    actix_web::rt::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            actix_web::rt::spawn(async move {
                let mut all = Vec::new();
                socket.read_to_end(&mut all).await?;
                socket.write_all(&Sha256::digest(&all)).await?;
                socket.write_all(&all).await?;
                socket.shutdown().await
            });
        }
    });
    Ok(port)
}

/// A server on 127.0.0.1 (any free port) accepting the demo's token, its
/// public ports on 127.0.0.1 only.
async fn start_server() -> anyhow::Result<SocketAddr> {
    let registry = Arc::new(TunnelRegistry::new((1024, 65535)));
    let config = TunnelServerConfig::new()
        .with_port_range(1024, 65535)
        .with_bind_host("127.0.0.1");
    let validator = TokenStore::new().with_token(TOKEN).into_validator();
    let handler = ControlHandler::new(registry, config, validator);
    let hardening = handler.on_connect(); // keepalive, TCP_USER_TIMEOUT
    let server = HttpServer::new(move || {
        let handler = handler.clone();
        App::new().configure(move |c| handler.configure(c))
    })
    .on_connect(hardening)
    .workers(1)
    .disable_signals()
    .tcp_nodelay(true)
    .shutdown_timeout(1)
    .bind("127.0.0.1:0")?;
    let addr = server.addrs()[0];
    actix_web::rt::spawn(server.run());
    Ok(addr)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
