//! The registry's public ports: allocated to a tunnel's service from the
//! pool (within its token's ports, if scoped), given back when the service
//! is unregistered or its tunnel ends, counted for status pages.

use super::*;
use crate::protocol::ServiceProtocol;
use crate::tunnels::{Claim, Granted};

/// Allocates a public port for a tunnel's service: its own, or, for a
/// replica, the service's port and its listener to join.
#[derive(Message)]
#[rtype(result = "Result<PortGrant, Error>")]
pub(crate) struct AllocatePort {
    pub(crate) tunnel_id: Uuid,
    /// The service's name (replicas share it).
    pub(crate) name: String,
    pub(crate) protocol: ServiceProtocol,
    pub(crate) requested: u16,
    /// The ports the tunnel's token may use (`None`: any in the range).
    pub(crate) allowed: Option<Vec<(u16, u16)>>,
    /// The token's scope names the service (it may join another token's).
    pub(crate) named_in_scope: bool,
}

/// A port the registry gave a registration.
pub(crate) enum PortGrant {
    /// The service's own: bind it.
    New(u16),
    /// The port of a live service, whose listener the replica joins (`None`
    /// while the service's first registration is still binding it, or once
    /// its last replica closed it).
    Joined(u16, Option<PublicListener>),
}

/// Returns a port (service unregistered).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ReleasePort {
    pub(crate) tunnel_id: Uuid,
    pub(crate) port: u16,
}

/// Counts the free ports.
#[derive(Message)]
#[rtype(result = "usize")]
pub(crate) struct CountFreePorts;

impl Handler<AllocatePort> for Registry {
    type Result = Result<PortGrant, Error>;

    fn handle(&mut self, msg: AllocatePort, _: &mut Self::Context) -> Self::Result {
        let claim = Claim {
            name: &msg.name,
            protocol: msg.protocol,
            requested: msg.requested,
            allowed: msg.allowed.as_deref(),
            named_in_scope: msg.named_in_scope,
        };
        match self.tunnels.allocate(msg.tunnel_id, claim)? {
            Granted::New(port) => Ok(PortGrant::New(port)),
            Granted::Joined(port) => Ok(PortGrant::Joined(port, self.listener_of(port))),
        }
    }
}

impl Handler<ReleasePort> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ReleasePort, _: &mut Self::Context) {
        if let Some(io) = self.tunnels.get_mut(msg.tunnel_id) {
            io.listeners.remove(&msg.port);
        }
        self.tunnels.release(msg.tunnel_id, msg.port);
    }
}

impl Handler<CountFreePorts> for Registry {
    type Result = usize;

    fn handle(&mut self, _: CountFreePorts, _: &mut Self::Context) -> usize {
        self.tunnels.free_ports()
    }
}
