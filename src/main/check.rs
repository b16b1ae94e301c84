//! `zlayer-tunnel check-config FILE`: reads a server's or an agent's file
//! the way `server --config` or `agent --config` would (with this
//! environment's `ZLAYER_TUNNEL_*` variables), validates it, and says what
//! it would do, starting nothing: no socket is bound, no server dialed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use clap::Parser;
use zlayer_tunnel::actors::ServeOptions;
use zlayer_tunnel::{ServiceConfig, TunnelClientConfig};

use crate::cli::{Cli, Command};
use crate::options;

/// Which program a file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FileKind {
    /// `zlayer-tunnel server --config FILE`.
    Server,
    /// `zlayer-tunnel agent --config FILE`.
    Agent,
}

/// Checks `path` (as `kind`, or as what its keys say it is) and prints
/// what it would do.
pub(crate) fn check_config(path: &Path, kind: Option<FileKind>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kind = kind.unwrap_or_else(|| guess(&text));
    let file = path.display().to_string();
    let summary = match kind {
        FileKind::Server => {
            let Command::Server(args) = parse(&["server", "--config", &file])? else {
                unreachable!("parsed as the server command")
            };
            let server_file = options::server_file(&args)?;
            describe_server(&options::serve_options(&args, &server_file)?)
        }
        FileKind::Agent => {
            let Command::Agent(args) = parse(&["agent", "--config", &file])? else {
                unreachable!("parsed as the agent command")
            };
            let mut config = options::merged_agent_config(&args)?;
            let tokenless = config.token.expose().is_empty();
            if tokenless {
                config.token = "a token from the environment".to_owned().into();
            }
            options::validate_agent(&config)?;
            let mut summary = describe_agent(&config);
            if tokenless {
                summary.push_str("  token: none here (give ZLAYER_TUNNEL_TOKEN or --token)\n");
            }
            summary
        }
    };
    let kind = match kind {
        FileKind::Server => "server",
        FileKind::Agent => "agent",
    };
    print!("{file}: a valid {kind} file; it would run:\n{summary}");
    Ok(())
}

/// The command line `args` would be.
fn parse(args: &[&str]) -> anyhow::Result<Command> {
    let cli = Cli::try_parse_from(std::iter::once("zlayer-tunnel").chain(args.iter().copied()))?;
    Ok(cli.command)
}

/// An agent's file names its server or its services; a server's does not.
fn guess(text: &str) -> FileKind {
    let table = text.parse::<toml::Table>().unwrap_or_default();
    let agent = ["server_url", "servers", "services", "token"];
    match agent.iter().any(|key| table.contains_key(*key)) {
        true => FileKind::Agent,
        false => FileKind::Server,
    }
}

fn describe_server(options: &ServeOptions) -> String {
    let c = &options.config;
    let scheme = if options.tls.is_some() { "wss" } else { "ws" };
    let mut out = String::new();
    let listen: Vec<String> = options.listen.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "  control channel: {scheme}://{}{}",
        listen.join(", "),
        c.control_path
    );
    let (low, high) = c.data_port_range;
    let _ = writeln!(out, "  public ports: {low}-{high} on {}", c.bind_host);
    if c.bind_host == "0.0.0.0" || c.bind_host == "::" {
        let _ = writeln!(
            out,
            "    (every interface: set bind_host or --bind-host to keep them private)"
        );
    }
    let tokens = match &options.tokens {
        Some(store) => format!("{} accepted", store.len()),
        None => "ANY token accepted (accept_any_token: for development only)".to_owned(),
    };
    let _ = writeln!(out, "  tokens: {tokens}");
    let admin = match options.admin_listen.as_slice() {
        [] => "none".to_owned(),
        addrs => {
            let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            addrs.join(", ")
        }
    };
    let _ = writeln!(out, "  admin endpoints: {admin}");
    let _ = writeln!(
        out,
        "  limits: {} tunnels, {} services each, {} connections a service, {} UDP flows a service",
        c.max_tunnels,
        c.max_services_per_tunnel,
        c.max_connections_per_service,
        c.max_flows_per_service
    );
    let _ = writeln!(
        out,
        "  heartbeats: every {}, dropped after {}",
        humantime::format_duration(c.heartbeat_interval),
        humantime::format_duration(c.heartbeat_timeout)
    );
    out
}

fn describe_agent(config: &TunnelClientConfig) -> String {
    let mut out = String::new();
    let servers: Vec<&str> = std::iter::once(config.server_url.as_str())
        .chain(config.servers.iter().map(String::as_str))
        .collect();
    let _ = writeln!(out, "  servers: {}", servers.join(", "));
    if config.services.is_empty() {
        let _ = writeln!(
            out,
            "  services: none (it would connect and publish nothing: add [[services]])"
        );
    }
    for service in &config.services {
        let _ = writeln!(out, "  {}", describe_service(service));
    }
    out
}

fn describe_service(s: &ServiceConfig) -> String {
    let port = match s.remote_port {
        0 => "any public port".to_owned(),
        port => format!("public port {port}"),
    };
    let mut line = format!(
        "service {} ({}): {} on {port}",
        s.name,
        s.protocol,
        s.local_addr()
    );
    if let Some(version) = s.proxy_protocol {
        let _ = write!(line, ", PROXY protocol {version}");
    }
    if !s.allow.is_empty() || !s.deny.is_empty() {
        let _ = write!(
            line,
            ", visitors: {} allowed, {} denied blocks",
            s.allow.len(),
            s.deny.len()
        );
    }
    if let Some(rate) = s.visitor_rate {
        let _ = write!(line, ", {rate} new connections/s per visitor");
    }
    if let Some(bytes) = s.bandwidth {
        let _ = write!(line, ", {bytes} bytes/s each way");
    }
    line
}
