//! The seed README's four code examples, as written, compile against this
//! crate: server, client, node-to-node and on-demand access. The functions are compiled, not run: they name example hosts.

#![allow(dead_code, unused_variables, clippy::print_stdout)]

// "Server Setup", verbatim.
mod server_setup {
    use std::sync::Arc;
    use zlayer_tunnel::{ControlHandler, TunnelRegistry, TunnelServerConfig, accept_all_tokens};

    fn setup() {
        // Create the registry with port range for service assignment
        let registry = Arc::new(TunnelRegistry::new((30000, 31000)));

        // Configure the server
        let config = TunnelServerConfig::default();

        // Create handler with token validator
        let validator = Arc::new(accept_all_tokens);
        let handler = ControlHandler::new(registry.clone(), config, validator);
    }

    // Handle incoming WebSocket connections
    async fn handle_connection(
        handler: &ControlHandler,
        stream: tokio::net::TcpStream,
        addr: std::net::SocketAddr,
    ) {
        if let Err(e) = handler.handle_connection(stream, addr).await {
            tracing::error!("Connection error: {}", e);
        }
    }
}

// "Client Setup", verbatim.
mod client_setup {
    use std::sync::Arc;
    use zlayer_tunnel::{ServiceConfig, TunnelAgent, TunnelClientConfig};

    async fn setup() -> zlayer_tunnel::Result<()> {
        // Configure the client
        let config = TunnelClientConfig::new("wss://tunnel.example.com/tunnel/v1", "my-auth-token")
            .with_service(ServiceConfig::tcp("ssh", 22).with_remote_port(2222))
            .with_service(ServiceConfig::tcp("postgres", 5432));

        // Create the agent with connection callback
        let agent =
            TunnelAgent::new(config).on_connection(Arc::new(|service_id, conn_id, client_addr| {
                println!(
                    "Connection {} to service {} from {}",
                    conn_id, service_id, client_addr
                );
                true // Accept the connection
            }));

        // Run with automatic reconnection
        agent.run().await?;
        Ok(())
    }
}

// "Node-to-Node Tunneling", verbatim.
mod node_to_node {
    use zlayer_tunnel::{NodeTunnel, NodeTunnelManager, TunnelServerConfig};

    fn setup() -> zlayer_tunnel::Result<()> {
        // Create manager for this node
        let config = TunnelServerConfig::default();
        let manager = NodeTunnelManager::new("node-us-east", config);

        // Define a tunnel from this node to another
        let tunnel = NodeTunnel::new("db-tunnel", "node-us-east", "node-eu-west")
            .with_ports(5432, 5432)
            .with_token("tun_secret_token");

        manager.add_tunnel(tunnel)?;

        // Start outbound connection
        manager.start_outbound(
            "db-tunnel",
            "wss://eu-west.example.com/tunnel/v1".to_string(),
        )?;

        // Check tunnel status
        if let Some(status) = manager.get_status("db-tunnel") {
            println!("Tunnel state: {:?}", status.state);
        }
        Ok(())
    }
}

// "On-Demand Access", verbatim.
mod on_demand_access {
    use std::time::Duration;
    use zlayer_tunnel::AccessManager;

    async fn setup() -> zlayer_tunnel::Result<()> {
        // Create access manager with default 1-hour TTL
        let manager = AccessManager::new().with_default_ttl(Duration::from_secs(3600));

        // Start a session to access a remote service locally
        let session = manager
            .start_session(
                "internal-api".to_string(),   // Endpoint name
                "10.0.0.50:8080".to_string(), // Remote address
                Some(8080),                   // Local port (None = auto-assign)
                None,                         // TTL (None = use default)
            )
            .await?;

        println!("Access via: http://127.0.0.1:{}", session.local_addr.port());

        // List active sessions
        for info in manager.list_sessions() {
            println!(
                "{}: {} -> {} ({}s remaining)",
                info.endpoint,
                info.local_addr,
                info.remote_addr,
                info.remaining.map(|d| d.as_secs()).unwrap_or(0)
            );
        }

        // Clean up expired sessions
        manager.cleanup_expired();
        Ok(())
    }
}

#[test]
fn the_seed_examples_compile() {
    // compiling this file is the test; this asserts the file is part of the suite
}
