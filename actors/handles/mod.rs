//! Handles: the types a host holds (`TunnelRegistry`, `ControlHandler`,
//! `TunnelAgent`, `NodeTunnelManager`, `AccessManager`) and the state they
//! share with their actors (`AgentView`, the server's `ServerShared`). None is
//! an actor: each starts actors on the library's runtime thread and talks to
//! them by message, or reads what they publish.

pub(crate) mod access_manager;
pub(crate) mod agent_shared;
pub(crate) mod agent_view;
pub(crate) mod control_handler;
pub(crate) mod forwards;
pub(crate) mod node_tunnels;
pub(crate) mod reload;
pub(crate) mod tunnel_agent;
pub(crate) mod tunnel_registry;
