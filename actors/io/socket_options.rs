//! Socket options the runtime sets: the unsent-bytes cap of forwarded
//! sockets and public listeners, and the keepalive and user timeout of an
//! agent's control socket. Each is what the kernel can do for us that no
//! actor can: bound what a stalled peer costs, end what a vanished peer left.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// Unsent bytes the kernel may hold for one forwarded socket before it stops
/// taking writes: enough to keep a fast peer busy between two wake-ups.
const UNSENT_LOW_WATER: u32 = 128 * 1024;

/// Caps what a socket whose peer stopped reading keeps in the kernel
/// (`TCP_NOTSENT_LOWAT`). Without it the kernel grows the send buffer to
/// megabytes per socket, and a thousand stalled visitors push the whole host
/// into TCP memory pressure, where every window, the tunnel's own included,
/// shrinks to a crawl.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn limit_unsent<S: std::os::fd::AsFd>(socket: &S) -> io::Result<()> {
    socket2::SockRef::from(socket).set_tcp_notsent_lowat(UNSENT_LOW_WATER)
}

/// Elsewhere the kernel has no such option.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn limit_unsent<S>(_: &S) -> io::Result<()> {
    let _ = UNSENT_LOW_WATER;
    Ok(())
}

/// Keepalive probes and `TCP_USER_TIMEOUT` on an agent's control socket, so
/// that the kernel ends a connection whose peer vanished or stopped reading:
/// the one fault a frozen WebSocket actor cannot detect itself.
pub(crate) fn harden_control_socket(socket: &TcpStream, timeout: Duration) {
    let sock = socket2::SockRef::from(socket);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(timeout)
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(timeout));
}
