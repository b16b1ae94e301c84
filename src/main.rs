//! The `zlayer-tunnel` command: thin glue over the library. Logs go to stderr;
//! stdout carries only what a command is asked for (a hash, a token).

#![allow(clippy::print_stdout, clippy::print_stderr)] // this is the program's voice

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[path = "main/allocator.rs"]
mod allocator;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use zlayer_tunnel::{
    ServerFile, ServiceConfig, TokenScope, TokenStore, TunnelAgent, TunnelClientConfig,
};

/// Secure reverse tunnels for ZLayer nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a tunnel server: agents connect to it, visitors to its public ports.
    Server(ServerArgs),
    /// Runs an agent: publishes local services through a tunnel server.
    Agent(AgentArgs),
    /// Opens temporary local access to a service published on a tunnel
    /// server (like `cloudflared access tcp`); prints the local address.
    Access(AccessArgs),
    /// Token utilities.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Args)]
struct AccessArgs {
    /// Control URL of the server, ws:// or wss://.
    #[arg(long)]
    server: String,
    /// The token; prefer ZLAYER_TUNNEL_TOKEN, which stays out of `ps`.
    #[arg(long, env = "ZLAYER_TUNNEL_TOKEN", hide_env_values = true)]
    token: String,
    /// The name of the service, as its agent registered it.
    #[arg(long)]
    service: String,
    /// The local port to listen on, on 127.0.0.1. Default: any free port.
    #[arg(long)]
    local_port: Option<u16>,
    /// How long the access lasts, e.g. 30m. Default 1h.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    ttl: Duration,
    /// An address for the agent to dial instead of the service's own, if its
    /// access_targets allow it.
    #[arg(long, default_value = "")]
    target: String,
}

#[derive(Args)]
struct ServerArgs {
    /// A TOML file (see examples/config/server.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control listener address (IPv4 or IPv6), e.g. 0.0.0.0:7000 (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Public ports for services, inclusive: LOW-HIGH (one port: 21011-21011). Default 30000-31000.
    #[arg(long, value_parser = parse_range)]
    port_range: Option<(u16, u16)>,
    /// Host the public listeners bind. Default 0.0.0.0.
    #[arg(long)]
    bind_host: Option<String>,
    /// An accepted token (repeatable); also ZLAYER_TUNNEL_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_TOKEN", hide_env_values = true)]
    token: Vec<String>,
    /// An accepted token's SHA-256, lowercase hex (repeatable).
    #[arg(long)]
    token_hash: Vec<String>,
    /// A file of accepted token hashes, one per line (# comments).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Accept any non-empty token (development only).
    #[arg(long)]
    accept_any_token: bool,
    /// Serve /healthz, /status and /metrics on this address (keep it private).
    #[arg(long)]
    admin_listen: Vec<SocketAddr>,
    /// How often to send heartbeats, e.g. 30s. Default 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Drop an agent silent this long, e.g. 40s. Default 40s.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// This node's id, for its node tunnels. Default: the listen address.
    #[arg(long)]
    node_id: Option<String>,
    /// A node tunnel from this node: NAME:LOCAL_PORT:REMOTE_PORT@URL publishes
    /// this node's LOCAL_PORT on the tunnel server at URL (repeatable).
    #[arg(long, value_parser = parse_node_tunnel)]
    node_tunnel: Vec<(String, u16, u16, String)>,
    /// The token for the other nodes' servers; also ZLAYER_TUNNEL_NODE_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_NODE_TOKEN", hide_env_values = true)]
    node_token: Option<String>,
}

#[derive(Args)]
struct AgentArgs {
    /// A TOML file (see examples/config/agent.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control URL of the server, ws:// or wss://.
    #[arg(long)]
    server: Option<String>,
    /// The token; prefer ZLAYER_TUNNEL_TOKEN, which stays out of `ps`.
    #[arg(long, env = "ZLAYER_TUNNEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A TCP service: NAME:LOCAL_PORT:REMOTE_PORT or NAME:HOST:PORT:REMOTE_PORT (remote 0 = any).
    #[arg(long, value_parser = parse_service)]
    tcp: Vec<ServiceConfig>,
    /// A UDP service: NAME:LOCAL_PORT:REMOTE_PORT or NAME:HOST:PORT:REMOTE_PORT (remote 0 = any).
    #[arg(long, value_parser = parse_udp_service)]
    udp: Vec<ServiceConfig>,
    /// For wss://: trust the certificates of this PEM file (a private CA, or
    /// the server's own self-signed certificate) instead of the system roots.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Serve /healthz, /status and /metrics about this agent on this address.
    #[arg(long)]
    admin_listen: Vec<SocketAddr>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Prints the lowercase hex SHA-256 of TOKEN (what a server stores), and nothing else.
    Hash {
        /// The token.
        token: String,
    },
    /// Prints a new random token, then its hash.
    Generate,
}

