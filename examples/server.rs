//! A tunnel server: `server LISTEN_ADDR PORT_LOW-PORT_HIGH TOKEN`.
//!
//! Serves the control channel at `ws://LISTEN_ADDR/tunnel/v1` and public ports
//! on 127.0.0.1 from the (inclusive) range. Stops within about two seconds of
//! SIGINT or SIGTERM.
//!
//! ```sh
//! cargo run --release --example server -- 127.0.0.1:7000 30000-30009 secret
//! ```

use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};
use anyhow::{Context, bail};
use tracing_subscriber::prelude::*;
use zlayer_tunnel::{ControlHandler, TokenStore, TunnelRegistry, TunnelServerConfig};

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, range, token] = args.as_slice() else {
        bail!("usage: server LISTEN_ADDR PORT_LOW-PORT_HIGH TOKEN");
    };
    let (low, high) = range
        .split_once('-')
        .context("PORT_LOW-PORT_HIGH: missing '-'")?;
    let range = (
        low.parse().context("PORT_LOW")?,
        high.parse().context("PORT_HIGH")?,
    );
    let config = TunnelServerConfig::new()
        .with_port_range(range.0, range.1)
        .with_bind_host("127.0.0.1");
    config.validate()?;

    let registry = Arc::new(TunnelRegistry::new(range));
    let validator = TokenStore::new().with_token(token).into_validator();
    let handler = ControlHandler::new(registry, config, validator);
    let hardening = handler.on_connect(); // keepalive, TCP_USER_TIMEOUT
    tracing::info!(%listen, ports = ?range, "tunnel server listening on ws://{listen}/tunnel/v1");
    HttpServer::new(move || {
        let handler = handler.clone();
        App::new().configure(move |c| handler.configure(c))
    })
    .on_connect(hardening)
    .tcp_nodelay(true)
    .shutdown_timeout(1) // actix-web's default waits 30 s for WebSocket connections
    .bind(listen)
    .with_context(|| format!("cannot listen on {listen}"))?
    .run()
    .await?;
    tracing::info!("tunnel server stopped");
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

fn init_logs() {
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|wanted| wanted.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .finish()
        .with(filter)
        .init();
}
