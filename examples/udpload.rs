//! UDP load generator for `examples/udp-bench.sh` (the shared harness is
//! TCP-only). Prints one JSON line per run.
//!
//! ```sh
//! cargo run --release --example udpload -- echo 127.0.0.1:21101
//! cargo run --release --example udpload -- rr 127.0.0.1:21111 64 4 8 5   # size, flows, depth, seconds
//! cargo run --release --example udpload -- fresh 127.0.0.1:21111 10000 64  # queries, at once
//! ```
//!
//! `rr`: each of FLOWS sockets (one flow each) keeps DEPTH datagrams of SIZE
//! bytes in flight; every reply is matched to its request by sequence number
//! and checked byte for byte; its round trip is recorded. A datagram not
//! answered within 500 ms counts as lost. `mbit_per_s` is what one direction
//! carried (replies x SIZE).
//!
//! `fresh`: COUNT single exchanges, each from a socket of its own (a new
//! source port, as a resolver that draws one per query), PARALLEL at a time;
//! each 64-byte query must be answered, byte for byte, within 2 s.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::UdpSocket;

/// A request unanswered this long is lost.
const LOST_AFTER: Duration = Duration::from_millis(500);
/// How often a flow looks for requests that became lost.
const SWEEP_EVERY: Duration = Duration::from_millis(20);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(0) {
        "echo" => echo(arg(1).parse().context("ADDR")?).await,
        "rr" => {
            let target: SocketAddr = arg(1).parse().context("TARGET")?;
            let size: usize = arg(2).parse().context("SIZE")?;
            let flows: usize = arg(3).parse().context("FLOWS")?;
            let depth: usize = arg(4).parse().context("DEPTH")?;
            let secs: u64 = arg(5).parse().context("SECONDS")?;
            rr(
                target,
                size.max(16),
                flows,
                depth,
                Duration::from_secs(secs),
            )
            .await
        }
        "fresh" => {
            let target: SocketAddr = arg(1).parse().context("TARGET")?;
            let count: u64 = arg(2).parse().context("COUNT")?;
            let parallel: u64 = arg(3).parse().context("PARALLEL")?;
            fresh(target, count, parallel.max(1)).await
        }
        _ => bail!(
            "usage: udpload echo ADDR | rr TARGET SIZE FLOWS DEPTH SECONDS | fresh TARGET COUNT PARALLEL"
        ),
    }
}

fn socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let tuned = socket2::SockRef::from(&socket);
    let _ = tuned.set_recv_buffer_size(4 << 20);
    let _ = tuned.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket)?)
}

/// A UDP echo service.
async fn echo(addr: SocketAddr) -> anyhow::Result<()> {
    let socket = socket(addr)?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// The datagram with sequence number `seq`: the number, then a pattern.
fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size).map(|i| (i as u64 ^ seq) as u8).collect();
    data[..8].copy_from_slice(&seq.to_be_bytes());
    data
}

#[derive(Default)]
struct FlowResult {
    rtts_us: Vec<u32>,
    sent: u64,
    lost: u64,
    corrupt: u64,
}

async fn rr(
    target: SocketAddr,
    size: usize,
    flows: usize,
    depth: usize,
    run: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..flows)
        .map(|_| tokio::spawn(flow(target, size, depth, start + run)))
        .collect();
    let mut total = FlowResult::default();
    for task in tasks {
        let r = task.await??;
        total.rtts_us.extend(r.rtts_us);
        total.sent += r.sent;
        total.lost += r.lost;
        total.corrupt += r.corrupt;
    }
    let secs = start.elapsed().as_secs_f64();
    total.rtts_us.sort_unstable();
    let pct = |p: f64| {
        let n = total.rtts_us.len();
        if n == 0 {
            0
        } else {
            total.rtts_us[((n as f64 * p) as usize).min(n - 1)]
        }
    };
    println!(
        "{{\"mode\":\"udp_rr\",\"size\":{size},\"flows\":{flows},\"depth\":{depth},\"replies\":{},\"per_s\":{:.0},\"mbit_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{},\"sent\":{},\"lost\":{},\"loss_pct\":{:.3},\"corrupt\":{}}}",
        total.rtts_us.len(),
        total.rtts_us.len() as f64 / secs,
        (total.rtts_us.len() * size * 8) as f64 / secs / 1e6,
        pct(0.50),
        pct(0.99),
        total.sent,
        total.lost,
        100.0 * total.lost as f64 / total.sent.max(1) as f64,
        total.corrupt
    );
    if total.corrupt > 0 {
        bail!("{} corrupted replies", total.corrupt);
    }
    Ok(())
}

