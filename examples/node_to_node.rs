//! Two nodes on loopback: node B runs a tunnel server; node A publishes its
//! local service (an echo) on node B through a node tunnel, and a client on
//! node B reaches it. Prints the tunnel's status as it goes.
//!
//! ```sh
//! cargo run --example node_to_node
//! ```

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};
use anyhow::{Context, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zlayer_tunnel::{
    ControlHandler, NodeTunnel, NodeTunnelManager, TokenStore, TunnelRegistry, TunnelServerConfig,
    TunnelState,
};

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    // node B: a tunnel server that publishes on one port
    let public = free_port()?;
    let config = TunnelServerConfig::new()
        .with_port_range(public, public)
        .with_bind_host("127.0.0.1");
    let registry = Arc::new(TunnelRegistry::new(config.data_port_range));
    let validator = TokenStore::new().with_token("node-token").into_validator();
    let handler = ControlHandler::new(registry, config, validator);
    let hardening = handler.on_connect(); // keepalive, TCP_USER_TIMEOUT
    let server = HttpServer::new(move || {
        let handler = handler.clone();
        App::new().configure(move |c| handler.configure(c))
    })
    .on_connect(hardening)
    .workers(1)
    .tcp_nodelay(true)
    .bind("127.0.0.1:0")?;
    let control = server.addrs()[0];
    actix_web::rt::spawn(server.run());
    println!("node B    tunnel server ws://{control}/tunnel/v1");

    // node A: a local service, and a node tunnel that publishes it on node B
    let echo = echo_service().await?;
    let node_a = NodeTunnelManager::new("node-a", TunnelServerConfig::default());
    let tunnel = NodeTunnel::new("echo", "node-a", "node-b")
        .with_ports(echo, public)
        .with_token("node-token");
    node_a.add_tunnel(tunnel)?;
    node_a.start_outbound("echo", format!("ws://{control}/tunnel/v1"))?;
    let mut last = String::new();
    for _ in 0..500 {
        let status = node_a.get_status("echo").context("no status")?;
        let state = format!("{:?}", status.state);
        if state != last {
            println!("node A    tunnel \"echo\": {state}");
            last = state;
        }
        if matches!(status.state, TunnelState::Connected { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // a client on node B reaches node A's service
    let mut client = TcpStream::connect(("127.0.0.1", public)).await?;
    let message = b"hello from node B, answered by node A";
    client.write_all(message).await?;
    let mut answer = vec![0u8; message.len()];
    client.read_exact(&mut answer).await?;
    ensure!(answer == message, "the answer differs");
    println!(
        "node B    127.0.0.1:{public} answered: {}",
        String::from_utf8_lossy(&answer)
    );
    drop(client);
    let status = node_a.get_status("echo").context("no status")?;
    println!(
        "node A    tunnel \"echo\": {} bytes in, {} bytes out, {} connections",
        status.stats.bytes_in, status.stats.bytes_out, status.stats.connections_total
    );
    node_a.remove_tunnel("echo")?;
    Ok(())
}

async fn echo_service() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(port)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
