//! Load driver for the scale runs of `examples/scale.sh`: many connections
//! through one agent, or many agents on one server. Prints one JSON line of
//! results; exits non-zero if anything was lost.
//!
//! ```sh
//! cargo run --release --example scale -- echo 127.0.0.1:22001
//! cargo run --release --example scale -- hold 127.0.0.1:22011 10000
//! cargo run --release --example scale -- hashes 1000 > tokens
//! cargo run --release --example scale -- agents ws://127.0.0.1:22010/tunnel/v1 1000 22001
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zlayer_tunnel::{ServiceConfig, TunnelAgent, TunnelClientConfig};

/// Connections opened at once before waiting for their echoes.
const BATCH: usize = 500;
/// How long the connections or agents are held before they are checked again.
const HOLD: Duration = Duration::from_secs(10);
/// Every wait ends by this.
const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(0) {
        "echo" => echo(arg(1)).await,
        "hold" => hold(arg(1), arg(2).parse().context("COUNT")?).await,
        "hashes" => {
            for i in 0..arg(1).parse::<usize>().context("COUNT")? {
                println!("{}", zlayer_tunnel::hash_token(&token(i)));
            }
            Ok(())
        }
        "agents" => {
            let (count, port) = (arg(2).parse().context("COUNT")?, arg(3).parse()?);
            agents(arg(1), count, port).await
        }
        _ => bail!(
            "usage: scale echo ADDR | hold ADDR COUNT | hashes COUNT | agents URL COUNT LOCAL_PORT"
        ),
    }
}

/// The token of agent `i`.
fn token(i: usize) -> String {
    format!("scale-token-{i:05}")
}

/// An echo service. Its accept queue holds a whole batch: with the default
/// (128) the agent's burst of dials overflows it, and each overflowed SYN
/// waits a second to be sent again.
async fn echo(listen: &str) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = listen.parse()?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    loop {
        let (mut socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = socket.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Sends a 16-byte greeting unique to `i` and checks that it comes back.
async fn ping(socket: &mut TcpStream, i: usize, round: u8) -> anyhow::Result<()> {
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&(i as u64).to_be_bytes());
    hello[8] = round;
    socket.write_all(&hello).await?;
    let mut back = [0u8; 16];
    socket.read_exact(&mut back).await?;
    if back != hello {
        bail!("connection {i}: echo mismatch");
    }
    Ok(())
}

/// Opens `count` connections to `target`, each verified, holds them, and
/// verifies every one again.
async fn hold(target: &str, count: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut sockets = Vec::with_capacity(count);
    for first in (0..count).step_by(BATCH) {
        let batch = (first..count.min(first + BATCH)).map(|i| async move {
            let mut s = TcpStream::connect(target).await?;
            ping(&mut s, i, 0).await?;
            anyhow::Ok(s)
        });
        let opened = tokio::time::timeout(DEADLINE, futures::future::join_all(batch))
            .await
            .context("opening a batch timed out")?;
        for s in opened {
            sockets.push(s?);
        }
    }
    let opened_in = start.elapsed();
    eprintln!("scale: {count} connections open and verified in {opened_in:?}; holding {HOLD:?}");
    println!("{{\"event\":\"held\",\"connections\":{count}}}");
    tokio::time::sleep(HOLD).await;
    let mut alive = 0;
    for chunk in sockets.chunks_mut(BATCH) {
        let first = alive;
        let pings = chunk
            .iter_mut()
            .enumerate()
            .map(|(j, s)| ping(s, first + j, 1));
        let results = tokio::time::timeout(DEADLINE, futures::future::join_all(pings))
            .await
            .context("re-checking a batch timed out")?;
        alive += results.iter().filter(|r| r.is_ok()).count();
    }
    println!(
        "{{\"mode\":\"hold\",\"connections\":{count},\"alive_after_hold\":{alive},\"open_secs\":{:.2}}}",
        opened_in.as_secs_f64()
    );
    if alive != count {
        bail!("{} of {count} connections lost", count - alive);
    }
    Ok(())
}

/// Runs `count` agents, each with its own token and one service, until all
/// are published; holds; checks none dropped or reconnected.
async fn agents(url: &str, count: usize, local_port: u16) -> anyhow::Result<()> {
    let start = Instant::now();
    let published = Arc::new(AtomicUsize::new(0));
    let mut running = Vec::with_capacity(count);
    for i in 0..count {
        let mut config = TunnelClientConfig::new(url, token(i))
            .with_service(ServiceConfig::tcp(format!("svc{i}"), local_port));
        config.heartbeat_interval = Duration::from_secs(5);
        config.heartbeat_timeout = Duration::from_secs(30);
        let counter = published.clone();
        let agent = TunnelAgent::new(config).on_published(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        let runner = agent.clone();
        let task = tokio::spawn(async move { runner.run().await });
        running.push((agent, task));
    }
    let deadline = Instant::now() + DEADLINE;
    while published.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!(
                "only {} of {count} agents published in time",
                published.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let up_in = start.elapsed();
    eprintln!("scale: {count} agents published in {up_in:?}; holding {HOLD:?}");
    println!("{{\"event\":\"held\",\"agents\":{count}}}");
    tokio::time::sleep(HOLD * 2).await;
    let connected = running.iter().filter(|(a, _)| a.status().connected).count();
    let publishes = published.load(Ordering::Relaxed);
    println!(
        "{{\"mode\":\"agents\",\"agents\":{count},\"connected_after_hold\":{connected},\"publishes\":{publishes},\"up_secs\":{:.2}}}",
        up_in.as_secs_f64()
    );
    for (agent, _) in &running {
        agent.stop();
    }
    if connected != count || publishes != count {
        bail!("{connected} of {count} agents connected; {publishes} publishes (reconnects?)");
    }
    Ok(())
}
