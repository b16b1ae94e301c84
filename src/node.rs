//! Node-to-node tunnels (the seed's `NodeTunnel`): a port of this node
//! published on another node's tunnel server. Plain data; the runtime's
//! `NodeTunnelManager` runs them.

use serde::Serialize;

use crate::accounting::Snapshot;
use crate::auth::Secret;
use crate::config::{ConfigError, ServiceConfig};
use crate::status::TunnelState;

/// A tunnel from `from_node` (this node) to `to_node`: this node's
/// `local_port` is published on `to_node`'s tunnel server as `remote_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTunnel {
    /// The tunnel's name; also the name of the service it registers.
    pub name: String,
    /// The node the tunnel starts from (where the local port is).
    pub from_node: String,
    /// The node whose tunnel server publishes the port.
    pub to_node: String,
    /// The port on this node. Default 0 (set it with `with_ports`).
    pub local_port: u16,
    /// The port on the other node (0: any free port of its range).
    pub remote_port: u16,
    /// The host the local port is on. Default `127.0.0.1`.
    pub local_host: String,
    /// The token for the other node's server; never logged.
    pub token: Secret,
}

impl NodeTunnel {
    /// A tunnel named `name` from `from_node` to `to_node`.
    #[must_use]
    pub fn new(
        name: impl Into<String>,
        from_node: impl Into<String>,
        to_node: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            from_node: from_node.into(),
            to_node: to_node.into(),
            local_port: 0,
            remote_port: 0,
            local_host: "127.0.0.1".to_owned(),
            token: Secret::default(),
        }
    }

    /// Sets the local port and the port on the other node.
    #[must_use]
    pub fn with_ports(mut self, local: u16, remote: u16) -> Self {
        self.local_port = local;
        self.remote_port = remote;
        self
    }

    /// Sets the token for the other node's server.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Secret::new(token.into());
        self
    }

    /// Sets the host of the local port.
    #[must_use]
    pub fn with_local_host(mut self, host: impl Into<String>) -> Self {
        self.local_host = host.into();
        self
    }

    /// The service this tunnel registers on the other node.
    pub fn service(&self) -> ServiceConfig {
        ServiceConfig::tcp(&self.name, self.local_port)
            .with_remote_port(self.remote_port)
            .with_local_host(&self.local_host)
    }

    /// Checks the tunnel for a manager on node `node_id`.
    pub fn validate_for(&self, node_id: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("node_tunnel.{key}"),
            reason,
        };
        if self.from_node != node_id {
            return Err(invalid(
                "from_node",
                format!("{:?} is not this node ({node_id:?})", self.from_node),
            ));
        }
        if self.token.is_empty() {
            return Err(invalid(
                "token",
                "must not be empty (with_token)".to_owned(),
            ));
        }
        self.service().validate().map_err(|e| match e {
            ConfigError::Invalid { key, reason } => invalid(&key, reason),
            other => other,
        })
    }
}

/// What a node tunnel reports: its state (the truth: `Connected` only once
/// authenticated and registered) and its traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeTunnelStatus {
    /// The tunnel's name.
    pub name: String,
    /// This node.
    pub from_node: String,
    /// The other node.
    pub to_node: String,
    /// Where the tunnel stands; `Stopped` before `start_outbound` and after removal.
    pub state: TunnelState,
    /// The port published on the other node, once registered.
    pub public_port: Option<u16>,
    /// Bytes each way and connections, live.
    pub stats: Snapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_builder_and_its_checks() {
        let tunnel = NodeTunnel::new("db-tunnel", "node-us-east", "node-eu-west")
            .with_ports(5432, 6432)
            .with_token("tun_secret_token");
        assert_eq!((tunnel.local_port, tunnel.remote_port), (5432, 6432));
        assert!(tunnel.validate_for("node-us-east").is_ok());
        let other = tunnel.validate_for("node-eu-west").unwrap_err();
        assert!(other.to_string().contains("from_node"), "{other}");
        let no_token = NodeTunnel::new("t", "a", "b").with_ports(1, 2);
        assert!(
            no_token
                .validate_for("a")
                .unwrap_err()
                .to_string()
                .contains("token")
        );
        assert!(!format!("{tunnel:?}").contains("tun_secret_token"));
    }
}
