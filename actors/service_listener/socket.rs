//! The listener's socket: bound with the options its visitors inherit, and
//! accepted from only while fewer than [`MAX_WAITING_VISITORS`] visitors wait
//! for their channels.

use tokio::net::TcpSocket;

use super::*;
use crate::actors::io::socket_options::limit_unsent;

impl ServiceListener {
    /// Binds `host:port` with `SO_REUSEADDR` (and, on Linux, the options that
    /// accepted sockets inherit: see [`ACCEPTED_SOCKETS_TUNED`]).
    pub(crate) fn bind(host: &str, port: u16) -> io::Result<TcpListener> {
        let addr = Self::resolve(host, port)?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if ACCEPTED_SOCKETS_TUNED {
            socket.set_nodelay(true)?;
            limit_unsent(&socket)?;
        }
        socket.bind(addr)?;
        socket.listen(1024)
    }

    /// `host:port` as a socket address (an IPv6 host with or without brackets).
    pub(crate) fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
        format!("{host}:{port}")
            .parse()
            .or_else(|_| format!("[{host}]:{port}").parse())
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad bind host {host:?}"),
                )
            })
    }
}

/// Accepts the next visitor once fewer than [`MAX_WAITING_VISITORS`] wait for
/// the channel.
pub(super) async fn accept(
    listener: &TcpListener,
    waiting: Arc<Semaphore>,
    port: u16,
    guards: &GuardCounters,
) -> Accepted {
    let place = take_place(waiting, port, guards)
        .await
        .map_err(|_| io::Error::other("visitor limit closed"))?;
    let (socket, peer) = listener.accept().await?;
    Ok((socket, peer, place))
}

/// A place among the visitors waiting for the channel, as soon as one is
/// free. A wait that lasts (the channel is stuck, not just busy with a
/// registration for a moment) is logged and counted.
async fn take_place(
    waiting: Arc<Semaphore>,
    port: u16,
    guards: &GuardCounters,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if let Ok(place) = waiting.clone().try_acquire_owned() {
        return Ok(place);
    }
    let next = waiting.clone().acquire_owned();
    if let Ok(place) = tokio::time::timeout(PAUSE_WORTH_A_LINE, next).await {
        return place;
    }
    guards.accept_paused();
    tracing::warn!(
        port,
        waiting = MAX_WAITING_VISITORS,
        "the tunnel is not taking its visitors; accepting paused"
    );
    let place = waiting.acquire_owned().await;
    tracing::info!(port, "the tunnel takes visitors again; accepting");
    place
}

/// Closes a visitor's socket with RST (SO_LINGER 0), as a refused stream is.
pub(super) fn reset(socket: &TcpStream) {
    // with a zero timeout SO_LINGER never blocks the thread
    #[allow(deprecated)]
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Visitors' sockets get no options of their own on Linux: they must
    /// inherit them from the listener, or small writes would wait for Nagle
    /// and stalled visitors would hold megabytes in the kernel.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_the_unsent_limit() {
        if !ACCEPTED_SOCKETS_TUNED {
            return;
        }
        let listener = ServiceListener::bind("127.0.0.1", 0).expect("bind");
        let addr = listener.local_addr().expect("address");
        let _visitor = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let options = socket2::SockRef::from(&accepted);
        assert!(options.tcp_nodelay().expect("TCP_NODELAY"));
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(
            options.tcp_notsent_lowat().expect("TCP_NOTSENT_LOWAT"),
            128 * 1024
        );
    }
}
