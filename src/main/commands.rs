//! One function per command: build the runtime, start what the merged
//! options describe, wait for it to end or for SIGINT/SIGTERM
//! ([`shutdown_signal`]). stdout carries only what a command is asked for.

use std::collections::HashMap;
use std::time::Duration;

use zlayer_tunnel::{NodeTunnelManager, TunnelAgent, TunnelState, shutdown_signal};

use crate::allocator;
use crate::cli::{AccessArgs, AgentArgs, ServerArgs};
use crate::options;

/// `zlayer-tunnel server`: [`zlayer_tunnel::actors::serve`] and this node's tunnels.
pub(crate) fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let file = options::server_file(&args)?;
    let mut server = options::serve_options(&args, &file)?;
    if matches!(server.config.bind_host.as_str(), "0.0.0.0" | "::" | "[::]") {
        let host = &server.config.bind_host;
        tracing::info!(%host, "public ports listen on every interface; --bind-host 127.0.0.1 (or bind_host) keeps them on one");
    }
    server.peer = options::peer_options(&args, &server)?;
    let nodes = options::node_tunnels(&args, &server)?;
    actix_web::rt::System::new().block_on(async move {
        actix_web::rt::spawn(allocator::release_after_activity());
        let prefix = file.cluster_prefix.as_deref();
        server.cluster = crate::cluster::connect(&args.store, &file.etcd, prefix).await?;
        if let Some(nodes) = nodes {
            for (name, _, _, url) in &args.node_tunnel {
                nodes.start_outbound(name, url.clone())?;
            }
            actix_web::rt::spawn(log_node_tunnels(nodes));
        }
        zlayer_tunnel::actors::serve(server).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Logs each node tunnel's state as it changes.
async fn log_node_tunnels(nodes: NodeTunnelManager) {
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        for status in nodes.list_status() {
            let state = match &status.state {
                TunnelState::Reconnecting { last_error, .. } => {
                    format!("reconnecting ({last_error})")
                }
                TunnelState::Failed { error } => format!("failed ({error})"),
                TunnelState::Connected { .. } => "connected".to_owned(),
                other => format!("{other:?}").to_lowercase(),
            };
            if last.get(&status.name) != Some(&state) {
                tracing::info!(tunnel = %status.name, to = %status.to_node, public_port = ?status.public_port, %state, "node tunnel");
                last.insert(status.name.clone(), state);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `zlayer-tunnel agent`: runs until the server refuses it for good or a
/// signal stops it; prints each published service.
pub(crate) fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = options::agent_config(&args)?;
    if config.services.is_empty() {
        tracing::warn!(
            "no service to publish: give --tcp NAME:LOCAL_PORT:PUBLIC_PORT or --udp (or [[services]] \
             in --config); connecting anyway (POST /services on --admin-listen adds them)"
        );
    }
    actix_web::rt::System::new().block_on(async {
        actix_web::rt::spawn(allocator::release_after_activity());
        let agent = TunnelAgent::new(config).on_published(std::sync::Arc::new(print_published));
        let access = options::admin_access(&args.admin_tokens)?;
        let admin = match args.admin_listen.as_slice() {
            [] => None,
            listen => {
                let server = agent.serve_admin_guarded(listen, access)?;
                let handle = server.handle();
                actix_web::rt::spawn(server);
                Some(handle)
            }
        };
        let stopper = agent.clone();
        tokio::spawn(async move {
            if shutdown_signal().await.is_ok() {
                stopper.stop();
            }
        });
        actix_web::rt::spawn(reload_services_on_hangup(args, agent.clone()));
        let result = agent.run().await;
        if let Some(admin) = admin {
            // at once: a scraper's kept-alive connection must not hold
            // the stop for the listener's graceful second
            admin.stop(false).await;
        }
        result.map_err(|e| explained(e, None))
    })
}

/// `error` with what to do about it: a refused token names where the token
/// comes from; anything else names the service asked for, if any.
fn explained(error: zlayer_tunnel::TunnelError, service: Option<&str>) -> anyhow::Error {
    match (&error, service) {
        (zlayer_tunnel::TunnelError::Auth { .. }, _) => anyhow::Error::from(error)
            .context("the server does not accept this token (ZLAYER_TUNNEL_TOKEN or --token)"),
        (_, Some(service)) => anyhow::Error::from(error).context(format!("--service {service}")),
        (_, None) => error.into(),
    }
}

/// One line on stdout per published service: `NAME PROTOCOL PUBLIC_ADDR`.
fn print_published(service: &zlayer_tunnel::PublishedService) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} {} {}",
        service.name, service.protocol, service.public_addr
    );
    let _ = out.flush();
}

/// `zlayer-tunnel access`: prints the local address, then holds the session
/// until its TTL or a signal.
pub(crate) fn run_access(args: AccessArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::spawn(allocator::release_after_activity());
        let mut link = zlayer_tunnel::TunnelClientConfig::new(&args.server, &args.token);
        link.ca_cert.clone_from(&args.ca_cert);
        options::validate_agent(&link)?;
        let manager = zlayer_tunnel::AccessManager::new().with_server_config(link);
        let session = manager
            .start_session(args.service.clone(), args.target, args.local_port, Some(args.ttl))
            .await
            .map_err(|e| explained(e, Some(&args.service)))?;
        println!("{}", session.local_addr);
        tracing::info!(service = %args.service, local = %session.local_addr, ttl = %humantime::format_duration(args.ttl), "access open");
        tokio::select! {
            () = tokio::time::sleep(args.ttl) => tracing::info!("access expired"),
            stopped = shutdown_signal() => stopped?,
        }
        Ok(())
    })
}

