//! Dialing a local service. To an IP address, `connect` is called right away
//! and, on loopback (where the kernel completes the handshake inside the
//! call), the stream is ready before the handler returns: the visitor's first
//! bytes go out in the same turn of the event loop, and no timer is armed.
//! Anything else (a name to resolve, a handshake still in flight) finishes in
//! the background, bounded by the caller's timeout.

use std::io;
use std::net::SocketAddr;

use futures::future::LocalBoxFuture;
use tokio::net::TcpStream;

/// How far `connect` got in the call.
pub(crate) enum Dialing {
    /// Connected, or failed, inside the call.
    Done(io::Result<TcpStream>),
    /// A handshake in flight, or a name to resolve: await it, with a timeout.
    Later(LocalBoxFuture<'static, io::Result<TcpStream>>),
}

/// Starts connecting to `addr` (`IP:PORT`, or `NAME:PORT` resolved later).
pub(crate) fn dial(addr: &str) -> Dialing {
    let Ok(ip) = addr.parse::<SocketAddr>() else {
        let addr = addr.to_owned();
        return Dialing::Later(Box::pin(async move { TcpStream::connect(addr).await }));
    };
    start(ip).unwrap_or_else(|e| Dialing::Done(Err(e)))
}

/// A non-blocking `connect`: done when the peer is known at once.
fn start(addr: SocketAddr) -> io::Result<Dialing> {
    let socket = nonblocking_stream(addr)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if in_progress(&e) => {}
        Err(e) => return Err(e),
    }
    let connected = socket.peer_addr().is_ok();
    let socket = TcpStream::from_std(socket.into())?;
    Ok(if connected {
        Dialing::Done(Ok(socket))
    } else {
        Dialing::Later(Box::pin(finish(socket)))
    })
}

/// A non-blocking TCP socket for `addr` (close-on-exec, as `socket2` makes
/// every socket), in one system call where the kernel takes the flag.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn nonblocking_stream(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let kind = socket2::Type::STREAM.nonblocking();
    socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)
}

/// A non-blocking TCP socket for `addr` (close-on-exec, as `socket2` makes
/// every socket).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn nonblocking_stream(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Waits for an in-flight handshake: writable, then the socket's error if any
/// (what tokio's own `connect` does).
async fn finish(socket: TcpStream) -> io::Result<TcpStream> {
    socket.writable().await?;
    match socket.take_error()? {
        Some(e) => Err(e),
        None => Ok(socket),
    }
}

/// The error of a non-blocking `connect` that has started the handshake.
fn in_progress(e: &io::Error) -> bool {
    #[cfg(unix)]
    return e.raw_os_error() == Some(libc::EINPROGRESS);
    #[cfg(not(unix))]
    return e.kind() == io::ErrorKind::WouldBlock;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loopback_service_is_connected_within_the_call() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let Dialing::Done(Ok(socket)) = dial(&addr) else {
            panic!("a loopback dial did not complete inside connect");
        };
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(socket.local_addr().unwrap(), accepted.peer_addr().unwrap());
    }

    #[tokio::test]
    async fn a_closed_port_fails_and_a_name_connects_later() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let closed = {
            let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            spare.local_addr().unwrap().to_string()
        };
        let refused = match dial(&closed) {
            Dialing::Done(result) => result.map(drop),
            Dialing::Later(connecting) => connecting.await.map(drop),
        };
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        let Dialing::Later(connecting) = dial(&format!("localhost:{port}")) else {
            panic!("a name was dialed without resolving it");
        };
        let socket = connecting.await.unwrap();
        assert_eq!(socket.peer_addr().unwrap().port(), port);
    }
}
