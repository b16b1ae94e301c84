//! The command line: clap's derive structs, as `--help` shows them. The
//! values of the spec flags (`--tcp`, `--port-range`, ...) are parsed in
//! `specs.rs`; merging flags over a config file happens in `options.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use zlayer_tunnel::ServiceConfig;

use crate::specs::{parse_node_tunnel, parse_range, parse_service, parse_udp_service};

/// Secure reverse tunnels for ZLayer nodes.
#[derive(Parser)]
#[command(version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// How logs are written to stderr: text (for people) or json (one
    /// object per line, with the fields of its spans, for log pipelines).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ZLAYER_TUNNEL_LOG_FORMAT"
    )]
    pub(crate) log_format: LogFormat,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Lines for people (colored on a terminal).
    Text,
    /// One JSON object per line: time, level, target, message, fields, spans.
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
pub(crate) enum Command {
    /// Runs a tunnel server, an agent and a service on 127.0.0.1 in this
    /// process, and sends MIB MiB each way through the tunnel, checksummed.
    Demo {
        /// MiB each way.
        #[arg(default_value_t = 256)]
        mib: usize,
    },
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
    /// Validates a server's or an agent's config file and says what it
    /// would run, starting nothing; exits 1 naming the wrong key.
    CheckConfig {
        /// The file.
        file: PathBuf,
        /// What the file is for (default: guessed from its keys).
        #[arg(long = "as", value_enum)]
        kind: Option<crate::check::FileKind>,
    },
    /// Prints a shell's completion script: bash, zsh, fish (e.g.
    /// `zlayer-tunnel completions bash > /etc/bash_completion.d/zlayer-tunnel`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Prints the man page, or writes one per command to DIR
    /// (zlayer-tunnel.1, zlayer-tunnel-server.1, ...).
    Man {
        /// Where to write the pages.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct AccessArgs {
    /// Control URL of the server, ws:// or wss://.
    #[arg(long)]
    pub(crate) server: String,
    /// The token; prefer ZLAYER_TUNNEL_TOKEN, which stays out of `ps`.
    #[arg(long, env = "ZLAYER_TUNNEL_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
    /// The name of the service, as its agent registered it.
    #[arg(long)]
    pub(crate) service: String,
    /// The local port to listen on, on 127.0.0.1. Default: any free port.
    #[arg(long)]
    pub(crate) local_port: Option<u16>,
    /// How long the access lasts, e.g. 30m. Default 1h.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub(crate) ttl: Duration,
    /// An address for the agent to dial instead of the service's own, if its
    /// access_targets allow it.
    #[arg(long, default_value = "")]
    pub(crate) target: String,
    /// A PEM file of the CA (or the certificate) that signed a wss://
    /// server's certificate, when the system's roots do not cover it.
    #[arg(long)]
    pub(crate) ca_cert: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub(crate) struct ServerArgs {
    /// A TOML file (see examples/config/server.toml); flags override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Control listener address (IPv4 or IPv6), e.g. 0.0.0.0:7000 (repeatable).
    #[arg(long)]
    pub(crate) listen: Vec<SocketAddr>,
    /// Public ports for services, inclusive: LOW-HIGH (one port: 21011-21011). Default 30000-31000.
    #[arg(long, value_parser = parse_range)]
    pub(crate) port_range: Option<(u16, u16)>,
    /// Host the public listeners bind. Default 0.0.0.0.
    #[arg(long)]
    pub(crate) bind_host: Option<String>,
    /// How visitors are spread over a service's replicas: least-streams
    /// (default) or round-robin.
    #[arg(long)]
    pub(crate) load_balance: Option<zlayer_tunnel::replicas::LoadBalance>,
    /// An accepted token (repeatable); also ZLAYER_TUNNEL_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_TOKEN", hide_env_values = true)]
    pub(crate) token: Vec<String>,
    /// An accepted token's SHA-256, lowercase hex (repeatable).
    #[arg(long)]
    pub(crate) token_hash: Vec<String>,
    /// A file of accepted token hashes, one per line (# comments).
    #[arg(long)]
    pub(crate) token_file: Option<PathBuf>,
    /// Accept any non-empty token (development only).
    #[arg(long)]
    pub(crate) accept_any_token: bool,
    /// Serve /healthz, /status and /metrics on this address (keep it private).
    #[arg(long)]
    pub(crate) admin_listen: Vec<SocketAddr>,
    #[command(flatten)]
    pub(crate) admin_tokens: AdminTokens,
    /// How often to send heartbeats, e.g. 30s. Default 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) heartbeat_interval: Option<Duration>,
    /// Drop an agent silent this long, e.g. 40s. Default 40s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) heartbeat_timeout: Option<Duration>,
    /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// This node's id, for its node tunnels. Default: the listen address.
    #[arg(long)]
    pub(crate) node_id: Option<String>,
    /// A node tunnel from this node: NAME:LOCAL_PORT:REMOTE_PORT@URL publishes
    /// this node's LOCAL_PORT on the tunnel server at URL (repeatable).
    #[arg(long, value_parser = parse_node_tunnel)]
    pub(crate) node_tunnel: Vec<(String, u16, u16, String)>,
    /// The token for the other nodes' servers; also ZLAYER_TUNNEL_NODE_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_NODE_TOKEN", hide_env_values = true)]
    pub(crate) node_token: Option<String>,
    /// In a cluster: how long a service's public port stays reserved after
    /// its last registration goes, e.g. 5m (the default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) port_hold: Option<Duration>,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// In a cluster: the token every server accepts from its peers (the same
    /// on all); with it, this server answers the visitors of every service
    /// of the cluster. Prefer ZLAYER_TUNNEL_PEER_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_PEER_TOKEN", hide_env_values = true)]
    pub(crate) peer_token: Option<String>,
    /// In a cluster: this server's id. Default: its host name and first
    /// --listen address (HOST@ADDR).
    #[arg(long)]
    pub(crate) server_id: Option<String>,
    /// In a cluster: the control URL at which peers reach this server, e.g.
    /// ws://10.0.0.1:7000/tunnel/v1. Default: from the first --listen.
    #[arg(long)]
    pub(crate) advertise: Option<String>,
    /// In a cluster: a dead server's routes go this long after its last
    /// renewal, e.g. 5s (the default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) route_ttl: Option<Duration>,
}

/// Where a cluster's store is: for a server of the cluster, and for
/// `token add|revoke|list`.
#[derive(Args, Clone, Default)]
pub(crate) struct StoreArgs {
    /// An etcd endpoint, e.g. http://127.0.0.1:2379 (repeatable, or
    /// comma-separated): a server joins the cluster kept there.
    #[arg(long, value_delimiter = ',')]
    pub(crate) etcd: Vec<String>,
    /// The prefix of the cluster's keys in etcd. Default /zlayer-tunnel/.
    #[arg(long)]
    pub(crate) cluster_prefix: Option<String>,
    /// The etcd user, for an etcd with authentication on; the password from
    /// ZLAYER_TUNNEL_ETCD_PASSWORD.
    #[arg(long)]
    pub(crate) etcd_user: Option<String>,
    /// The etcd user's password (prefer the environment variable).
    #[arg(long, env = "ZLAYER_TUNNEL_ETCD_PASSWORD", hide_env_values = true)]
    pub(crate) etcd_password: Option<String>,
    /// PEM of the CA that signed etcd's certificates (https:// endpoints).
    #[arg(long)]
    pub(crate) etcd_ca: Option<PathBuf>,
}

/// Which token: `--token`, `--hash`, or the first line of stdin.
#[derive(Args)]
pub(crate) struct TokenArg {
    /// The token (hashed here; only its hash is stored). Without it or
    /// --hash, the first line of stdin.
    #[arg(long, conflicts_with = "hash")]
    pub(crate) token: Option<String>,
    /// The token's SHA-256, lowercase hex (`zlayer-tunnel token hash`).
    #[arg(long)]
    pub(crate) hash: Option<String>,
}

#[derive(Args)]
pub(crate) struct AgentArgs {
    /// A TOML file (see examples/config/agent.toml); flags override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Control URL of the server, ws:// or wss://; repeat it to link to
    /// several servers (high availability: every service on each).
    #[arg(long)]
    pub(crate) server: Vec<String>,
    /// Links to each server, each on a thread of its own (1 to 8; default
    /// 2; a server that takes no more gets one): visitors spread over
    /// them, so that an interactive session does not queue behind a bulk
    /// transfer.
    #[arg(long)]
    pub(crate) connections: Option<usize>,
    /// The token; prefer ZLAYER_TUNNEL_TOKEN, which stays out of `ps`.
    #[arg(long, env = "ZLAYER_TUNNEL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// A TCP service: NAME:LOCAL_PORT:REMOTE_PORT or NAME:HOST:PORT:REMOTE_PORT (remote 0 = any).
    #[arg(long, value_parser = parse_service)]
    pub(crate) tcp: Vec<ServiceConfig>,
    /// A UDP service: NAME:LOCAL_PORT:REMOTE_PORT or NAME:HOST:PORT:REMOTE_PORT (remote 0 = any).
    #[arg(long, value_parser = parse_udp_service)]
    pub(crate) udp: Vec<ServiceConfig>,
    /// Write a PROXY protocol header (v1 or v2; UDP: v2) with the visitor's
    /// address to every --tcp and --udp service before the visitor's bytes
    /// (per service: `proxy_protocol` in the config file).
    #[arg(long, value_name = "VERSION")]
    pub(crate) proxy_protocol: Option<zlayer_tunnel::proxy_protocol::ProxyVersion>,
    /// Admit only visitors from this CIDR block to every --tcp and --udp
    /// service (repeatable; checked by the server; per service: `allow` in
    /// the config file).
    #[arg(long, value_name = "CIDR")]
    pub(crate) allow: Vec<zlayer_tunnel::visitor_rules::Cidr>,
    /// Refuse visitors from this CIDR block, whatever --allow says (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub(crate) deny: Vec<zlayer_tunnel::visitor_rules::Cidr>,
    /// At most this many new connections (UDP: flows) a second from one
    /// visitor address, to every --tcp and --udp service (checked by the
    /// server; per service: `visitor_rate` in the config file).
    #[arg(long, value_name = "PER_SECOND")]
    pub(crate) visitor_rate: Option<u32>,
    /// At most this many bytes a second each way for every --tcp service,
    /// all its streams together (per service: `bandwidth` in the config file).
    #[arg(long, value_name = "BYTES")]
    pub(crate) bandwidth: Option<u64>,
    /// For wss://: trust the certificates of this PEM file (a private CA, or
    /// the server's own self-signed certificate) instead of the system roots.
    #[arg(long)]
    pub(crate) ca_cert: Option<PathBuf>,
    /// Serve /healthz, /status and /metrics about this agent on this address.
    #[arg(long)]
    pub(crate) admin_listen: Vec<SocketAddr>,
    #[command(flatten)]
    pub(crate) admin_tokens: AdminTokens,
}

/// The admin listener's bearer tokens.
#[derive(Args, Clone)]
pub(crate) struct AdminTokens {
    /// Bearer token required by every admin endpoint that changes something
    /// (and accepted for reading); prefer ZLAYER_TUNNEL_ADMIN_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: Option<String>,
    /// A file whose first line is the admin token.
    #[arg(long, conflicts_with = "admin_token")]
    pub(crate) admin_token_file: Option<PathBuf>,
    /// Bearer token required to read /status and /metrics (/healthz stays
    /// open); prefer ZLAYER_TUNNEL_ADMIN_READ_TOKEN.
    #[arg(long, env = "ZLAYER_TUNNEL_ADMIN_READ_TOKEN", hide_env_values = true)]
    pub(crate) admin_read_token: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Prints the lowercase hex SHA-256 of TOKEN (what a server stores), and nothing else.
    Hash {
        /// The token.
        token: String,
    },
    /// Prints a new random token, then its hash.
    Generate,
    /// Adds a token to a cluster's store (its hash and scope; every server
    /// of the cluster accepts it within a second).
    Add {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        which: TokenArg,
        /// A service it may register (repeatable). Default: any.
        #[arg(long)]
        register: Vec<String>,
        /// A service it may open access to (repeatable). Default: any.
        #[arg(long)]
        access: Vec<String>,
        /// Public ports its services may get, LOW-HIGH (repeatable). Default: any.
        #[arg(long, value_parser = parse_range)]
        ports: Vec<(u16, u16)>,
        /// Visitors its services admit, a CIDR block (repeatable). Default: all.
        #[arg(long, value_name = "CIDR")]
        visitors_allow: Vec<zlayer_tunnel::visitor_rules::Cidr>,
        /// Visitors its services refuse, a CIDR block (repeatable).
        #[arg(long, value_name = "CIDR")]
        visitors_deny: Vec<zlayer_tunnel::visitor_rules::Cidr>,
    },
    /// Removes a token from a cluster's store: its tunnels close on every
    /// server within two seconds.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        which: TokenArg,
    },
    /// Lists the tokens of a cluster's store: hash and scope, one per line.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}
