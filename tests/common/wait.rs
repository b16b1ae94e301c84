//! Every wait of the tests goes through here: one polling loop with a
//! deadline ([`poll_every`], and its twin for plain threads), and the waits
//! built on it. A test waits for a state to hold, never for time to pass.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::DEADLINE;

/// How often a condition is checked, unless a wait says otherwise.
pub const POLL: Duration = Duration::from_millis(10);

/// The polling loop: checks `check` (at once, then every `every`) until it
/// holds, then true; false once `within` has passed without it holding.
pub async fn poll_every<F, Fut>(within: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll_every`] at the usual pace.
pub async fn poll<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_every(within, POLL, check).await
}

/// [`poll_every`] for a plain thread (no runtime): checks `check` every
/// [`POLL`] until it holds, for at most `within`.
pub fn poll_blocking(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `check` until it holds; panics with `what` after `DEADLINE`.
pub async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(poll(DEADLINE, check).await, "never: {what}");
}

/// Waits until `read` gives the same value five times in a row, `quiet / 5`
/// apart, and returns it; panics with `failure(last value)` after
/// `3 * DEADLINE`.
pub async fn wait_settled(
    mut read: impl FnMut() -> u64,
    quiet: Duration,
    failure: impl Fn(u64) -> String,
) -> u64 {
    let (mut last, mut still) = (u64::MAX, 0);
    let settled = poll_every(DEADLINE * 3, quiet / 5, || {
        let now = read();
        still = if now == last { still + 1 } else { 0 };
        last = now;
        std::future::ready(still >= 5)
    })
    .await;
    assert!(settled, "{}", failure(last));
    last
}

/// Waits until `progress` has not moved for `quiet`, and returns where it
/// stopped; panics with `what` and the bytes so far after `3 * DEADLINE`.
pub async fn wait_stalled(
    progress: &std::sync::atomic::AtomicU64,
    quiet: Duration,
    what: &str,
) -> u64 {
    let load = || progress.load(std::sync::atomic::Ordering::Relaxed);
    wait_settled(load, quiet, |last| {
        format!("{what} never stalled: {} MiB so far", last >> 20)
    })
    .await
}

/// Waits until `port` on 127.0.0.1 accepts connections (each try that
/// succeeds is a connection: not for a tunnel's public port, where it would
/// be a visitor; see `Published` and `Proc::registered_port`).
pub async fn wait_listening(port: u16) {
    let open = poll(DEADLINE, || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    assert!(open, "port {port} never opened");
}

/// Whether `port` on 127.0.0.1 refuses connections within `within`.
pub async fn wait_closed(port: u16, within: Duration) -> bool {
    poll(within, || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_err()
    })
    .await
}