/// One flow: keeps `depth` requests in flight until `end`, then drains.
async fn flow(
    target: SocketAddr,
    size: usize,
    depth: usize,
    end: Instant,
) -> anyhow::Result<FlowResult> {
    let socket = socket(([127, 0, 0, 1], 0).into())?;
    socket.connect(target).await?;
    let mut result = FlowResult::default();
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut next = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut swept = Instant::now();
    loop {
        let sending = Instant::now() < end;
        while sending && in_flight.len() < depth {
            socket.send(&payload(next, size)).await?;
            in_flight.insert(next, Instant::now());
            result.sent += 1;
            next += 1;
        }
        // the losses are swept now and then, not per reply: a sweep costs
        // the whole depth, and per reply it made the load generator the
        // bottleneck of deep flows
        if swept.elapsed() >= SWEEP_EVERY || !sending {
            swept = Instant::now();
            let before = in_flight.len();
            in_flight.retain(|_, sent_at| sent_at.elapsed() < LOST_AFTER);
            result.lost += (before - in_flight.len()) as u64;
        }
        if in_flight.is_empty() {
            if sending {
                continue;
            }
            return Ok(result);
        }
        match tokio::time::timeout(LOST_AFTER, socket.recv(&mut buf)).await {
            Ok(n) => {
                let n = n?;
                let seq = u64::from_be_bytes(buf[..8].try_into()?);
                let Some(sent_at) = in_flight.remove(&seq) else {
                    continue; // a late reply to one already counted lost
                };
                if buf[..n] != payload(seq, size)[..] {
                    result.corrupt += 1;
                }
                result
                    .rtts_us
                    .push(sent_at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(_) => {
                // nothing for LOST_AFTER: everything in flight is lost
                result.lost += in_flight.len() as u64;
                in_flight.clear();
            }
        }
    }
}

/// How long a fresh socket waits for its one answer.
const FRESH_DEADLINE: Duration = Duration::from_secs(2);

/// `count` exchanges, each from its own socket, `parallel` at a time.
async fn fresh(target: SocketAddr, count: u64, parallel: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            let mine: Vec<u64> = (w..count).step_by(parallel as usize).collect();
            tokio::spawn(async move {
                let (mut answered, mut corrupt) = (0u64, 0u64);
                for seq in mine {
                    match one_exchange(target, seq).await? {
                        Some(true) => answered += 1,
                        Some(false) => corrupt += 1,
                        None => {}
                    }
                }
                anyhow::Ok((answered, corrupt))
            })
        })
        .collect();
    let (mut answered, mut corrupt) = (0, 0);
    for worker in workers {
        let (a, c) = worker.await??;
        answered += a;
        corrupt += c;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"udp_fresh\",\"queries\":{count},\"parallel\":{parallel},\"answered\":{answered},\"lost\":{},\"corrupt\":{corrupt},\"secs\":{secs:.3},\"per_s\":{:.0}}}",
        count - answered - corrupt,
        answered as f64 / secs
    );
    if corrupt > 0 {
        bail!("{corrupt} corrupted replies");
    }
    Ok(())
}

/// One query from a new socket: `Some(true)` answered intact, `Some(false)`
/// answered wrong, `None` unanswered within [`FRESH_DEADLINE`].
async fn one_exchange(target: SocketAddr, seq: u64) -> anyhow::Result<Option<bool>> {
    let socket = UdpSocket::bind(("127.0.0.1", 0)).await?;
    socket.connect(target).await?;
    let query = payload(seq, 64);
    socket.send(&query).await?;
    let mut buf = [0u8; 128];
    match tokio::time::timeout(FRESH_DEADLINE, socket.recv(&mut buf)).await {
        Ok(n) => Ok(Some(buf[..n?] == query[..])),
        Err(_) => Ok(None),
    }
}
