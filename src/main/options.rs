//! What a command runs with: the config file's settings, overridden by the
//! flags, checked. The files that flags and config name (the config itself,
//! token files, TLS keys) are read here; every error names the flag, key or
//! file it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use zlayer_tunnel::actors::ServeOptions;
use zlayer_tunnel::{
    ConfigError, NodeTunnel, NodeTunnelManager, ServerFile, ServiceProtocol, TokenScope,
    TokenStore, TokenValidator, TunnelClientConfig, TunnelServerConfig,
};

use crate::cli::{AgentArgs, ServerArgs};

/// The server's config file (`--config`), or the defaults.
pub(crate) fn server_file(args: &ServerArgs) -> anyhow::Result<ServerFile> {
    Ok(match &args.config {
        Some(path) => ServerFile::from_toml_str(&read(path)?)
            .with_context(|| format!("--config {}", path.display()))?,
        None => ServerFile::default(),
    })
}

/// The server's options: `file` (`--config`'s, or the defaults) under the flags.
pub(crate) fn serve_options(args: &ServerArgs, file: &ServerFile) -> anyhow::Result<ServeOptions> {
    let config = tunnel_settings(args, file)?;
    file.check_token_ports(Some(config.data_port_range))?;
    let listen = listen_addrs(args, file)?;
    let (validator, tokens) = if args.accept_any_token || file.accept_any_token {
        tracing::warn!("accepting any token (--accept-any-token): for development only");
        let any: TokenValidator = std::sync::Arc::new(zlayer_tunnel::accept_all_tokens);
        (any, None)
    } else {
        let clustered = !args.store.etcd.is_empty() || !file.etcd.is_empty();
        let store = token_store(args, file, clustered)?;
        (store.clone().into_validator(), Some(store))
    };
    let admin_listen = admin_addrs(args, file)?;
    let admin_access = admin_access(&args.admin_tokens)?;
    let tls = server_tls(args, file)?;
    let reload = reload_config(args, file, config.data_port_range);
    Ok(ServeOptions {
        listen,
        config,
        validator,
        tokens,
        admin_listen,
        admin_access,
        reload: Some(reload),
        tls,
        cluster: None,
        peer: None,
    })
}

/// The `[tunnel]` settings of `file` under the flags, validated.
fn tunnel_settings(args: &ServerArgs, file: &ServerFile) -> anyhow::Result<TunnelServerConfig> {
    let mut config = file.tunnel.clone();
    if let Some((low, high)) = args.port_range {
        config.data_port_range = (low, high);
    }
    if let Some(host) = &args.bind_host {
        config.bind_host.clone_from(host);
    }
    config.load_balance = args.load_balance.unwrap_or(config.load_balance);
    config.heartbeat_interval = args.heartbeat_interval.unwrap_or(config.heartbeat_interval);
    config.heartbeat_timeout = args.heartbeat_timeout.unwrap_or(config.heartbeat_timeout);
    config.port_hold = args.port_hold.unwrap_or(config.port_hold);
    config.validate()?;
    Ok(config)
}

/// A server's id when `--server-id` is not given: its host name and first
/// listen address (`node-1@10.0.0.1:7000`).
fn default_server_id(options: &ServeOptions) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    match options.listen.first() {
        Some(addr) => format!("{host}@{addr}"),
        None => host,
    }
}

/// Who this server is to its peers in a cluster (`--peer-token`), if it has any.
pub(crate) fn peer_options(
    args: &ServerArgs,
    options: &ServeOptions,
) -> anyhow::Result<Option<zlayer_tunnel::actors::PeerOptions>> {
    let Some(token) = args.peer_token.clone().filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let scheme = if options.tls.is_some() { "wss" } else { "ws" };
    let advertise = match (&args.advertise, options.listen.first()) {
        (Some(url), _) => url.clone(),
        (None, Some(addr)) if addr.port() != 0 && !addr.ip().is_unspecified() => {
            format!("{scheme}://{addr}{}", options.config.control_path)
        }
        _ => bail!(
            "--peer-token needs --advertise URL (the control URL at which peers reach this server) when --listen has no fixed address and port"
        ),
    };
    let server_id = match &args.server_id {
        Some(id) => id.clone(),
        None => default_server_id(options),
    };
    Ok(Some(zlayer_tunnel::actors::PeerOptions {
        server_id,
        advertise,
        peer_token: token.into(),
        route_ttl: args.route_ttl.unwrap_or(std::time::Duration::from_secs(5)),
    }))
}

