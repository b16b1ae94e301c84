//! On-demand access on loopback: a "remote" service (an echo), a session with
//! a 2-second TTL that gives it a local port, a round trip through it, and the
//! session expiring on its own.
//!
//! ```sh
//! cargo run --example access_session
//! ```

#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::ensure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zlayer_tunnel::AccessManager;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let remote = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let manager = AccessManager::new().with_grace(Duration::from_millis(200));
    let session = manager
        .start_session(
            "echo".into(),
            remote.to_string(),
            None,
            Some(Duration::from_secs(2)),
        )
        .await?;
    println!("access    {} -> {remote} for 2 s", session.local_addr);

    let mut client = TcpStream::connect(session.local_addr).await?;
    client.write_all(b"ping through the session").await?;
    let mut answer = [0u8; 24];
    client.read_exact(&mut answer).await?;
    ensure!(&answer == b"ping through the session", "the answer differs");
    println!("client    got {:?}", String::from_utf8_lossy(&answer));
    drop(client);

    for info in manager.list_sessions() {
        println!(
            "session   {}: {} -> {} ({}s remaining, {} bytes in, {} out)",
            info.endpoint,
            info.local_addr,
            info.remote_addr,
            info.remaining.map_or(0, |d| d.as_secs()),
            info.stats.bytes_in,
            info.stats.bytes_out
        );
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = manager.list_sessions().iter().filter(|s| s.expired).count();
    println!(
        "expired   {expired} session(s); cleaned up {}",
        manager.cleanup_expired()
    );
    ensure!(
        TcpStream::connect(session.local_addr).await.is_err(),
        "the listener outlived the TTL"
    );
    println!("listener  closed");
    Ok(())
}
