//! Ports a test must name before anything binds them (a server's public port
//! range, a control port that a restarted server binds again). Where the OS
//! can pick (binding port 0), tests let it; these are for the rest.
//!
//! A range allocator, not a probe: each process hands out ports from a window
//! below the kernel's ephemeral range (so no client socket takes one between
//! its hand-out and its use) and above the benchmarks' fixed ports
//! (21001-24999), walking it with one atomic cursor from a start drawn from
//! the process id, so that a port is never handed out twice in one process
//! and concurrent test processes start far apart. A port something else
//! holds when its turn comes (another process) is skipped, never retried.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port above the benchmarks' fixed ones.
const ABOVE_BENCHMARKS: u16 = 25000;

/// This process's window: `size` ports from `low`, walked from `start`.
struct Window {
    low: u16,
    size: u32,
    start: u32,
}

static WINDOW: OnceLock<Window> = OnceLock::new();

/// Ports of the window handed out or skipped so far by this process.
static TAKEN: AtomicU32 = AtomicU32::new(0);

/// `n` consecutive ports on 127.0.0.1, first and last: handed out by no
/// earlier call in this process, and free (TCP and UDP) when handed out.
/// Panics once the window is used up (thousands of ports: a runaway test).
pub fn free_ports(n: u16) -> (u16, u16) {
    assert!(n > 0, "no ports asked for");
    let window = WINDOW.get_or_init(window);
    let wanted = u32::from(n);
    loop {
        let taken = TAKEN.fetch_add(wanted, Ordering::Relaxed);
        assert!(
            taken + wanted <= window.size,
            "the test port window ({} ports from {}) is used up",
            window.size,
            window.low
        );
        let offset = (window.start + taken) % window.size;
        if offset + wanted > window.size {
            continue; // would run past the window's end: skipped
        }
        // invariant: offset + n <= size, and low + size fits in a u16
        let first = window.low + offset as u16;
        let last = first + (n - 1);
        if (first..=last).all(free) {
            return (first, last);
        }
    }
}

/// Whether nothing holds `port` on 127.0.0.1, for TCP or UDP.
fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// Outside the kernel's ephemeral range, above the benchmarks' ports; the
/// start of the walk from this process's id.
fn window() -> Window {
    let ephemeral: Vec<u16> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let (first_ephemeral, last_ephemeral) = match ephemeral[..] {
        [low, high] => (low, high),
        _ => (32768, 60999),
    };
    let (low, high) = if first_ephemeral >= ABOVE_BENCHMARKS + 1000 {
        (ABOVE_BENCHMARKS, first_ephemeral - 1)
    } else if last_ephemeral <= u16::MAX - 1000 {
        (last_ephemeral + 1, u16::MAX)
    } else {
        (1024, u16::MAX) // no room outside it: anywhere
    };
    let size = u32::from(high - low) + 1;
    // Knuth's multiplicative hash: nearby process ids start far apart
    let start = std::process::id().wrapping_mul(2_654_435_761) % size;
    Window { low, size, start }
}