/// This node's tunnels to other nodes (`--node-tunnel`), added but not
/// started: they start inside the runtime. `None` without any.
pub(crate) fn node_tunnels(
    args: &ServerArgs,
    options: &ServeOptions,
) -> anyhow::Result<Option<NodeTunnelManager>> {
    if args.node_tunnel.is_empty() {
        return Ok(None);
    }
    let node_id = (args.node_id.clone()).unwrap_or_else(|| options.listen[0].to_string());
    let token = args
        .node_token
        .clone()
        .context("--node-tunnel needs --node-token (or ZLAYER_TUNNEL_NODE_TOKEN)")?;
    let manager = NodeTunnelManager::new(&node_id, options.config.clone());
    for (name, local, remote, url) in &args.node_tunnel {
        let tunnel = NodeTunnel::new(name, &node_id, url)
            .with_ports(*local, *remote)
            .with_token(&token);
        manager
            .add_tunnel(tunnel)
            .with_context(|| format!("--node-tunnel {name}"))?;
    }
    Ok(Some(manager))
}

/// The agent's configuration: `--config`'s file (or an empty one) under
/// the flags, validated; an error names the flag and the file's key.
pub(crate) fn agent_config(args: &AgentArgs) -> anyhow::Result<TunnelClientConfig> {
    let config = merged_agent_config(args)?;
    if config.token.expose().is_empty() {
        bail!(
            "no token: set ZLAYER_TUNNEL_TOKEN (or give --token, or `token` in the --config file)"
        );
    }
    validate_agent(&config)?;
    Ok(config)
}

/// Validates an agent's configuration, naming the flag beside the file's key.
pub(crate) fn validate_agent(config: &TunnelClientConfig) -> anyhow::Result<()> {
    if config.server_url.is_empty() {
        bail!(
            "no server: give --server ws://HOST:PORT/tunnel/v1 (or `server_url` in the --config file)"
        );
    }
    config.validate().map_err(|e| match e {
        ConfigError::Invalid { key, reason } => {
            let flag = match key.as_str() {
                "server_url" | "servers" => Some("--server"),
                "token" => Some("--token, ZLAYER_TUNNEL_TOKEN"),
                "ca_cert" => Some("--ca-cert"),
                "connections" => Some("--connections"),
                _ => None,
            };
            match flag {
                Some(flag) => anyhow::anyhow!("{flag} (`{key}` in the --config file): {reason}"),
                None => anyhow::anyhow!("{key}: {reason}"),
            }
        }
        other => other.into(),
    })
}