fn main() -> ExitCode {
    allocator::settle();
    let cli = Cli::parse();
    init_logs();
    let result = match cli.command {
        Command::Server(args) => run_server(args),
        Command::Agent(args) => run_agent(args),
        Command::Access(args) => run_access(args),
        Command::Token(TokenCommand::Hash { token }) => print_hash(&token),
        Command::Token(TokenCommand::Generate) => generate_token(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (`info`, `zlayer_tunnel=debug,warn`:
/// a default level and per-target levels), `info` without it. `Targets`, not
/// `EnvFilter`: no regex engine compiled at startup and carried in every process.
fn init_logs() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let wanted = std::env::var("RUST_LOG").ok();
    let parsed = wanted.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(filter)) => filter.clone(),
        _ => Targets::new().with_default(tracing::Level::INFO),
    };
    let stderr = std::io::stderr;
    let ansi = std::io::IsTerminal::is_terminal(&stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(stderr)
        .with_ansi(ansi);
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
    if let (Some(wanted), Some(Err(e))) = (wanted, parsed) {
        tracing::warn!(RUST_LOG = %wanted, error = %e, "RUST_LOG not understood; logging at info");
    }
}

fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ServerFile::from_toml_str(&read(path)?)
            .with_context(|| format!("--config {}", path.display()))?,
        None => ServerFile::default(),
    };
    let mut config = file.tunnel.clone();
    if let Some((low, high)) = args.port_range {
        config.data_port_range = (low, high);
    }
    if let Some(host) = &args.bind_host {
        config.bind_host.clone_from(host);
    }
    config.heartbeat_interval = args.heartbeat_interval.unwrap_or(config.heartbeat_interval);
    config.heartbeat_timeout = args.heartbeat_timeout.unwrap_or(config.heartbeat_timeout);
    config.validate()?;
    file.check_token_ports(Some(config.data_port_range))?;
    let listen = listen_addrs(&args, &file)?;
    let (validator, tokens) = if args.accept_any_token || file.accept_any_token {
        tracing::warn!("accepting any token (--accept-any-token): for development only");
        let any: zlayer_tunnel::TokenValidator =
            std::sync::Arc::new(zlayer_tunnel::accept_all_tokens);
        (any, None)
    } else {
        let store = token_store(&args, &file)?;
        (store.clone().into_validator(), Some(store))
    };
    let admin_listen = admin_addrs(&args, &file)?;
    let tls = server_tls(&args, &file)?;
    let options = zlayer_tunnel::actors::ServeOptions {
        listen,
        config,
        validator,
        tokens,
        admin_listen,
        tls,
    };
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| options.listen[0].to_string());
    let nodes = node_tunnels(&node_id, &args, &options.config)?;
    actix_web::rt::System::new().block_on(async move {
        actix_web::rt::spawn(allocator::release_after_activity());
        if let Some(nodes) = nodes {
            for (name, _, _, url) in &args.node_tunnel {
                nodes.start_outbound(name, url.clone())?;
            }
            actix_web::rt::spawn(log_node_tunnels(nodes));
        }
        zlayer_tunnel::actors::serve(options).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// This node's tunnels to other nodes, added (started inside the runtime).
fn node_tunnels(
    node_id: &str,
    args: &ServerArgs,
    config: &zlayer_tunnel::TunnelServerConfig,
) -> anyhow::Result<Option<zlayer_tunnel::NodeTunnelManager>> {
    if args.node_tunnel.is_empty() {
        return Ok(None);
    }
    let token = args
        .node_token
        .clone()
        .context("--node-tunnel needs --node-token (or ZLAYER_TUNNEL_NODE_TOKEN)")?;
    let manager = zlayer_tunnel::NodeTunnelManager::new(node_id, config.clone());
    for (name, local, remote, url) in &args.node_tunnel {
        let tunnel = zlayer_tunnel::NodeTunnel::new(name, node_id, url)
            .with_ports(*local, *remote)
            .with_token(&token);
        manager
            .add_tunnel(tunnel)
            .with_context(|| format!("--node-tunnel {name}"))?;
    }
    Ok(Some(manager))
}

/// Logs each node tunnel's state as it changes.
async fn log_node_tunnels(nodes: zlayer_tunnel::NodeTunnelManager) {
    let mut last: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    loop {
        for status in nodes.list_status() {
            let state = match &status.state {
                zlayer_tunnel::TunnelState::Reconnecting { last_error, .. } => {
                    format!("reconnecting ({last_error})")
                }
                zlayer_tunnel::TunnelState::Failed { error } => format!("failed ({error})"),
                zlayer_tunnel::TunnelState::Connected { .. } => "connected".to_owned(),
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

fn parse_node_tunnel(text: &str) -> Result<(String, u16, u16, String), String> {
    let bad = || format!("{text:?}: expected NAME:LOCAL_PORT:REMOTE_PORT@URL");
    let (spec, url) = text.split_once('@').ok_or_else(bad)?;
    let mut parts = spec.split(':');
    let (Some(name), Some(local), Some(remote), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
        return Err(format!("{text:?}: the URL must start with ws:// or wss://"));
    }
    Ok((name.to_owned(), port(local)?, port(remote)?, url.to_owned()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn listen_addrs(args: &ServerArgs, file: &ServerFile) -> anyhow::Result<Vec<SocketAddr>> {
    if !args.listen.is_empty() {
        return Ok(args.listen.clone());
    }
    let parsed: Result<Vec<SocketAddr>, _> = file.listen.iter().map(|a| a.parse()).collect();
    let addrs = parsed.context("listen: not an address like 0.0.0.0:7000")?;
    if addrs.is_empty() {
        bail!("no listen address: give --listen or `listen` in the config file");
    }
    Ok(addrs)
}

fn admin_addrs(args: &ServerArgs, file: &ServerFile) -> anyhow::Result<Vec<SocketAddr>> {
    if !args.admin_listen.is_empty() {
        return Ok(args.admin_listen.clone());
    }
    let parsed: Result<Vec<SocketAddr>, _> = file.admin_listen.iter().map(|a| a.parse()).collect();
    parsed.context("admin_listen: not an address like 127.0.0.1:7001")
}

/// The server's TLS configuration from --tls-cert/--tls-key or the file's keys.
fn server_tls(
    args: &ServerArgs,
    file: &ServerFile,
) -> anyhow::Result<Option<rustls::ServerConfig>> {
    let cert = (args.tls_cert.clone()).or_else(|| file.tls_cert.as_ref().map(PathBuf::from));
    let key = (args.tls_key.clone()).or_else(|| file.tls_key.as_ref().map(PathBuf::from));
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => bail!("tls_cert is set but tls_key is not: give both"),
        (None, Some(_)) => bail!("tls_key is set but tls_cert is not: give both"),
    };
    let cert_pem = std::fs::read(&cert)
        .with_context(|| format!("--tls-cert: cannot read {}", cert.display()))?;
    let key_pem =
        std::fs::read(&key).with_context(|| format!("--tls-key: cannot read {}", key.display()))?;
    let config = zlayer_tunnel::tls::server_config(&cert_pem, &key_pem)
        .with_context(|| format!("--tls-cert {} --tls-key {}", cert.display(), key.display()))?;
    Ok(Some(config))
}

fn token_store(args: &ServerArgs, file: &ServerFile) -> anyhow::Result<TokenStore> {
    let mut store = TokenStore::new();
    for token in &args.token {
        store = store.with_token(token);
    }
    let mut hashes = args.token_hash.clone();
    hashes.extend(file.token_hashes.iter().cloned());
    let files = args
        .token_file
        .iter()
        .cloned()
        .chain(file.token_file.iter().map(PathBuf::from));
    for path in files {
        let text = read(&path).with_context(|| format!("--token-file {}", path.display()))?;
        let lines = text.lines().map(str::trim);
        hashes.extend(
            lines
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    for hash in &hashes {
        store = store
            .with_hash(hash, TokenScope::default())
            .with_context(|| format!("token hash {hash:?}"))?;
    }
    for (i, token) in file.tokens.iter().enumerate() {
        let scope = TokenScope {
            register: token.register.clone(),
            access: token.access.clone(),
            ports: token.ports.clone(),
        };
        store = store
            .with_hash(&token.hash, scope)
            .with_context(|| format!("tokens[{i}].hash {:?}", token.hash))?;
    }
    if store.is_empty() {
        bail!(
            "no token configured: give --token, --token-hash or --token-file (or --accept-any-token for development)"
        );
    }
    Ok(store)
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => toml::from_str::<TunnelClientConfig>(&read(path)?)
            .with_context(|| format!("--config {}", path.display()))?,
        None => TunnelClientConfig::new("", ""),
    };
    if let Some(server) = args.server {
        config.server_url = server;
    }
    if let Some(token) = args.token {
        config.token = token.into();
    }
    for service in args.tcp.into_iter().chain(args.udp) {
        config = config.with_service(service);
    }
    if let Some(path) = args.ca_cert {
        config.ca_cert = Some(path);
    }
    config.validate()?;
    actix_web::rt::System::new().block_on(async {
        actix_web::rt::spawn(allocator::release_after_activity());
        let agent = TunnelAgent::new(config).on_published(std::sync::Arc::new(print_published));
        let admin = match args.admin_listen.as_slice() {
            [] => None,
            listen => {
                let server = agent.serve_admin(listen)?;
                let handle = server.handle();
                actix_web::rt::spawn(server);
                Some(handle)
            }
        };
        let stopper = agent.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (mut int, mut term) = (
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            );
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            stopper.stop();
            Ok::<_, std::io::Error>(())
        });
        let result = agent.run().await;
        if let Some(admin) = admin {
            admin.stop(true).await;
        }
        result.map_err(anyhow::Error::from)
    })
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

fn run_access(args: AccessArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::spawn(allocator::release_after_activity());
        let manager = zlayer_tunnel::AccessManager::new().with_server(&args.server, &args.token);
        let session = manager
            .start_session(args.service.clone(), args.target, args.local_port, Some(args.ttl))
            .await
            .with_context(|| format!("--service {}", args.service))?;
        println!("{}", session.local_addr);
        tracing::info!(service = %args.service, local = %session.local_addr, ttl = %humantime::format_duration(args.ttl), "access open");
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term) = (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        );
        tokio::select! {
            () = tokio::time::sleep(args.ttl) => tracing::info!("access expired"),
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}

fn print_hash(token: &str) -> anyhow::Result<()> {
    println!("{}", zlayer_tunnel::hash_token(token));
    Ok(())
}

fn generate_token() -> anyhow::Result<()> {
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

fn parse_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected LOW-HIGH"))?;
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{text:?}: {p:?} is not a port"))
    };
    let (low, high) = (port(low)?, port(high)?);
    if low == 0 || low > high {
        return Err(format!("{text:?}: need 1 <= LOW <= HIGH"));
    }
    Ok((low, high))
}

fn parse_udp_service(text: &str) -> Result<ServiceConfig, String> {
    let tcp = parse_service(text)?;
    Ok(ServiceConfig {
        protocol: zlayer_tunnel::ServiceProtocol::Udp,
        ..tcp
    })
}

fn parse_service(text: &str) -> Result<ServiceConfig, String> {
    let bad =
        || format!("{text:?}: expected NAME:LOCAL_PORT:REMOTE_PORT or NAME:HOST:PORT:REMOTE_PORT");
    let (name, rest) = text.split_once(':').ok_or_else(bad)?;
    let (local, remote) = rest.rsplit_once(':').ok_or_else(bad)?;
    let remote: u16 = remote.parse().map_err(|_| bad())?;
    let (host, port) = match local.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port),
        None => ("127.0.0.1", local),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let service = ServiceConfig::tcp(name, port)
        .with_remote_port(remote)
        .with_local_host(host);
    service.validate().map_err(|e| format!("{text:?}: {e}"))?;
    Ok(service)
}
