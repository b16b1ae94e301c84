//! A tunnel agent: `agent URL TOKEN NAME:LOCAL_PORT:REMOTE_PORT...` (remote
//! port 0 = any). Runs until killed, reconnecting; stops promptly on SIGINT or
//! SIGTERM. A plain `#[tokio::main]` program: the library runs its actors on
//! its own thread.
//!
//! ```sh
//! cargo run --release --example agent -- ws://127.0.0.1:7000/tunnel/v1 secret ssh:22:30000
//! ```

use anyhow::{Context, bail};
use tracing_subscriber::prelude::*;
use zlayer_tunnel::{ServiceConfig, TunnelAgent, TunnelClientConfig, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, services @ ..] = args.as_slice() else {
        bail!("usage: agent URL TOKEN NAME:LOCAL_PORT:REMOTE_PORT...");
    };
    let mut config = TunnelClientConfig::new(url, token);
    for spec in services {
        config = config.with_service(parse_service(spec)?);
    }
    config.validate()?;

    let agent = TunnelAgent::new(config);
    let stopper = agent.clone();
    tokio::spawn(async move {
        if shutdown_signal().await.is_ok() {
            stopper.stop();
        }
    });
    agent.run().await?;
    Ok(())
}

fn parse_service(spec: &str) -> anyhow::Result<ServiceConfig> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [name, local, remote] = parts.as_slice() else {
        bail!("{spec:?}: expected NAME:LOCAL_PORT:REMOTE_PORT");
    };
    let local = local
        .parse()
        .with_context(|| format!("{spec:?}: LOCAL_PORT"))?;
    let remote = remote
        .parse()
        .with_context(|| format!("{spec:?}: REMOTE_PORT"))?;
    Ok(ServiceConfig::tcp(*name, local).with_remote_port(remote))
}
