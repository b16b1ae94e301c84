//! The actix runtime: actors that move bytes and messages and carry out what
//! the sans-IO core (`src/`) decides. A file directly in this folder is one
//! actor, named for it; an actor with several concerns keeps them in child
//! modules in the folder of its name. Handles live in `handles/`, IO plumbing
//! in `io/`; `tests/architecture.rs` checks all three.
//!
//! ```text
//!  server                                             agent
//!  Registry (on the runtime thread)                   TunnelAgent (handle)
//!    ▲ OpenTunnel, AllocatePort, ReportAlive          │ Supervisor::start
//!    │ ▼ CloseTunnel (takeover, silence)              ▼
//!  ControlChannel ◀═══════════ WebSocket ══════════▶  AgentConnection
//!    ▲          │ StreamHub                           │ StreamHub, FlowHub
//!    │          ▼                                     ▼
//!    │        ForwardedConnection ◀──── stream ────▶  ForwardedConnection, UdpFlow
//!    │ VisitorArrived, UdpEvent
//!  ServiceListener, UdpServiceListener (one per public port)
//! ```
//!
//! Actors, one per file:
//!
//! * [`Registry`](registry) (`registry.rs`; its ports and services in
//!   `registry/`): one per server, on the library's runtime thread; the port
//!   pool, tunnels by token hash and client id, the liveness watchdog.
//! * `ControlChannel` (`control_channel.rs`, `control_channel/`): one per agent
//!   WebSocket; carries out its `ServerSession`'s actions (authentication,
//!   registrations answered in order, heartbeats), its streams, UDP side and
//!   relayed access streams (`relay.rs`: the `Relay` message between two
//!   channels and the other ends' recipients); one write path (`writer.rs`).
//! * `ServiceListener` (`service_listener.rs`): one per public TCP port; hands
//!   visitors to the channel.
//! * `UdpServiceListener` (`udp_listener.rs`): one per public UDP port; its
//!   flows, datagrams up as frames, replies out.
//! * `ForwardedConnection` (`forwarded_connection.rs`; its read and write sides
//!   in `forwarded_connection/`): one per forwarded TCP connection, both sides.
//! * `AgentConnection` (`agent_connection.rs`, `agent_connection/`): the
//!   agent's link, under an actix `Supervisor`; carries out its
//!   `AgentSession`'s actions; its UDP flows' sockets and waiting datagrams
//!   (`flow_hub.rs`); one write path (`writer.rs`, a `FrameQueue`).
//! * `UdpFlow` (`udp_flow.rs`): one per UDP flow on the agent.
//! * `UdpForward` (`udp_forward.rs`): one per UDP port a server of a cluster
//!   forwards to its peers; its visitors' flows go through peer links.
//! * `AccessSession` (`access_session.rs`): one per on-demand access session.
//! * `TokenSync` (`token_sync.rs`): one per server of a cluster; follows the
//!   cluster store's tokens and closes the tunnels of revoked ones.
//! * `RouteSync` (`route_sync.rs`; its forwards in `route_sync/`): one per
//!   server of a cluster with peers; publishes its routes, reads the others',
//!   forwards the public ports of services registered only on peers.
//!
//! Handles (`handles/`): [`ControlHandler`] (mounts the control route in an
//! actix-web `App`, or serves a raw TCP connection) and the state its channels
//! share, [`TunnelRegistry`], [`TunnelAgent`], [`NodeTunnelManager`],
//! [`AccessManager`], `AgentView` (an agent's session as reported), and
//! `Reloader` (a server's tokens and limits re-read on `SIGHUP` or `POST /reload`).
//!
//! IO plumbing (`io/`): the library's runtime thread (`runtime.rs`),
//! [`serve`] (`serve.rs`), the admin endpoints (`admin.rs`),
//! [`shutdown_signal`] (`signals.rs`), a control connection on a raw socket
//! (`raw_connection.rs`), the WebSocket frame guard (`frame_guard.rs`), the
//! read gate (`read_gate.rs`), the local dial (`local_dial.rs`), socket
//! options (`socket_options.rs`) and the stream hub (`stream_hub.rs`: a tunnel
//! side's connection table joined to its `ForwardedConnection`s).

mod access_session;
mod agent_connection;
mod control_channel;
mod forwarded_connection;
mod handles;
mod io;
pub mod registry;
mod route_sync;
mod service_listener;
mod token_sync;
mod udp_flow;
mod udp_forward;
mod udp_listener;

pub use handles::access_manager::{AccessManager, StartedSession};
pub use handles::agent_view::{PublishedCallback, PublishedService};
pub use handles::control_handler::ControlHandler;
pub use handles::node_tunnels::NodeTunnelManager;
pub use handles::reload::{ConfigReload, ReloadReport, ReloadedConfig};
pub use handles::tunnel_agent::{ConnectionCallback, TunnelAgent};
#[cfg(feature = "etcd")]
pub use io::etcd_store::{EtcdOptions, EtcdStore};
pub use io::serve::{ServeOptions, serve};
pub use io::signals::shutdown_signal;
pub use registry::{ServiceInfo, TunnelInfo, TunnelRegistry};
pub use route_sync::PeerOptions;

use crate::tunnels::RegistryError;

/// Now, in milliseconds since the Unix epoch (for last-activity stamps).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Failures of the runtime, mapped to a reply to the peer and a log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The registry refused: its tunnel limit, a tunnel it no longer
    /// knows, a port it could not give.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An actor's mailbox is gone (shutting down).
    #[error("server is shutting down")]
    Mailbox,
}

impl Error {
    /// Whether a registration refused for this can succeed if asked again soon.
    pub(crate) fn refusal(&self) -> crate::protocol::RegisterRefusal {
        match self {
            Self::Registry(e) => e.refusal(),
            Self::Mailbox => crate::protocol::RegisterRefusal::Later,
        }
    }
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Self::Mailbox
    }
}