/// `zlayer-tunnel token hash`: the hash a server stores, and nothing else.
pub(crate) fn print_hash(token: &str) -> anyhow::Result<()> {
    println!("{}", zlayer_tunnel::hash_token(token));
    Ok(())
}

/// `zlayer-tunnel token generate`: a new random token, then its hash.
pub(crate) fn generate_token() -> anyhow::Result<()> {
    // two v4 UUIDs: 244 random bits from the OS
    let token = format!(
        "zlt_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    println!("{token}");
    println!("{}", zlayer_tunnel::hash_token(&token));
    Ok(())
}

/// On each `SIGHUP`, re-reads the agent's config file and flags: added
/// services are published, removed ones withdrawn (their streams end),
/// changed ones published anew; the others are not touched. A file that
/// does not parse or validate changes nothing.
async fn reload_services_on_hangup(args: AgentArgs, agent: TunnelAgent) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return tracing::warn!("cannot listen for SIGHUP: services are not reloaded");
        };
        while hangups.recv().await.is_some() {
            match options::agent_config(&args) {
                Ok(config) => apply_services(&agent, config.services),
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "configuration not reloaded; nothing changed"
                    );
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (args, agent);
}

/// Makes `agent` publish `wanted`, touching only what differs.
fn apply_services(agent: &TunnelAgent, wanted: Vec<zlayer_tunnel::ServiceConfig>) {
    let now = agent.services();
    let mut removed = 0;
    for gone in now
        .iter()
        .filter(|s| !wanted.iter().any(|w| w.name == s.name))
    {
        removed += usize::from(agent.remove_service(&gone.name));
    }
    let (mut added, mut changed) = (0, 0);
    for service in wanted {
        match now.iter().find(|s| s.name == service.name) {
            Some(same) if *same == service => continue,
            Some(_) => changed += 1,
            None => added += 1,
        }
        let name = service.name.clone();
        if let Err(error) = agent.add_service(service) {
            tracing::error!(service = %name, %error, "service not published");
        }
    }
    tracing::info!(added, removed, changed, "configuration reloaded");
}
