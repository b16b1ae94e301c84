//! IO plumbing: what the actors and handles stand on that is neither an actor
//! nor a handle. The library's runtime thread, `serve` and the admin
//! endpoints (actix-web servers), a control connection on a raw socket,
//! shutdown signals, the WebSocket frame guard, the read gate that bounds
//! what a tunnel side has read, the stream hub that joins a side's connection
//! table to its sockets, the turns a busy socket takes with the others on its
//! thread, the local dial and the socket options.

pub(crate) mod admin;
#[cfg(feature = "etcd")]
pub(crate) mod etcd_store;
pub(crate) mod frame_guard;
pub(crate) mod local_dial;
pub(crate) mod raw_connection;
pub(crate) mod read_gate;
pub(crate) mod runtime;
pub(crate) mod serve;
pub(crate) mod signals;
pub(crate) mod socket_options;
pub(crate) mod stream_hub;
pub(crate) mod turns;

/// A listener that could not bind, said with its address, what it is for
/// (`what`, naming its flag) and what to do.
pub(crate) fn bind_error(
    error: std::io::Error,
    addr: std::net::SocketAddr,
    what: &str,
) -> std::io::Error {
    let hint = match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            ": another process listens there; stop it, or choose another address"
        }
        std::io::ErrorKind::PermissionDenied => {
            ": ports below 1024 need CAP_NET_BIND_SERVICE (or root); or choose a higher port"
        }
        std::io::ErrorKind::AddrNotAvailable => ": no interface of this machine has that address",
        _ => "",
    };
    std::io::Error::new(
        error.kind(),
        format!("cannot listen on {addr} for {what}: {error}{hint}"),
    )
}
