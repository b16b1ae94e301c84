//! A server's settings as they are now: a reload replaces them, and each new
//! control channel takes the ones current when it starts, so changed limits
//! apply to what comes next and nothing running is touched.

use std::sync::{Arc, PoisonError, RwLock};

use super::TunnelServerConfig;

/// The keys a reload cannot change: the listeners and tables sized at
/// start. A changed one keeps its running value and is reported.
pub const RESTART_ONLY: [&str; 7] = [
    "enabled",
    "control_path",
    "data_port_range",
    "bind_host",
    "max_unauthenticated",
    "max_unauthenticated_per_address",
    "port_hold",
];

/// A server's current settings, shared by its control channels.
#[derive(Debug, Clone)]
pub struct LiveServerConfig(Arc<RwLock<Arc<TunnelServerConfig>>>);

impl LiveServerConfig {
    /// Holds `config` now.
    #[must_use]
    pub fn new(config: TunnelServerConfig) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(config))))
    }

    /// The settings now.
    #[must_use]
    pub fn current(&self) -> Arc<TunnelServerConfig> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes `newer`, but for the [`RESTART_ONLY`] keys, which keep their
    /// running values; returns those of them that `newer` would change.
    pub fn replace(&self, newer: TunnelServerConfig) -> Vec<&'static str> {
        let mut current = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let (kept, restart_needed) = keep_restart_only(&current, newer);
        *current = Arc::new(kept);
        restart_needed
    }
}

/// `newer` with `running`'s values of the [`RESTART_ONLY`] keys, and the
/// keys among them that differ.
fn keep_restart_only(
    running: &TunnelServerConfig,
    mut newer: TunnelServerConfig,
) -> (TunnelServerConfig, Vec<&'static str>) {
    let mut differ = Vec::new();
    let mut keep = |key: &'static str, changed: bool| {
        if changed {
            differ.push(key);
        }
    };
    keep("enabled", running.enabled != newer.enabled);
    keep("control_path", running.control_path != newer.control_path);
    keep(
        "data_port_range",
        running.data_port_range != newer.data_port_range,
    );
    keep("bind_host", running.bind_host != newer.bind_host);
    keep(
        "max_unauthenticated",
        running.max_unauthenticated != newer.max_unauthenticated,
    );
    keep(
        "max_unauthenticated_per_address",
        running.max_unauthenticated_per_address != newer.max_unauthenticated_per_address,
    );
    keep("port_hold", running.port_hold != newer.port_hold);
    newer.enabled = running.enabled;
    newer.control_path.clone_from(&running.control_path);
    newer.data_port_range = running.data_port_range;
    newer.bind_host.clone_from(&running.bind_host);
    newer.max_unauthenticated = running.max_unauthenticated;
    newer.max_unauthenticated_per_address = running.max_unauthenticated_per_address;
    newer.port_hold = running.port_hold;
    (newer, differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_change_and_listeners_stay() {
        let live = LiveServerConfig::new(TunnelServerConfig::default());
        let mut newer = TunnelServerConfig::default().with_bind_host("127.0.0.9");
        newer.max_services_per_tunnel = 3;
        newer.control_path = "/elsewhere".into();
        let restart = live.replace(newer);
        assert_eq!(restart, ["control_path", "bind_host"]);
        let now = live.current();
        assert_eq!(now.max_services_per_tunnel, 3);
        assert_eq!(now.bind_host, "0.0.0.0");
        assert_eq!(now.control_path, "/tunnel/v1");
    }

    #[test]
    fn the_restart_only_list_names_what_is_kept() {
        let live = LiveServerConfig::new(TunnelServerConfig::default());
        let mut newer = TunnelServerConfig::default()
            .with_bind_host("127.0.0.9")
            .with_port_range(1, 2);
        newer.enabled = false;
        newer.control_path = "/x".into();
        newer.max_unauthenticated = 1;
        newer.max_unauthenticated_per_address = 1;
        newer.port_hold = std::time::Duration::from_secs(1);
        assert_eq!(live.replace(newer), RESTART_ONLY);
        assert_eq!(*live.current(), TunnelServerConfig::default());
    }
}
