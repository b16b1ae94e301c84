//! The soak: mixed traffic through the CLI server and agents for a long
//! while (30 minutes by default), faults injected every few seconds, every
//! completed transfer checked byte for byte, memory and file descriptors
//! sampled. Not part of CI: `examples/soak.sh` builds and runs it.
//!
//! ```sh
//! cargo build --release --bin zlayer-tunnel --example soak
//! target/release/examples/soak target/release/zlayer-tunnel 1800   # binary, seconds
//! ```
//!
//! * Services, local: a TCP echo, a UDP echo.
//! * Agents: `faulty` (TCP `echo`, UDP `udp`), killed, stopped and restarted
//!   by the faults; `steady` (TCP `steady`), never touched, its process alive
//!   for the whole run, so that its memory shows whether reconnecting leaks.
//! * Traffic: bulk echoes of 64 KiB to 4 MiB and small ping-pongs on both
//!   agents' ports, datagrams on the UDP port. An echo that completes must
//!   come back exactly as sent; one cut by a fault is counted as
//!   interrupted, never as corrupted.
//! * Faults, in turn every `FAULT_EVERY` seconds: the faulty agent stopped
//!   (2 s, then 6 s: past the heartbeat timeout), the server stopped (2 s),
//!   visitors reset mid-transfer, a burst of 2000 visitors, 500 idle control
//!   connections, a datagram flood from 2000 source ports, the faulty agent
//!   killed and restarted; the server killed and restarted every
//!   `SERVER_KILL_EVERY` seconds.
//! * Samples every 5 s: resident memory and open descriptors of each process.
//!
//! Prints a JSON summary; exits non-zero if a byte came back wrong.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const TOKEN: &str = "soak-token";
const FAULT_EVERY: Duration = Duration::from_secs(5);
const SERVER_KILL_EVERY: Duration = Duration::from_secs(300);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// A transfer that takes longer than this is given up (counted as interrupted).
const TRANSFER_DEADLINE: Duration = Duration::from_secs(20);

/// What the traffic saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    interrupted: AtomicU64,
    corrupted: AtomicU64,
    bytes_verified: AtomicU64,
    datagrams_sent: AtomicU64,
    datagrams_answered: AtomicU64,
    datagrams_corrupted: AtomicU64,
}

/// The processes under test and how to start them again.
struct Fleet {
    bin: String,
    control: u16,
    admin: u16,
    ports: (u16, u16),
    echo: u16,
    udp_echo: u16,
    server: Child,
    faulty: Child,
    steady: Child,
}

