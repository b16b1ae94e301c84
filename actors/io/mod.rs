//! IO plumbing: what the actors and handles stand on that is neither an actor
//! nor a handle. The library's runtime thread, `serve` and the admin
//! endpoints (actix-web servers), a control connection on a raw socket,
//! shutdown signals, the WebSocket frame guard, the read gate that bounds
//! what a tunnel side has read, the stream hub that joins a side's connection
//! table to its sockets, the local dial and the socket options.

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
