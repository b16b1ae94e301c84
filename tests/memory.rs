//! Memory stays bounded when visitors stop reading: the windows hold the line
//! between a fast service and a stalled visitor, the service is seen to block,
//! and every byte still arrives once the visitors read again.
//!
//! The server and the agent are the `zlayer-tunnel` binary, each a process of
//! its own, and the RSS growth measured is theirs together: the service and
//! the visitors (this process) and whatever else the test harness holds are
//! not counted. Run in release (the release pass of CI): moving gigabytes
//! through an unoptimised build is slow.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::free_ports;
use common::process::Proc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Period of the test pattern: a prime, so a misplaced chunk shows.
const PERIOD: usize = 65521;

fn table() -> Arc<Vec<u8>> {
    Arc::new(
        (0..2 * PERIOD)
            .map(|i| {
                ((i % PERIOD) as u32)
                    .wrapping_mul(2_654_435_761)
                    .to_be_bytes()[1]
            })
            .collect(),
    )
}

/// A server process with `flags` and an agent process publishing the
/// service on port `source` through it: both, and the public port, once the
/// agent registered.
fn tunnel_processes(source: u16, flags: &[&str]) -> (Proc, Proc, u16) {
    let public = free_ports(1).0;
    let mut server = Proc::server((public, public), flags);
    let control = server.listening_addr("control channel listening");
    let url = format!("ws://{control}/tunnel/v1");
    let spec = format!("src:{source}:{public}");
    let mut agent = Proc::spawn(&["agent", "--server", &url, "--tcp", &spec]);
    assert_eq!(agent.registered_port(), public);
    (server, agent, public)
}

/// RSS of the server and the agent processes together, in KiB.
fn rss_kib(server: &Proc, agent: &Proc) -> u64 {
    common::rss_kib(server.child.id()) + common::rss_kib(agent.child.id())
}

/// A service that answers a request for N bytes with N bytes of the pattern,
/// counting what it managed to write.
async fn pattern_source(progress: Arc<AtomicU64>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let table = table();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (table, progress) = (table.clone(), progress.clone());
            tokio::spawn(async move {
                let _ = socket2::SockRef::from(&s).set_send_buffer_size(SOCKET_BUFFER as usize);
                let mut req = [0u8; 8];
                if s.read_exact(&mut req).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(req);
                let mut offset = 0usize;
                while left > 0 {
                    let n = (left as usize).min(16 * 1024);
                    if s.write_all(&table[offset..offset + n]).await.is_err() {
                        return;
                    }
                    offset = (offset + n) % PERIOD;
                    left -= n as u64;
                    progress.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// Kernel buffer of each test socket (visitors' receive, the service's send):
/// small and fixed, so that 1000 stalled streams stay far below the host's
/// TCP memory limits (`tcp_mem`). Past those, the kernel shrinks every
/// window on the machine and the tunnel's own socket crawls with the rest.
const SOCKET_BUFFER: u32 = 64 * 1024;

async fn request(port: u16, len: u64) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    s.write_all(&len.to_be_bytes()).await.unwrap();
    s
}

/// Reads the whole answer, checking every byte against the pattern.
async fn read_and_verify(mut s: TcpStream, len: u64) {
    let table = table();
    let mut buf = vec![0u8; 32 * 1024]; // < PERIOD, so offset + n stays inside the table
    let (mut got, mut offset) = (0u64, 0usize);
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(
            buf[..n] == table[offset..offset + n],
            "corrupted at byte {got}"
        );
        offset = (offset + n) % PERIOD;
        got += n as u64;
    }
    assert_eq!(got, len, "short answer");
}

/// Waits until `progress` stops moving for half a second.
async fn wait_stalled(progress: &AtomicU64) -> u64 {
    common::wait_stalled(progress, Duration::from_millis(500), "the service").await
}

/// One test: the two loads (each moves gigabytes) one after the other.
#[cfg_attr(
    debug_assertions,
    ignore = "moves gigabytes: runs in the release pass (cargo test --release)"
)]
#[actix_web::test]
async fn stalled_visitors_hold_memory_bounded_and_then_get_every_byte() {
    one_stalled_visitor_of_a_1_gib_answer().await;
    a_thousand_stalled_visitors().await;
}

async fn one_stalled_visitor_of_a_1_gib_answer() {
    const LEN: u64 = 1 << 30;
    let progress = Arc::new(AtomicU64::new(0));
    let source = pattern_source(progress.clone()).await;
    let (server, agent, port) = tunnel_processes(source, &[]);
    let idle = rss_kib(&server, &agent);
    let visitor = request(port, LEN).await;
    let sent = wait_stalled(&progress).await;
    let grown = rss_kib(&server, &agent).saturating_sub(idle);
    eprintln!(
        "stalled visitor: service blocked after {} KiB of 1 GiB; server and agent RSS +{grown} KiB",
        sent / 1024
    );
    assert!(
        sent < LEN / 4,
        "the service was never held back ({sent} bytes sent)"
    );
    assert!(
        grown < 16 * 1024,
        "memory grew {grown} KiB with one stalled visitor"
    );
    tokio::time::timeout(Duration::from_secs(120), read_and_verify(visitor, LEN))
        .await
        .expect("resumed transfer too slow");
}

async fn a_thousand_stalled_visitors() {
    const STREAMS: usize = 1000;
    const LEN: u64 = 4 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let source = pattern_source(progress.clone()).await;
    let heartbeats = ["--heartbeat-interval", "1s", "--heartbeat-timeout", "10s"];
    let (server, agent, port) = tunnel_processes(source, &heartbeats);
    let idle = rss_kib(&server, &agent);
    let mut visitors = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        visitors.push(request(port, LEN).await);
    }
    let sent = wait_stalled(&progress).await;
    let grown = rss_kib(&server, &agent).saturating_sub(idle);
    eprintln!(
        "{STREAMS} stalled visitors: service blocked after {} MiB of {} MiB; server and agent RSS +{grown} KiB ({} KiB per stream)",
        sent >> 20,
        (STREAMS as u64 * LEN) >> 20,
        grown / STREAMS as u64
    );
    // windows and kernel buffers absorb well under 1 MiB per stream; the rest must wait
    assert!(
        sent < STREAMS as u64 * LEN / 4,
        "the service was never held back"
    );
    assert!(
        grown < 96 * 1024,
        "memory grew {grown} KiB with {STREAMS} stalled visitors"
    );
    let readers: Vec<_> = visitors
        .into_iter()
        .map(|v| tokio::spawn(read_and_verify(v, LEN)))
        .collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        for r in readers {
            r.await.unwrap();
        }
    })
    .await
    .expect("resumed transfers too slow");
}
