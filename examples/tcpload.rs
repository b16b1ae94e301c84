//! TCP load generator for `examples/bench.sh`: a service and the clients that
//! load it, through a tunnel or directly. Every client prints one JSON line
//! and exits non-zero if a byte was lost, reordered or corrupted.
//!
//! ```sh
//! cargo run --release --example tcpload -- serve 127.0.0.1:21201
//! cargo run --release --example tcpload -- up 127.0.0.1:21211 1073741824 1    # bytes, streams
//! cargo run --release --example tcpload -- down 127.0.0.1:21211 1073741824 1
//! cargo run --release --example tcpload -- rr 127.0.0.1:21211 64 64 5         # conns, size, seconds
//! cargo run --release --example tcpload -- conn 127.0.0.1:21211 4 5           # workers, seconds
//! cargo run --release --example tcpload -- hold 127.0.0.1:21211 1000 3        # conns, seconds
//! cargo run --release --example tcpload -- mixed 127.0.0.1:21211 down 1 5      # bulk direction, streams, seconds
//! cargo run --release --example tcpload -- relay 127.0.0.1:21211 127.0.0.1:21201  # listen, target
//! ```
//!
//! * `up` / `down`: each stream carries BYTES of a pattern that depends on the
//!   byte's offset and the stream's seed, checked at the far end byte for byte
//!   (the service answers `up` with what it verified).
//! * `rr`: CONNS connections each do SIZE-byte ping-pongs for SECONDS; every
//!   answer is compared; p50/p99 of the round trips.
//! * `conn`: WORKERS loops of connect, one 32-byte ping-pong, the service
//!   closes first (so TIME_WAIT stays on the service's side), wait for its FIN.
//! * `hold`: CONNS idle connections, each checked to echo when opened and
//!   again after SECONDS.
//! * `mixed`: a 64-byte ping-pong on one connection (the latency probe)
//!   while STREAMS bulk streams run in DIRECTION through the same port, each
//!   a chain of 64 MiB transfers checked byte for byte: the probe's p50/p99
//!   and the bulk's MiB/s. What an ssh session beside an scp feels.
//! * `relay`: not a load but a baseline, the least any tunnel must do: a
//!   plain TCP relay on one thread that accepts, dials TARGET and copies both
//!   ways (half-close passed on). `bench.sh relay` and `relay2` (two relays in
//!   a chain, one TCP connection between them per visitor) measure it.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;
const UP: u8 = 1;
const DOWN: u8 = 2;
const ECHO: u8 = 3;
const PING: u8 = 4;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match args.first().map(String::as_str) {
        // one thread, as a tunnel's server or agent serves one session on one
        Some("relay") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Runtime::new()?,
    };
    runtime.block_on(run(args))
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let num = |i: usize| -> anyhow::Result<u64> {
        arg(i)
            .parse()
            .with_context(|| format!("argument {i}: a number"))
    };
    let addr = arg(1).to_owned();
    let ok = match arg(0) {
        "serve" => return serve(&addr).await,
        "relay" => return relay(&addr, arg(2)).await,
        mode @ ("up" | "down") => bulk(mode, &addr, num(2)?, num(3)? as usize).await,
        "rr" => rr(&addr, num(2)? as usize, num(3)? as usize, secs(num(4)?)).await,
        "conn" => conn(&addr, num(2)? as usize, secs(num(3)?)).await,
        "hold" => hold(&addr, num(2)? as usize, secs(num(3)?)).await,
        "mixed" => mixed(&addr, arg(2) == "up", num(3)? as usize, secs(num(4)?)).await,
        _ => bail!(
            "usage: tcpload serve|up|down|rr|conn|hold|mixed|relay ADDR ... (see the file's header)"
        ),
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The byte at `offset` of the stream with `seed`: every byte depends on its
/// position, so a lost, repeated or reordered chunk shows.
struct Pattern {
    seed: u64,
}

impl Pattern {
    fn word(&self, index: u64) -> [u8; 8] {
        let mut x = (index ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        x.wrapping_mul(0xBF58_476D_1CE4_E5B9).to_le_bytes()
    }

    /// Fills `buf` with the bytes from `offset` on.
    fn fill(&self, buf: &mut [u8], offset: u64) {
        // byte by byte up to a word boundary, then whole words
        let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
        for (i, byte) in buf[..head].iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = self.word(at / 8)[(at % 8) as usize];
        }
        let mut at = offset + head as u64;
        let mut words = buf[head..].chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.word(at / 8));
            at += 8;
        }
        let tail = words.into_remainder();
        let last = self.word(at / 8);
        tail.copy_from_slice(&last[..tail.len()]);
    }

    /// True if `buf` holds the bytes from `offset` on.
    fn check(&self, buf: &[u8], offset: u64, scratch: &mut Vec<u8>) -> bool {
        scratch.resize(buf.len(), 0);
        self.fill(scratch, offset);
        scratch[..] == buf[..]
    }
}

