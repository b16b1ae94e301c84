//! `Forwards`: the public ports a server of a cluster forwards to its peers
//! (services with no registration here), each port and protocol with the
//! token that closes it. Shared by `RouteSync`, which opens and closes them, and the control
//! channels, which take a port over when a service registers here. Not an
//! actor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::protocol::ServiceProtocol;

/// The forwarded ports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Forwards {
    ports: Arc<Mutex<HashMap<(u16, ServiceProtocol), CancellationToken>>>,
}

impl Forwards {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(u16, ServiceProtocol), CancellationToken>> {
        self.ports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Port `port` is forwarded until `close` fires.
    pub(crate) fn insert(&self, port: (u16, ServiceProtocol), close: CancellationToken) {
        if let Some(old) = self.lock().insert(port, close) {
            old.cancel();
        }
    }

    /// True while `port` is forwarded.
    pub(crate) fn contains(&self, port: (u16, ServiceProtocol)) -> bool {
        self.lock().contains_key(&port)
    }

    /// Closes every forward whose port `keep` refuses.
    pub(crate) fn retain(&self, keep: impl Fn(&(u16, ServiceProtocol)) -> bool) {
        self.lock().retain(|port, close| {
            let kept = keep(port);
            if !kept {
                close.cancel();
                tracing::info!(port = port.0, protocol = %port.1, "forward closed");
            }
            kept
        });
    }

    /// Closes the forward of `port`, if any (a service registers here).
    pub(crate) fn release(&self, port: (u16, ServiceProtocol)) {
        if let Some(close) = self.lock().remove(&port) {
            close.cancel();
        }
    }
}
