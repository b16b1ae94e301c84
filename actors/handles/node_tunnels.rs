//! `NodeTunnelManager` (the seed's type): a node's outbound tunnels to other
//! nodes' tunnel servers. Not an actor: a handle. Each started tunnel is an
//! agent of its own (`TunnelAgent`: an `AgentConnection` under an actix
//! `Supervisor`, reconnecting on backoff) that registers one service, the
//! tunnel's local port, on the other node. Statuses come from the agents, so
//! they tell the truth: `Connected` only once authenticated and registered.

use std::collections::HashMap;
use std::sync::Mutex;

use super::tunnel_agent::TunnelAgent;
use crate::actors::io::{admin, runtime};
use crate::config::{TunnelClientConfig, TunnelServerConfig};
use crate::node::{NodeTunnel, NodeTunnelStatus};
use crate::status::TunnelState;
use crate::{Result, TunnelError};

struct Entry {
    tunnel: NodeTunnel,
    agent: Option<TunnelAgent>,
}

/// The node-to-node tunnels of one node.
pub struct NodeTunnelManager {
    node_id: String,
    config: TunnelServerConfig,
    tunnels: Mutex<HashMap<String, Entry>>,
}

impl NodeTunnelManager {
    /// A manager for node `node_id`, whose own tunnel server (if it runs one)
    /// uses `config`.
    #[must_use]
    pub fn new(node_id: impl Into<String>, config: TunnelServerConfig) -> Self {
        Self {
            node_id: node_id.into(),
            config,
            tunnels: Mutex::new(HashMap::new()),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The configuration of this node's own tunnel server.
    pub fn server_config(&self) -> &TunnelServerConfig {
        &self.config
    }

    /// Adds a tunnel from this node; refused if invalid or its name is taken.
    pub fn add_tunnel(&self, tunnel: NodeTunnel) -> Result<()> {
        tunnel
            .validate_for(&self.node_id)
            .map_err(|e| TunnelError::config(e.to_string()))?;
        let mut tunnels = self.lock()?;
        if tunnels.get(&tunnel.name).is_some_and(|e| e.agent.is_some()) {
            return Err(TunnelError::config(format!(
                "node tunnel {:?} already exists",
                tunnel.name
            )));
        }
        let name = tunnel.name.clone();
        tunnels.insert(
            name,
            Entry {
                tunnel,
                agent: None,
            },
        );
        Ok(())
    }

    /// Connects tunnel `name` to the tunnel server at `url` (`ws://` or
    /// `wss://`) and keeps it connected, reconnecting on backoff, until removed.
    pub fn start_outbound(&self, name: &str, url: String) -> Result<()> {
        self.start_outbound_to(name, vec![url])
    }

    /// [`start_outbound`](Self::start_outbound) to each of several servers
    /// of the other node (high availability: a link to each, the same
    /// public port on all).
    pub fn start_outbound_to(&self, name: &str, urls: Vec<String>) -> Result<()> {
        let Some((url, more)) = urls.split_first() else {
            return Err(TunnelError::config(format!(
                "node tunnel {name:?}: no server URL given"
            )));
        };
        let mut tunnels = self.lock()?;
        let entry = tunnels
            .get_mut(name)
            .ok_or_else(|| TunnelError::config(format!("no node tunnel named {name:?}")))?;
        if entry.agent.is_some() {
            return Err(TunnelError::config(format!(
                "node tunnel {name:?} is already started"
            )));
        }
        let config = TunnelClientConfig::new(url.as_str(), entry.tunnel.token.expose())
            .with_servers(more.iter().cloned())
            .with_service(entry.tunnel.service());
        config
            .validate()
            .map_err(|e| TunnelError::config(format!("node tunnel {name:?}: {e}")))?;
        let agent = TunnelAgent::new(config);
        let runner = agent.clone();
        let name = name.to_owned();
        let spawned = runtime::arbiter().spawn(async move {
            if let Err(error) = runner.run().await {
                tracing::error!(tunnel = %name, %error, "node tunnel failed");
            }
        });
        if !spawned {
            return Err(TunnelError::Shutdown);
        }
        entry.agent = Some(agent);
        Ok(())
    }

    /// Stops and removes tunnel `name`; its last status stays readable as `Stopped`.
    pub fn remove_tunnel(&self, name: &str) -> Result<()> {
        let mut tunnels = self.lock()?;
        let entry = tunnels
            .get_mut(name)
            .ok_or_else(|| TunnelError::config(format!("no node tunnel named {name:?}")))?;
        if let Some(agent) = &entry.agent {
            agent.stop();
        }
        Ok(())
    }

    /// The status of tunnel `name`.
    pub fn get_status(&self, name: &str) -> Option<NodeTunnelStatus> {
        self.lock().ok()?.get(name).map(status)
    }

    /// The status of every tunnel, by name.
    pub fn list_status(&self) -> Vec<NodeTunnelStatus> {
        let Ok(tunnels) = self.lock() else {
            return Vec::new();
        };
        let mut all: Vec<_> = tunnels.values().map(status).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Serves `/healthz`, `/status` and `/metrics` about these on `listen`;
    /// must run inside an actix `System`. Runs until the returned server is stopped.
    pub fn serve_admin(
        self: &std::sync::Arc<Self>,
        listen: &[std::net::SocketAddr],
    ) -> std::io::Result<actix_web::dev::Server> {
        admin::start(listen, self.clone())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Entry>>> {
        self.tunnels.lock().map_err(|_| TunnelError::Shutdown)
    }
}

fn status(entry: &Entry) -> NodeTunnelStatus {
    let t = &entry.tunnel;
    let agent = entry.agent.as_ref().map(TunnelAgent::status);
    NodeTunnelStatus {
        name: t.name.clone(),
        from_node: t.from_node.clone(),
        to_node: t.to_node.clone(),
        state: agent
            .as_ref()
            .map_or(TunnelState::Stopped, |a| a.state.clone()),
        public_port: agent
            .as_ref()
            .and_then(|a| a.services.first().map(|s| s.port)),
        stats: entry
            .agent
            .as_ref()
            .and_then(|a| a.service_stats(&t.name))
            .unwrap_or_default(),
    }
}

impl std::fmt::Debug for NodeTunnelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTunnelManager")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}