async fn serve(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.context("bind")?;
    eprintln!("tcpload serving on {}", listener.local_addr()?);
    loop {
        let (socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve_one(socket).await;
        });
    }
}

async fn relay(addr: &str, target: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.context("bind")?;
    eprintln!("tcpload relaying {} to {target}", listener.local_addr()?);
    loop {
        let (mut visitor, _) = listener.accept().await?;
        let target = target.to_owned();
        tokio::spawn(async move {
            let Ok(mut service) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = (visitor.set_nodelay(true), service.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional(&mut visitor, &mut service).await;
        });
    }
}

async fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    match s.read_u8().await? {
        UP => {
            let (seed, n) = (s.read_u64().await?, s.read_u64().await?);
            let (ok, seen) = receive(&mut s, &Pattern { seed }, n).await?;
            s.write_u8(u8::from(ok)).await?;
            s.write_u64(seen).await?;
        }
        DOWN => {
            let (seed, n) = (s.read_u64().await?, s.read_u64().await?);
            send(&mut s, &Pattern { seed }, n).await?;
            s.shutdown().await?;
        }
        ECHO => {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                s.write_all(&buf[..k]).await?;
            }
        }
        PING => {
            let mut b = [0u8; 32];
            s.read_exact(&mut b).await?;
            s.write_all(&b).await?;
            s.shutdown().await?;
        }
        _ => {}
    }
    Ok(())
}

async fn send(s: &mut TcpStream, pattern: &Pattern, n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < n {
        let k = CHUNK.min((n - sent) as usize);
        pattern.fill(&mut buf[..k], sent);
        s.write_all(&buf[..k]).await?;
        sent += k as u64;
    }
    Ok(())
}

/// Reads up to `n` bytes, checking each against the pattern: (all matched and
/// exactly `n` came, bytes seen).
async fn receive(s: &mut TcpStream, pattern: &Pattern, n: u64) -> std::io::Result<(bool, u64)> {
    let (mut buf, mut scratch) = (vec![0u8; CHUNK], Vec::with_capacity(CHUNK));
    let (mut seen, mut ok) = (0u64, true);
    while seen < n {
        let room = CHUNK.min((n - seen) as usize);
        let k = s.read(&mut buf[..room]).await?;
        if k == 0 {
            break;
        }
        ok &= pattern.check(&buf[..k], seen, &mut scratch);
        seen += k as u64;
    }
    Ok((ok && seen == n, seen))
}

async fn bulk(mode: &str, addr: &str, bytes: u64, streams: usize) -> bool {
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams.max(1) as u64)
        .map(|i| {
            let (addr, up) = (addr.to_owned(), mode == "up");
            tokio::spawn(async move { one_bulk(&addr, up, bytes, 0x5EED + i).await })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => errors.push("bytes differ".to_owned()),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let total = bytes * streams.max(1) as u64;
    let mib = total as f64 / (1 << 20) as f64 / secs;
    println!(
        "{{\"mode\":\"{mode}\",\"bytes\":{total},\"streams\":{streams},\"secs\":{secs:.3},\"mib_per_s\":{mib:.1},\"verified\":{},\"errors\":{errors:?}}}",
        errors.is_empty()
    );
    errors.is_empty()
}

async fn one_bulk(addr: &str, up: bool, n: u64, seed: u64) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_u8(if up { UP } else { DOWN }).await?;
    s.write_u64(seed).await?;
    s.write_u64(n).await?;
    let pattern = Pattern { seed };
    if up {
        send(&mut s, &pattern, n).await?;
        let ok = s.read_u8().await? == 1;
        Ok(ok && s.read_u64().await? == n)
    } else {
        let (ok, _) = receive(&mut s, &pattern, n).await?;
        // nothing may follow the n bytes
        Ok(ok && s.read(&mut [0u8; 1]).await? == 0)
    }
}

/// The value at quantile `q` (0..=1) of `v`, which it sorts.
fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    let i = ((v.len().max(1) - 1) as f64 * q).round() as usize;
    v.get(i).copied().unwrap_or(0)
}

fn report(mode: &str, extra: &str, mut lat: Vec<u64>, secs: Duration, errors: usize) -> bool {
    let n = lat.len();
    println!(
        "{{\"mode\":\"{mode}\",{extra},\"count\":{n},\"per_s\":{:.0},\"p50_us\":{},\"p99_us\":{},\"errors\":{errors}}}",
        n as f64 / secs.as_secs_f64(),
        quantile(&mut lat, 0.5),
        quantile(&mut lat, 0.99),
    );
    errors == 0 && n > 0
}

