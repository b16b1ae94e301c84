//! The actix runtime: one actor per file, each thin. Actors receive a message,
//! ask the sans-IO core (`src/`) what to do, and do the IO.
//!
//! Server side, as built so far:
//!
//! ```text
//!  agent ──ws──▶ ControlChannel ──OpenTunnel/AllocatePort/ReportAlive──▶ Registry
//!                     ▲                                                    │
//!                     └──────────────── CloseTunnel (takeover, silence) ◀──┘
//! ```
//!
//! * [`Registry`](registry) (one per server, on the library's runtime thread):
//!   port pool, tunnels by token hash and client id, the liveness watchdog.
//! * `ControlChannel` (one per agent WebSocket): authentication with a
//!   deadline, registrations answered in order, heartbeats.
//! * [`ControlHandler`]: mounts the control route in an actix-web `App`, or
//!   serves a raw TCP connection (`handle_connection`).

mod access_session;
mod agent_connection;
mod control_channel;
mod flow_hub;
mod forwarded_connection;
mod handles;
mod io;
pub mod registry;
mod relay;
mod service_listener;
mod stream_hub;
mod udp_flow;
mod udp_listener;

pub use handles::access_manager::{AccessManager, StartedSession};
pub use handles::agent_view::{PublishedCallback, PublishedService};
pub use handles::control_handler::ControlHandler;
pub use handles::node_tunnels::NodeTunnelManager;
pub use handles::tunnel_agent::{ConnectionCallback, TunnelAgent};
pub use io::serve::{ServeOptions, serve};
pub use io::signals::shutdown_signal;
pub use registry::{ServiceInfo, TunnelInfo, TunnelRegistry};

use crate::ports::PortError;

/// Now, in milliseconds since the Unix epoch (for last-activity stamps).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Failures of the runtime, mapped to a reply to the peer and a log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server holds its maximum of tunnels.
    #[error("server is at its limit of {max} tunnels")]
    TooManyTunnels {
        /// The limit.
        max: usize,
    },
    /// The tunnel is no longer registered (it was closed or taken over).
    #[error("tunnel is no longer registered")]
    UnknownTunnel,
    /// A port could not be allocated.
    #[error(transparent)]
    Port(#[from] PortError),
    /// An actor's mailbox is gone (shutting down).
    #[error("server is shutting down")]
    Mailbox,
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Self::Mailbox
    }
}