impl Fleet {
    fn spawn(&self, args: &[String]) -> anyhow::Result<Child> {
        Command::new(&self.bin)
            .args(args)
            .env("ZLAYER_TUNNEL_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {}", self.bin))
    }

    fn server_args(&self) -> Vec<String> {
        let s = |v: &str| v.to_owned();
        vec![
            s("server"),
            s("--listen"),
            format!("127.0.0.1:{}", self.control),
            s("--port-range"),
            format!("{}-{}", self.ports.0, self.ports.1),
            s("--bind-host"),
            s("127.0.0.1"),
            s("--admin-listen"),
            format!("127.0.0.1:{}", self.admin),
            s("--heartbeat-interval"),
            s("1s"),
            s("--heartbeat-timeout"),
            s("4s"),
        ]
    }

    fn agent_args(&self, services: &[(&str, &str, u16, u16)]) -> Vec<String> {
        let mut args = vec![
            "agent".to_owned(),
            "--server".to_owned(),
            format!("ws://127.0.0.1:{}/tunnel/v1", self.control),
        ];
        for (kind, name, local, public) in services {
            args.push(format!("--{kind}"));
            args.push(format!("{name}:{local}:{public}"));
        }
        args
    }

    fn faulty_args(&self) -> Vec<String> {
        self.agent_args(&[
            ("tcp", "echo", self.echo, self.ports.0),
            ("udp", "udp", self.udp_echo, self.ports.0 + 1),
        ])
    }

    fn steady_args(&self) -> Vec<String> {
        self.agent_args(&[("tcp", "steady", self.echo, self.ports.0 + 2)])
    }

    fn pids(&self) -> [(&'static str, u32); 3] {
        [
            ("server", self.server.id()),
            ("faulty", self.faulty.id()),
            ("steady", self.steady.id()),
        ]
    }

    fn restart_server(&mut self) -> anyhow::Result<()> {
        kill(&mut self.server);
        self.server = self.spawn(&self.server_args())?;
        Ok(())
    }

    fn restart_faulty(&mut self) -> anyhow::Result<()> {
        kill(&mut self.faulty);
        self.faulty = self.spawn(&self.faulty_args())?;
        Ok(())
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status();
}

/// A free port on 127.0.0.1 (bound and released; the soak runs alone).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory (KiB) and open descriptors of process `pid`.
fn sample(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bin = args.next().context("usage: soak BINARY [SECONDS]")?;
    let seconds: u64 = args.next().map_or(Ok(1800), |s| s.parse())?;
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let udp_echo = UdpSocket::bind("127.0.0.1:0").await?;
    let low = free_port()?;
    let mut fleet = Fleet {
        bin,
        control: free_port()?,
        admin: free_port()?,
        ports: (low, low + 2),
        echo: echo.local_addr()?.port(),
        udp_echo: udp_echo.local_addr()?.port(),
        server: Command::new("true").spawn()?,
        faulty: Command::new("true").spawn()?,
        steady: Command::new("true").spawn()?,
    };
    tokio::spawn(serve_echo(echo));
    tokio::spawn(serve_udp_echo(udp_echo));
    fleet.server = fleet.spawn(&fleet.server_args())?;
    fleet.faulty = fleet.spawn(&fleet.faulty_args())?;
    fleet.steady = fleet.spawn(&fleet.steady_args())?;
    let tally = Arc::new(Tally::default());
    let end = Instant::now() + Duration::from_secs(seconds);
    let public = |offset: u16| SocketAddr::from(([127, 0, 0, 1], fleet.ports.0 + offset));
    for (worker, port) in [(0, 0), (1, 0), (2, 2), (3, 2)] {
        tokio::spawn(bulk(public(port), worker, tally.clone(), end));
    }
    for worker in 0..2 {
        tokio::spawn(ping_pong(public(worker * 2), tally.clone(), end));
    }
    tokio::spawn(datagrams(public(1), tally.clone(), end));
    let samples = run_faults(&mut fleet, end).await?;
    for child in [&mut fleet.server, &mut fleet.faulty, &mut fleet.steady] {
        signal(child, "CONT");
        kill(child);
    }
    report(&tally, &samples, seconds)
}

/// A sample of one process: seconds into the run, role, pid, KiB, fds.
type Sample = (u64, &'static str, u32, u64, usize);

/// Injects the faults in turn until `end`, sampling as it goes.
async fn run_faults(fleet: &mut Fleet, end: Instant) -> anyhow::Result<Vec<Sample>> {
    let start = Instant::now();
    let pids = Arc::new(std::sync::Mutex::new(fleet.pids()));
    let sampler = tokio::spawn(sample_until(pids.clone(), start, end));
    let mut next_server_kill = start + SERVER_KILL_EVERY;
    let mut turn = 0usize;
    while Instant::now() < end {
        tokio::time::sleep(FAULT_EVERY).await;
        *pids.lock().unwrap_or_else(|e| e.into_inner()) = fleet.pids();
        if Instant::now() >= next_server_kill {
            next_server_kill += SERVER_KILL_EVERY;
            eprintln!("[{:>5}s] fault: server killed", start.elapsed().as_secs());
            fleet.restart_server()?;
            continue;
        }
        let fault = turn % 8;
        turn += 1;
        eprintln!("[{:>5}s] fault {fault}", start.elapsed().as_secs());
        inject(fleet, fault).await?;
        *pids.lock().unwrap_or_else(|e| e.into_inner()) = fleet.pids();
    }
    Ok(sampler.await?)
}

/// Samples the processes every [`SAMPLE_EVERY`] until `end`.
async fn sample_until(
    pids: Arc<std::sync::Mutex<[(&'static str, u32); 3]>>,
    start: Instant,
    end: Instant,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    while Instant::now() < end {
        let at = start.elapsed().as_secs();
        let now = *pids.lock().unwrap_or_else(|e| e.into_inner());
        for (role, pid) in now {
            if let Some((rss, fds)) = sample(pid) {
                samples.push((at, role, pid, rss, fds));
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    samples
}

async fn inject(fleet: &mut Fleet, fault: usize) -> anyhow::Result<()> {
    let public = SocketAddr::from(([127, 0, 0, 1], fleet.ports.0));
    match fault {
        0 => pause(&fleet.faulty, Duration::from_secs(2)).await,
        1 => reset_visitors(public, 50).await,
        2 => pause(&fleet.server, Duration::from_secs(2)).await,
        3 => burst(public, 2000).await,
        4 => pause(&fleet.faulty, Duration::from_secs(6)).await,
        5 => idle_control(fleet.control, 500).await,
        6 => udp_flood(SocketAddr::from(([127, 0, 0, 1], fleet.ports.0 + 1)), 2000).await,
        _ => fleet.restart_faulty()?,
    }
    Ok(())
}

async fn pause(child: &Child, how_long: Duration) {
    signal(child, "STOP");
    tokio::time::sleep(how_long).await;
    signal(child, "CONT");
}

/// Visitors that send a little and reset their connection (linger 0).
async fn reset_visitors(public: SocketAddr, n: usize) {
    for _ in 0..n {
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(public)).await
        {
            let _ = stream.write_all(&[7u8; 4096]).await;
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    }
}

/// `n` visitors at once, held two seconds, then dropped.
async fn burst(public: SocketAddr, n: usize) {
    let connects =
        (0..n).map(|_| tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(public)));
    let held = futures::future::join_all(connects).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
}

/// `n` control connections that upgrade and never authenticate, held two seconds.
async fn idle_control(control: u16, n: usize) {
    let request = format!(
        "GET /tunnel/v1 HTTP/1.1\r\nHost: 127.0.0.1:{control}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let open = (0..n).map(|_| async {
        let mut stream = TcpStream::connect(("127.0.0.1", control)).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        Some(stream)
    });
    let held = futures::future::join_all(open).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
}

/// One datagram from each of `n` fresh source ports.
async fn udp_flood(public: SocketAddr, n: usize) {
    for _ in 0..n {
        if let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await {
            let _ = socket.send_to(b"flood", public).await;
        }
    }
}

/// Echoes every connection until its eof, then closes.
async fn serve_echo(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn serve_udp_echo(socket: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// The pattern byte at `offset` of transfer `seed`.
fn pattern(seed: u64, offset: u64) -> u8 {
    let x = (offset ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// What became of one echo.
enum Outcome {
    Ok(u64),
    Interrupted,
    Corrupted(String),
}

fn count(tally: &Tally, outcome: Outcome) {
    match outcome {
        Outcome::Ok(bytes) => {
            tally.ok.fetch_add(1, Relaxed);
            tally.bytes_verified.fetch_add(bytes, Relaxed);
        }
        Outcome::Interrupted => {
            tally.interrupted.fetch_add(1, Relaxed);
        }
        Outcome::Corrupted(what) => {
            eprintln!("CORRUPTED: {what}");
            tally.corrupted.fetch_add(1, Relaxed);
        }
    }
}

/// Echoes of 64 KiB to 4 MiB, one after another, until `end`.
async fn bulk(public: SocketAddr, worker: u64, tally: Arc<Tally>, end: Instant) {
    repeat_until(end, &tally, |n| {
        let len = (64 * 1024) << (n % 7); // 64 KiB .. 4 MiB
        echo_once(public, worker << 40 | n, len)
    })
    .await;
}

/// Runs `transfer(1)`, `transfer(2)`, ... until `end`, each within
/// [`TRANSFER_DEADLINE`], counting what became of each; a pause after one
/// that was cut (the fault is likely still on).
async fn repeat_until<F, Fut>(end: Instant, tally: &Tally, mut transfer: F)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        let outcome = tokio::time::timeout(TRANSFER_DEADLINE, transfer(n))
            .await
            .unwrap_or(Outcome::Interrupted);
        let failed = matches!(outcome, Outcome::Interrupted);
        count(tally, outcome);
        if failed {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Sends `len` pattern bytes, then eof; reads the echo to its eof, checking it.
async fn echo_once(public: SocketAddr, seed: u64, len: u64) -> Outcome {
    let Ok(stream) = TcpStream::connect(public).await else {
        return Outcome::Interrupted;
    };
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut offset = 0;
        let mut chunk = vec![0u8; 32 * 1024];
        while offset < len {
            let n = chunk.len().min((len - offset) as usize);
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(seed, offset + i as u64);
            }
            w.write_all(&chunk[..n]).await?;
            offset += n as u64;
        }
        w.shutdown().await
    });
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return Outcome::Interrupted,
        };
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern(seed, got + i as u64) {
                return Outcome::Corrupted(format!(
                    "seed {seed:#x}: byte {} wrong",
                    got + i as u64
                ));
            }
        }
        got += n as u64;
        if got > len {
            return Outcome::Corrupted(format!("seed {seed:#x}: {got} bytes back of {len}"));
        }
    }
    let sent = matches!(writer.await, Ok(Ok(())));
    match (sent, got == len) {
        (true, true) => Outcome::Ok(len * 2),
        // a prefix back, then eof: the connection was cut (a fault), not corrupted
        _ => Outcome::Interrupted,
    }
}

/// 64-byte ping-pongs on one connection, reconnecting when it is cut.
async fn ping_pong(public: SocketAddr, tally: Arc<Tally>, end: Instant) {
    repeat_until(end, &tally, |seed| exchanges(public, seed, 1000)).await;
}

async fn exchanges(public: SocketAddr, seed: u64, rounds: u64) -> Outcome {
    let Ok(mut stream) = TcpStream::connect(public).await else {
        return Outcome::Interrupted;
    };
    let mut out = [0u8; 64];
    let mut back = [0u8; 64];
    for round in 0..rounds {
        for (i, b) in out.iter_mut().enumerate() {
            *b = pattern(seed, round * 64 + i as u64);
        }
        if stream.write_all(&out).await.is_err() || stream.read_exact(&mut back).await.is_err() {
            return Outcome::Interrupted;
        }
        if back != out {
            return Outcome::Corrupted(format!("ping-pong {seed}: round {round} wrong"));
        }
    }
    Outcome::Ok(rounds * 128)
}

/// Datagrams from one socket, each answered (or lost) before the next.
async fn datagrams(public: SocketAddr, tally: Arc<Tally>, end: Instant) {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
        return;
    };
    let mut n = 0u64;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < end {
        n += 1;
        let out = datagram(n);
        tally.datagrams_sent.fetch_add(1, Relaxed);
        if socket.send_to(&out, public).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        // answers to earlier datagrams (late, after a fault) are read past
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            let answer = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await;
            let Ok(Ok(len)) = answer else {
                break;
            };
            let of = buf[..len.min(8)]
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if of == 0 || of > n || buf[..len] != datagram(of)[..] {
                tally.datagrams_corrupted.fetch_add(1, Relaxed);
            } else if of == n {
                tally.datagrams_answered.fetch_add(1, Relaxed);
                break;
            }
        }
    }
}

/// Datagram `n`: its number, then 1192 pattern bytes.
fn datagram(n: u64) -> Vec<u8> {
    let mut out = n.to_be_bytes().to_vec();
    out.extend((0..1192).map(|i| pattern(n, i)));
    out
}

fn report(tally: &Tally, samples: &[Sample], seconds: u64) -> anyhow::Result<()> {
    let get = |n: &AtomicU64| n.load(Relaxed);
    let mut roles = serde_json::Map::new();
    for role in ["server", "faulty", "steady"] {
        let of_role: Vec<_> = samples.iter().filter(|s| s.1 == role).collect();
        let window = |from: u64, to: u64| {
            let rss = of_role
                .iter()
                .filter(|s| s.0 >= from && s.0 < to)
                .map(|s| s.3);
            let fds = of_role
                .iter()
                .filter(|s| s.0 >= from && s.0 < to)
                .map(|s| s.4);
            (rss.max().unwrap_or(0), fds.max().unwrap_or(0))
        };
        let tenth = seconds / 10;
        let (first_rss, first_fds) = window(0, tenth.max(60));
        let (last_rss, last_fds) = window(seconds - tenth.max(60), seconds + 60);
        let (max_rss, max_fds) = window(0, seconds + 60);
        let instances = {
            let mut pids: Vec<_> = of_role.iter().map(|s| s.2).collect();
            pids.dedup();
            pids.len()
        };
        roles.insert(
            role.to_owned(),
            serde_json::json!({
                "instances": instances,
                "rss_kib_max_first_tenth": first_rss,
                "rss_kib_max_last_tenth": last_rss,
                "rss_kib_max": max_rss,
                "fds_max_first_tenth": first_fds,
                "fds_max_last_tenth": last_fds,
                "fds_max": max_fds,
            }),
        );
    }
    let summary = serde_json::json!({
        "seconds": seconds,
        "transfers_ok": get(&tally.ok),
        "transfers_interrupted": get(&tally.interrupted),
        "transfers_corrupted": get(&tally.corrupted),
        "bytes_verified": get(&tally.bytes_verified),
        "datagrams_sent": get(&tally.datagrams_sent),
        "datagrams_answered": get(&tally.datagrams_answered),
        "datagrams_corrupted": get(&tally.datagrams_corrupted),
        "processes": roles,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if get(&tally.corrupted) > 0 || get(&tally.datagrams_corrupted) > 0 {
        bail!("bytes came back wrong");
    }
    if get(&tally.ok) == 0 {
        bail!("no transfer completed");
    }
    Ok(())
}
