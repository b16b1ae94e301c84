//! The registry's public ports: allocated to a tunnel's service from the
//! pool (within its token's ports, if scoped), given back when the service
//! is unregistered or its tunnel ends, counted for status pages.

use super::*;

/// Allocates a public port for a tunnel's service.
#[derive(Message)]
#[rtype(result = "Result<u16, Error>")]
pub(crate) struct AllocatePort {
    pub(crate) tunnel_id: Uuid,
    /// The service's name (one service of a name per server).
    pub(crate) name: String,
    pub(crate) requested: u16,
    /// The ports the tunnel's token may use (`None`: any in the range).
    pub(crate) allowed: Option<Vec<(u16, u16)>>,
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
    type Result = Result<u16, Error>;

    fn handle(&mut self, msg: AllocatePort, _: &mut Self::Context) -> Self::Result {
        let allowed = msg.allowed.as_deref();
        Ok(self
            .tunnels
            .allocate(msg.tunnel_id, &msg.name, msg.requested, allowed)?)
    }
}

impl Handler<ReleasePort> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ReleasePort, _: &mut Self::Context) {
        self.tunnels.release(msg.tunnel_id, msg.port);
    }
}

impl Handler<CountFreePorts> for Registry {
    type Result = usize;

    fn handle(&mut self, _: CountFreePorts, _: &mut Self::Context) -> usize {
        self.tunnels.free_ports()
    }
}