/// The agent's configuration, merged and not yet validated.
pub(crate) fn merged_agent_config(args: &AgentArgs) -> anyhow::Result<TunnelClientConfig> {
    let mut config = match &args.config {
        Some(path) => toml::from_str::<TunnelClientConfig>(&read(path)?)
            .with_context(|| format!("--config {}", path.display()))?,
        None => TunnelClientConfig::new("", ""),
    };
    // --server replaces the file's servers: the first is `server_url`
    if let Some((first, more)) = args.server.split_first() {
        config.server_url.clone_from(first);
        config.servers = more.to_vec();
    }
    if let Some(connections) = args.connections {
        config.connections = connections;
    }
    if let Some(token) = &args.token {
        config.token = token.clone().into();
    }
    for service in args.tcp.iter().chain(&args.udp) {
        let mut service = service.clone();
        if args.proxy_protocol.is_some() {
            service.proxy_protocol = args.proxy_protocol;
        }
        service.allow.extend(args.allow.iter().copied());
        service.deny.extend(args.deny.iter().copied());
        if args.visitor_rate.is_some() {
            service.visitor_rate = args.visitor_rate;
        }
        if args.bandwidth.is_some() && service.protocol == ServiceProtocol::Tcp {
            // a UDP service has no streams to slow
            service.bandwidth = args.bandwidth;
        }
        config = config.with_service(service);
    }
    if let Some(path) = &args.ca_cert {
        config.ca_cert = Some(path.clone());
    }
    Ok(config)
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

/// The accepted tokens: flags, hash files and the file's `[[tokens]]` with their scopes.
/// A server of a cluster (`clustered`) may have none: its tokens come from
/// the store.
fn token_store(
    args: &ServerArgs,
    file: &ServerFile,
    clustered: bool,
) -> anyhow::Result<TokenStore> {
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
            visitors: zlayer_tunnel::visitor_rules::VisitorRules {
                allow: token.visitors_allow.clone(),
                deny: token.visitors_deny.clone(),
            },
            peer: false,
        };
        store = store
            .with_hash(&token.hash, scope)
            .with_context(|| format!("tokens[{i}].hash {:?}", token.hash))?;
    }
    if store.is_empty() && !clustered {
        bail!(
            "no token configured: give --token, --token-hash or --token-file, join a cluster whose store holds them (--etcd), or --accept-any-token for development"
        );
    }
    Ok(store)
}

/// The admin listener's access: `--admin-token` (or its file) for changes,
/// `--admin-read-token` for reading.
pub(crate) fn admin_access(
    tokens: &crate::cli::AdminTokens,
) -> anyhow::Result<zlayer_tunnel::admin_access::AdminAccess> {
    let mut access = zlayer_tunnel::admin_access::AdminAccess::open();
    let from_file = match &tokens.admin_token_file {
        Some(path) => Some(
            read(path)?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    if let Some(token) = tokens.admin_token.clone().or(from_file) {
        if token.is_empty() {
            bail!(
                "--admin-token (or ZLAYER_TUNNEL_ADMIN_TOKEN, or --admin-token-file) must not be empty"
            );
        }
        access = access.with_admin_token(&token);
    }
    if let Some(token) = &tokens.admin_read_token {
        if token.is_empty() {
            bail!("--admin-read-token (or ZLAYER_TUNNEL_ADMIN_READ_TOKEN) must not be empty");
        }
        access = access.with_read_token(token);
    }
    Ok(access)
}

/// Where a server's tokens come from: any is accepted, the cluster's
/// store, or its files (and flags).
fn token_source(args: &ServerArgs, file: &ServerFile) -> (bool, bool) {
    let any = args.accept_any_token || file.accept_any_token;
    let clustered = !args.store.etcd.is_empty() || !file.etcd.is_empty();
    (any, clustered)
}

/// Re-reads the settings and tokens as at start (flags, the config file,
/// token files), for `SIGHUP` and `POST /reload`; `started` is the file
/// the server started with, `range` its public ports (kept until a
/// restart: the tokens' ports are checked against it). The tokens of a
/// server of a cluster (they live in its store) or of one that accepts any
/// token are not reloaded, and where they come from changes only with a
/// restart.
fn reload_config(
    args: &ServerArgs,
    started: &ServerFile,
    range: (u16, u16),
) -> zlayer_tunnel::actors::ConfigReload {
    let args = args.clone();
    let source = token_source(&args, started);
    std::sync::Arc::new(move || {
        let file = server_file(&args).map_err(|e| format!("{e:#}"))?;
        if token_source(&args, &file) != source {
            return Err("accept_any_token and etcd change only with a restart".to_owned());
        }
        let settings = tunnel_settings(&args, &file).map_err(|e| format!("{e:#}"))?;
        file.check_token_ports(Some(range))
            .map_err(|e| format!("{e:#}"))?;
        let tokens = match source {
            (false, false) => Some(token_store(&args, &file, false).map_err(|e| format!("{e:#}"))?),
            _ => None,
        };
        Ok(zlayer_tunnel::actors::ReloadedConfig { settings, tokens })
    })
}
