//! IO plumbing: what the actors and handles stand on that is neither an actor
//! nor a handle. The library's runtime thread, `serve` and the admin
//! endpoints (actix-web servers), shutdown signals, the WebSocket frame guard,
//! the read gate that bounds what a tunnel side has read, and the local dial.

pub(crate) mod admin;
pub(crate) mod frame_guard;
pub(crate) mod local_dial;
pub(crate) mod read_gate;
pub(crate) mod runtime;
pub(crate) mod serve;
pub(crate) mod signals;
