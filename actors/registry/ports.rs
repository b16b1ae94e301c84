//! The registry's public ports: allocated to a tunnel's service from the
//! pool (within its token's ports, if scoped), given back when the service
//! is unregistered or its tunnel ends, counted for status pages.

use super::*;

/// Allocates a public port for a tunnel's service.
#[derive(Message)]
#[rtype(result = "Result<u16, Error>")]
pub(crate) struct AllocatePort {
    pub(crate) tunnel_id: Uuid,
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
        let entry = self
            .tunnels
            .get_mut(&msg.tunnel_id)
            .ok_or(Error::UnknownTunnel)?;
        let pool = self.ports.as_mut().map_err(|e| Error::Port(e.clone()))?;
        let port = match &msg.allowed {
            Some(allowed) => pool.allocate_within(msg.requested, allowed)?,
            None => pool.allocate(msg.requested)?,
        };
        entry.info.ports.push(port);
        Ok(port)
    }
}

impl Handler<ReleasePort> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ReleasePort, _: &mut Self::Context) {
        if let Some(entry) = self.tunnels.get_mut(&msg.tunnel_id) {
            entry.info.ports.retain(|p| *p != msg.port);
            entry.services.retain(|(s, _, _)| s.port != msg.port);
            if let Ok(pool) = self.ports.as_mut() {
                pool.release(msg.port);
            }
        }
    }
}

impl Handler<CountFreePorts> for Registry {
    type Result = usize;

    fn handle(&mut self, _: CountFreePorts, _: &mut Self::Context) -> usize {
        self.ports.as_ref().map_or(0, PortPool::available)
    }
}