/// SIZE-byte ping-pongs on one connection until `end`: each round trip in µs.
async fn ping_pong(addr: String, size: usize, end: Instant) -> std::io::Result<Vec<u64>> {
    let mut s = TcpStream::connect(&addr).await?;
    s.set_nodelay(true)?;
    s.write_u8(ECHO).await?;
    let (mut lat, mut back) = (Vec::new(), vec![0u8; size]);
    let mut message = vec![0u8; size];
    let mut round = 0u64;
    while Instant::now() < end {
        Pattern { seed: round }.fill(&mut message, 0);
        let t = Instant::now();
        s.write_all(&message).await?;
        s.read_exact(&mut back).await?;
        lat.push(t.elapsed().as_micros() as u64);
        if back != message {
            return Err(std::io::Error::other("echo mismatch"));
        }
        round += 1;
    }
    Ok(lat)
}

/// The latency probe beside `streams` bulk streams (see the header).
async fn mixed(addr: &str, up: bool, streams: usize, secs: Duration) -> bool {
    const EACH: u64 = 64 << 20;
    let start = Instant::now();
    let end = start + secs;
    let bulk: Vec<_> = (0..streams as u64)
        .map(|i| {
            let addr = addr.to_owned();
            tokio::spawn(async move {
                let (mut moved, mut round) = (0u64, 0u64);
                while Instant::now() < end {
                    round += 1;
                    if !one_bulk(&addr, up, EACH, 0xB17 + (i << 32) + round).await? {
                        return Err(std::io::Error::other("bytes differ"));
                    }
                    moved += EACH;
                }
                Ok::<_, std::io::Error>(moved)
            })
        })
        .collect();
    // the bulk streams fill their windows first
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = ping_pong(addr.to_owned(), 64, end).await;
    let (mut moved, mut errors) = (0u64, 0);
    for task in bulk {
        match task.await {
            Ok(Ok(bytes)) => moved += bytes,
            _ => errors += 1,
        }
    }
    let bulk_mib = moved as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    let lat = probe.unwrap_or_else(|_| {
        errors += 1;
        Vec::new()
    });
    let direction = if up { "up" } else { "down" };
    report(
        "mixed",
        &format!("\"bulk\":\"{direction}\",\"streams\":{streams},\"bulk_mib_per_s\":{bulk_mib:.1}"),
        lat,
        secs - Duration::from_millis(200),
        errors,
    )
}

async fn rr(addr: &str, conns: usize, size: usize, secs: Duration) -> bool {
    let end = Instant::now() + secs;
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(ping_pong(addr.to_owned(), size, end)))
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await {
            Ok(Ok(lat)) => all.extend(lat),
            _ => errors += 1,
        }
    }
    report(
        "rr",
        &format!("\"conns\":{conns},\"size\":{size}"),
        all,
        secs,
        errors,
    )
}

async fn conn(addr: &str, workers: usize, secs: Duration) -> bool {
    let end = Instant::now() + secs;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let addr = addr.to_owned();
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0usize);
                while Instant::now() < end {
                    let t = Instant::now();
                    match ping_once(&addr).await {
                        Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await {
            Ok((lat, e)) => {
                all.extend(lat);
                errors += e;
            }
            Err(_) => errors += 1,
        }
    }
    report("conn", &format!("\"workers\":{workers}"), all, secs, errors)
}

async fn ping_once(addr: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut message = [PING; 33];
    message[1..].copy_from_slice(&[0x5A; 32]);
    s.write_all(&message).await?;
    let mut back = [0u8; 32];
    s.read_exact(&mut back).await?;
    if back != [0x5A; 32] {
        return Err(std::io::Error::other("echo mismatch"));
    }
    // the service closes first: its FIN, and nothing before it
    if s.read(&mut back).await? != 0 {
        return Err(std::io::Error::other("bytes after the reply"));
    }
    Ok(())
}

async fn hold(addr: &str, conns: usize, secs: Duration) -> bool {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        if let Ok(mut s) = TcpStream::connect(addr).await
            && s.write_all(&[ECHO, 7]).await.is_ok()
            && s.read_u8().await.ok() == Some(7)
        {
            held.push(s);
        }
    }
    println!(
        "{{\"mode\":\"hold\",\"open\":{},\"wanted\":{conns}}}",
        held.len()
    );
    tokio::time::sleep(secs).await;
    let mut alive = 0;
    for s in &mut held {
        if s.write_all(&[9]).await.is_ok() && s.read_u8().await.ok() == Some(9) {
            alive += 1;
        }
    }
    println!("{{\"mode\":\"hold_end\",\"alive\":{alive},\"wanted\":{conns}}}");
    alive == conns
}
