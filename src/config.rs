//! Configuration: the seed's builder API, serde/TOML, and `validate()` whose
//! errors name the offending key. Every timeout, interval and limit is a field
//! with a documented default. Files are read by the binary, not here.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Secret;
use crate::connections::StreamSettings;
use crate::protocol::{MAX_SERVICE_NAME_LEN, MAX_WINDOW, ServiceProtocol};

/// Why a configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key holds a bad value.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key, as written in TOML (`services[1].name`).
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// The text is not valid TOML for this configuration.
    #[error("{0}")]
    Parse(String),
}

/// A byte budget must hold at least one whole frame.
fn at_least_a_frame(key: &str, bytes: usize) -> Result<(), ConfigError> {
    if bytes < crate::protocol::MAX_MESSAGE_SIZE {
        return Err(invalid(key, "must be at least 65536 bytes"));
    }
    Ok(())
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Tunnel server settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelServerConfig {
    /// Whether the server runs at all. Default `true`.
    pub enabled: bool,
    /// HTTP path of the control WebSocket. Default `/tunnel/v1`.
    pub control_path: String,
    /// Public ports handed to services, inclusive. Default `(30000, 31000)`.
    pub data_port_range: (u16, u16),
    /// Host the public listeners bind. Default `0.0.0.0`.
    pub bind_host: String,
    /// How often the server sends `Heartbeat`. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// An agent silent (no `HeartbeatAck`) this long is dropped. Default 40 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// A socket that has not authenticated within this is closed. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Most control connections awaiting authentication at once; past it, a
    /// WebSocket upgrade is answered `503`. Default 1024.
    pub max_unauthenticated: usize,
    /// Most of those from one address (an IPv6 /64). Default 64.
    pub max_unauthenticated_per_address: usize,
    /// Most tunnels connected at once: agents' links (an agent holds its
    /// `connections`, 2 by default; at the limit, an agent without a link
    /// displaces the newest of the agent with the most). Default 1000.
    pub max_tunnels: usize,
    /// Most services one agent may register. Default 50.
    pub max_services_per_tunnel: usize,
    /// Most open visitor connections per service. Default 16384.
    pub max_connections_per_service: usize,
    /// Most open streams per tunnel, all services together. Default 16384.
    pub max_streams_per_tunnel: usize,
    /// Streams of a tunnel kept for each of its other services: one service's
    /// visitors may take at most `max_streams_per_tunnel` less this for each
    /// other service registered, so a flood on one public port cannot refuse
    /// every visitor of the tunnel's other services. Default 64.
    pub stream_reserve_per_service: usize,
    /// Bytes an agent may send on a new stream before its first credit. Default 32 KiB.
    pub stream_window: u32,
    /// Largest window a busy stream grows to, from `stream_window` to 2^31-1. Default 1 MiB.
    pub max_stream_window: u32,
    /// Credit shared by a tunnel's streams for growing their windows, at least
    /// `max_stream_window - stream_window`. Default 16 MiB.
    pub tunnel_window_budget: u64,
    /// Most UDP flows (visitor addresses) per UDP service. Default 1024.
    pub max_flows_per_service: usize,
    /// How visitors are spread over the replicas of a service (agents that
    /// registered one name): `least-streams` (default) or `round-robin`.
    pub load_balance: crate::replicas::LoadBalance,
    /// Datagrams per second one UDP flow may send toward its service. Default 200000.
    pub max_datagram_rate: u32,
    /// Largest UDP datagram carried, 1..=65507; a larger one is dropped and counted. Default 65507.
    pub max_datagram_size: usize,
    /// A UDP flow silent both ways this long is forgotten. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
    /// Bytes a tunnel's visitor sockets may have read and not yet encoded for
    /// its WebSocket, whatever windows the agent announces; at least 64 KiB.
    /// Default 256 KiB.
    pub read_ahead: usize,
    /// Bytes of datagrams in flight between a UDP service's listener and its
    /// control channel; over it they are dropped and counted; at least 64 KiB.
    /// Default 4 MiB.
    pub udp_in_flight: usize,
    /// In a cluster: how long a service's public port stays reserved for it
    /// after the last of its registrations on any server goes (a restarting
    /// agent gets it back). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub port_hold: Duration,
}

/// Default of `read_ahead` (server and agent).
pub const DEFAULT_READ_AHEAD: usize = 256 * 1024;
/// Default of the agent's `max_streams`.
fn default_agent_streams() -> usize {
    16384
}

/// Default of the agent's `max_flows`.
fn default_agent_flows() -> usize {
    1024
}

/// Most links an agent keeps to one server (`connections`).
pub const MAX_CONNECTIONS: usize = 8;

fn default_connections() -> usize {
    2
}

/// Default of the UDP budgets (`udp_in_flight`, `udp_waiting`).
pub const DEFAULT_UDP_BUDGET: usize = 4 * 1024 * 1024;

impl Default for TunnelServerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            control_path: "/tunnel/v1".into(),
            data_port_range: (30000, 31000),
            bind_host: "0.0.0.0".into(),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(40),
            auth_timeout: Duration::from_secs(10),
            max_unauthenticated: 1024,
            max_unauthenticated_per_address: 64,
            max_tunnels: 1000,
            max_services_per_tunnel: 50,
            max_connections_per_service: 16384,
            max_streams_per_tunnel: 16384,
            stream_reserve_per_service: 64,
            stream_window: 32 * 1024,
            max_stream_window: 1024 * 1024,
            tunnel_window_budget: 16 * 1024 * 1024,
            max_flows_per_service: 1024,
            load_balance: crate::replicas::LoadBalance::LeastStreams,
            max_datagram_rate: 200_000,
            max_datagram_size: crate::udp::MAX_DATAGRAM,
            udp_idle_timeout: Duration::from_secs(60),
            read_ahead: DEFAULT_READ_AHEAD,
            udp_in_flight: DEFAULT_UDP_BUDGET,
            port_hold: Duration::from_secs(300),
        }
    }
}

impl TunnelServerConfig {
    /// The defaults.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses TOML (unknown keys are refused) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Sets the public port range (inclusive).
    #[must_use]
    pub fn with_port_range(mut self, low: u16, high: u16) -> Self {
        self.data_port_range = (low, high);
        self
    }

    /// Sets the host public listeners bind.
    #[must_use]
    pub fn with_bind_host(mut self, host: impl Into<String>) -> Self {
        self.bind_host = host.into();
        self
    }

    /// Sets the heartbeat interval and timeout.
    #[must_use]
    pub fn with_heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat_interval = interval;
        self.heartbeat_timeout = timeout;
        self
    }

    /// The limits of each UDP service.
    pub fn flow_limits(&self) -> crate::udp::FlowLimits {
        crate::udp::FlowLimits {
            max_flows: self.max_flows_per_service,
            max_rate: self.max_datagram_rate,
            idle_timeout: self.udp_idle_timeout,
            max_datagram: self.max_datagram_size,
        }
    }

    /// The rules of one agent's control link.
    pub fn session_settings(&self) -> crate::session::ServerSettings {
        crate::session::ServerSettings {
            auth_timeout: self.auth_timeout,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            supported: crate::protocol::Features::ALL,
            stream_window: self.stream_window,
            max_services: self.max_services_per_tunnel,
            max_connections_per_service: self.max_connections_per_service,
            stream_reserve_per_service: self.stream_reserve_per_service,
            streams: self.stream_settings(crate::protocol::DEFAULT_INITIAL_WINDOW),
        }
    }

    /// The stream table of one tunnel, given the initial window the agent announced.
    pub fn stream_settings(&self, agent_window: u32) -> StreamSettings {
        StreamSettings {
            max_streams: self.max_streams_per_tunnel,
            recv_initial: self.stream_window,
            recv_max: self.max_stream_window,
            send_initial: agent_window,
            budget: self.tunnel_window_budget,
        }
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.control_path.starts_with('/') {
            return Err(invalid("control_path", "must start with '/'"));
        }
        let (low, high) = self.data_port_range;
        if low == 0 || low > high {
            return Err(invalid(
                "data_port_range",
                format!("{low}-{high} is empty: need 1 <= low <= high"),
            ));
        }
        if self.bind_host.is_empty() {
            return Err(invalid("bind_host", "must not be empty"));
        }
        positive("heartbeat_interval", self.heartbeat_interval)?;
        positive("auth_timeout", self.auth_timeout)?;
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout",
                format!(
                    "must be longer than heartbeat_interval ({})",
                    humantime::format_duration(self.heartbeat_interval)
                ),
            ));
        }
        self.validate_limits()
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("max_unauthenticated", self.max_unauthenticated),
            (
                "max_unauthenticated_per_address",
                self.max_unauthenticated_per_address,
            ),
            ("max_tunnels", self.max_tunnels),
            ("max_services_per_tunnel", self.max_services_per_tunnel),
            (
                "max_connections_per_service",
                self.max_connections_per_service,
            ),
            ("max_streams_per_tunnel", self.max_streams_per_tunnel),
            ("max_flows_per_service", self.max_flows_per_service),
            ("max_datagram_rate", self.max_datagram_rate as usize),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if !(1..=crate::udp::MAX_DATAGRAM).contains(&self.max_datagram_size) {
            return Err(invalid("max_datagram_size", "must be between 1 and 65507"));
        }
        positive("udp_idle_timeout", self.udp_idle_timeout)?;
        at_least_a_frame("read_ahead", self.read_ahead)?;
        at_least_a_frame("udp_in_flight", self.udp_in_flight)?;
        validate_windows(
            self.stream_window,
            self.max_stream_window,
            self.tunnel_window_budget,
        )
    }
}

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be longer than 0s"));
    }
    Ok(())
}

/// Checks `stream_window`, `max_stream_window` and `tunnel_window_budget`
/// together: the same rules hold on the server and on the agent.
fn validate_windows(initial: u32, max: u32, budget: u64) -> Result<(), ConfigError> {
    if !(1024..=MAX_WINDOW).contains(&initial) {
        return Err(invalid(
            "stream_window",
            "must be between 1024 and 2147483647",
        ));
    }
    if !(initial..=MAX_WINDOW).contains(&max) {
        return Err(invalid(
            "max_stream_window",
            "must be between stream_window and 2147483647",
        ));
    }
    // a budget too small for even one stream to reach its maximum makes
    // `max_stream_window` a lie; no growth at all is max = stream_window
    if budget < u64::from(max - initial) {
        return Err(invalid(
            "tunnel_window_budget",
            "must be at least max_stream_window - stream_window",
        ));
    }
    Ok(())
}

/// Tunnel agent settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelClientConfig {
    /// Control URL of the server, `ws://` or `wss://`.
    #[serde(default)]
    pub server_url: String,
    /// More servers to link to (high availability): the agent keeps a link
    /// to each (and to `server_url`), each with its own backoff, and
    /// registers every service on every one, on the same public port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// Links to each server (1 to 8), the extra ones each on a thread of
    /// its own, opened only to a server that takes several (`LINKS`; an
    /// original server gets one). The extra links register every service
    /// again, as replicas under client ids of their own (the agent's with
    /// the link's number in its last byte), and the server gives each
    /// visitor to the link with the fewest open streams: a bulk transfer
    /// and an interactive session then travel on different sockets and
    /// threads, and the small one does not queue behind the big one.
    /// Default 2.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// The token, sent raw inside `Auth`; masked in logs. A file may leave it
    /// out and have it come from the environment.
    #[serde(default)]
    pub token: Secret,
    /// Stable id of this agent; drawn once at start when absent, kept across reconnects.
    #[serde(default)]
    pub client_id: Option<Uuid>,
    /// First and shortest reconnect delay: delays double from it, jittered by
    /// up to half a step, and never fall below it. Default 1 s.
    #[serde(default = "default_reconnect", with = "humantime_serde")]
    pub reconnect_interval: Duration,
    /// Longest reconnect delay: no delay exceeds it, and once the doubling
    /// reaches it delays spread over its upper half. Default 60 s.
    #[serde(default = "default_max_reconnect", with = "humantime_serde")]
    pub max_reconnect_interval: Duration,
    /// A connection that lasted this long (more than 0 s) resets the backoff. Default 10 s.
    #[serde(default = "default_stable_after", with = "humantime_serde")]
    pub stable_after: Duration,
    /// How often the agent sends its own `Heartbeat`. Default 15 s.
    #[serde(default = "default_agent_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Nothing heard from the server for this long drops the connection. Default 40 s.
    #[serde(default = "default_agent_timeout", with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Deadline for the WebSocket handshake and authentication. Default 10 s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for dialing a local service. Default 5 s.
    #[serde(default = "default_local_timeout", with = "humantime_serde")]
    pub local_connect_timeout: Duration,
    /// Bytes the server may send on a new stream before its first credit. Default 32 KiB.
    #[serde(default = "default_stream_window")]
    pub stream_window: u32,
    /// Largest window a busy stream grows to, from `stream_window` to 2^31-1. Default 1 MiB.
    #[serde(default = "default_max_stream_window")]
    pub max_stream_window: u32,
    /// Credit shared by the agent's streams for growing their windows, at least
    /// `max_stream_window - stream_window`. Default 16 MiB.
    #[serde(default = "default_tunnel_budget")]
    pub tunnel_window_budget: u64,
    /// A UDP flow silent both ways this long is forgotten. Default 60 s.
    #[serde(default = "default_udp_idle", with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
    /// Bytes the local sockets may have read and not yet encoded for the
    /// WebSocket, whatever windows the server announces; at least 64 KiB.
    /// Default 256 KiB.
    #[serde(default = "default_read_ahead")]
    pub read_ahead: usize,
    /// Bytes of datagrams waiting for the WebSocket; over it they are dropped
    /// and counted; at least 64 KiB. Default 4 MiB.
    #[serde(default = "default_udp_budget")]
    pub udp_waiting: usize,
    /// UDP flows each of this agent's links keeps open at once, whatever
    /// the server asks: each is a socket of the agent's; past it, a new
    /// flow is refused with `ConnectFail`. Default 1024.
    #[serde(default = "default_agent_flows")]
    pub max_flows: usize,
    /// TCP streams each of this agent's links keeps open at once, whatever
    /// the server asks: each is a connection to a local service (a
    /// descriptor); past it, a new stream is refused with `ConnectFail`.
    /// Keep it plus `max_flows`, times the links (servers x
    /// `connections`), below the process's open-file limit (`ulimit -n`),
    /// so that the control links can always reconnect. Default 16384 (the
    /// server's own `max_streams_per_tunnel`).
    #[serde(default = "default_agent_streams")]
    pub max_streams: usize,
    /// Addresses an access client may ask this agent to dial (`Open` with a
    /// target), besides its registered services. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_targets: Vec<String>,
    /// For `wss://`: a PEM file of the CAs to trust instead of the system
    /// roots, or of the server's own (pinned) certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Services to register.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

fn default_reconnect() -> Duration {
    Duration::from_secs(1)
}
fn default_max_reconnect() -> Duration {
    Duration::from_secs(60)
}
fn default_stable_after() -> Duration {
    Duration::from_secs(10)
}
fn default_agent_heartbeat() -> Duration {
    Duration::from_secs(15)
}
fn default_agent_timeout() -> Duration {
    Duration::from_secs(40)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_local_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_read_ahead() -> usize {
    DEFAULT_READ_AHEAD
}
fn default_udp_budget() -> usize {
    DEFAULT_UDP_BUDGET
}
fn default_udp_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_stream_window() -> u32 {
    32 * 1024
}
fn default_max_stream_window() -> u32 {
    1024 * 1024
}
fn default_tunnel_budget() -> u64 {
    16 * 1024 * 1024
}

impl TunnelClientConfig {
    /// An agent for `server_url` with `token` and the defaults.
    #[must_use]
    pub fn new(server_url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            server_url: server_url.into(),
            servers: Vec::new(),
            connections: default_connections(),
            token: Secret::new(token.into()),
            client_id: None,
            reconnect_interval: default_reconnect(),
            max_reconnect_interval: default_max_reconnect(),
            stable_after: default_stable_after(),
            heartbeat_interval: default_agent_heartbeat(),
            heartbeat_timeout: default_agent_timeout(),
            connect_timeout: default_connect_timeout(),
            local_connect_timeout: default_local_timeout(),
            stream_window: default_stream_window(),
            max_stream_window: default_max_stream_window(),
            tunnel_window_budget: default_tunnel_budget(),
            udp_idle_timeout: default_udp_idle(),
            read_ahead: default_read_ahead(),
            udp_waiting: default_udp_budget(),
            max_flows: default_agent_flows(),
            max_streams: default_agent_streams(),
            access_targets: Vec::new(),
            ca_cert: None,
            services: Vec::new(),
        }
    }

    /// Parses TOML (unknown keys are refused) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Adds a server to link to, beside `server_url` (high availability).
    #[must_use]
    pub fn with_server(mut self, url: impl Into<String>) -> Self {
        self.servers.push(url.into());
        self
    }

    /// Adds servers to link to, beside `server_url` (high availability).
    #[must_use]
    pub fn with_servers<I: IntoIterator<Item = S>, S: Into<String>>(mut self, urls: I) -> Self {
        self.servers.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Keeps `n` links to each server (`connections`, 1 to 8).
    #[must_use]
    pub fn with_connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    /// Every server the agent links to: `server_url`, then `servers`, each once.
    pub fn server_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = Vec::new();
        let all = std::iter::once(&self.server_url).chain(&self.servers);
        for url in all.filter(|u| !u.is_empty()) {
            if !urls.contains(url) {
                urls.push(url.clone());
            }
        }
        urls
    }

    /// The settings of the link to `url`: these, with `url` as the only server.
    #[must_use]
    pub fn for_server(&self, url: &str) -> Self {
        Self {
            server_url: url.to_owned(),
            servers: Vec::new(),
            ..self.clone()
        }
    }

    /// Adds a service.
    #[must_use]
    pub fn with_service(mut self, service: ServiceConfig) -> Self {
        self.services.push(service);
        self
    }

    /// Trusts the certificates of this PEM file (CAs, or the server's own)
    /// instead of the system roots.
    #[must_use]
    pub fn with_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// Sets the reconnect backoff bounds.
    #[must_use]
    pub fn with_reconnect(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect_interval = initial;
        self.max_reconnect_interval = max;
        self
    }

    /// What the agent offers: everything, but `PROXY` (the public address
    /// of each visitor) only when a service writes PROXY protocol headers.
    fn features(&self) -> crate::protocol::Features {
        use crate::protocol::Features;
        let wants_proxy = self.services.iter().any(|s| s.proxy_protocol.is_some());
        if wants_proxy {
            Features::ALL
        } else {
            Features::from_bits(Features::ALL.bits() & !Features::PROXY.bits())
        }
    }

    /// The rules of one link to the server, for agent `client_id`.
    pub fn session_settings(&self, client_id: Uuid) -> crate::session::AgentSettings {
        crate::session::AgentSettings {
            token: self.token.clone(),
            client_id,
            offer: Some(self.features()),
            stream_window: self.stream_window,
            auth_timeout: self.connect_timeout,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            streams: self.stream_settings(crate::protocol::DEFAULT_INITIAL_WINDOW),
            access_targets: self.access_targets.clone(),
            max_flows: self.max_flows,
        }
    }

    /// The agent's stream table, given the initial window the server
    /// announced, with the agent's own stream cap (`max_streams`).
    pub fn stream_settings(&self, server_window: u32) -> StreamSettings {
        StreamSettings {
            max_streams: self.max_streams,
            recv_initial: self.stream_window,
            recv_max: self.max_stream_window,
            send_initial: server_window,
            budget: self.tunnel_window_budget,
        }
    }

    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let websocket = |url: &str| url.starts_with("ws://") || url.starts_with("wss://");
        if !(websocket(&self.server_url) || self.server_url.is_empty() && !self.servers.is_empty())
        {
            return Err(invalid("server_url", "must start with ws:// or wss://"));
        }
        if let Some(i) = self.servers.iter().position(|url| !websocket(url)) {
            return Err(invalid(
                format!("servers[{i}]"),
                "must start with ws:// or wss://",
            ));
        }
        if self.token.is_empty() {
            return Err(invalid("token", "must not be empty"));
        }
        positive("reconnect_interval", self.reconnect_interval)?;
        if self.max_reconnect_interval < self.reconnect_interval {
            return Err(invalid(
                "max_reconnect_interval",
                "must be at least reconnect_interval",
            ));
        }
        // zero would reset the backoff after every connection, however short
        positive("stable_after", self.stable_after)?;
        positive("heartbeat_interval", self.heartbeat_interval)?;
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout",
                "must be longer than heartbeat_interval",
            ));
        }
        positive("connect_timeout", self.connect_timeout)?;
        positive("local_connect_timeout", self.local_connect_timeout)?;
        positive("udp_idle_timeout", self.udp_idle_timeout)?;
        at_least_a_frame("read_ahead", self.read_ahead)?;
        at_least_a_frame("udp_waiting", self.udp_waiting)?;
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(invalid("connections", "must be 1 to 8"));
        }
        if self.max_flows == 0 {
            return Err(invalid("max_flows", "must be at least 1"));
        }
        if self.max_streams == 0 {
            return Err(invalid("max_streams", "must be at least 1"));
        }
        validate_windows(
            self.stream_window,
            self.max_stream_window,
            self.tunnel_window_budget,
        )?;
        self.validate_services()
    }

    fn validate_services(&self) -> Result<(), ConfigError> {
        for (i, service) in self.services.iter().enumerate() {
            service.validate_at(&format!("services[{i}]"))?;
            if self.services[..i].iter().any(|s| s.name == service.name) {
                return Err(invalid(
                    format!("services[{i}].name"),
                    format!("{:?} is registered twice", service.name),
                ));
            }
        }
        Ok(())
    }
}

/// The `zlayer-tunnel server` configuration file: where to listen, which
/// tokens to accept, and the tunnel settings in `[tunnel]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerFile {
    /// Control listener addresses, e.g. `["0.0.0.0:7000", "[::]:7000"]`.
    pub listen: Vec<String>,
    /// Accepted tokens, by lowercase hex SHA-256 (`zlayer-tunnel token hash`).
    pub token_hashes: Vec<String>,
    /// A file of accepted token hashes, one per line.
    pub token_file: Option<String>,
    /// Accepted tokens with scopes: `[[tokens]]` with `hash`, and optionally
    /// `register` and `access`, the services the token may register and open
    /// access streams to (absent: any).
    pub tokens: Vec<ScopedToken>,
    /// Accept any non-empty token (development only). Default `false`.
    pub accept_any_token: bool,
    /// Serve `wss://` with this certificate chain (PEM); needs `tls_key`.
    pub tls_cert: Option<String>,
    /// The private key of `tls_cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<String>,
    /// Serve `/healthz`, `/status` and `/metrics` here (keep it private).
    pub admin_listen: Vec<String>,
    /// etcd endpoints of the cluster this server joins (`--etcd`); empty:
    /// a server on its own.
    pub etcd: Vec<String>,
    /// The prefix of the cluster's keys in etcd (`--cluster-prefix`);
    /// default `/zlayer-tunnel/`.
    pub cluster_prefix: Option<String>,
    /// The tunnel settings.
    pub tunnel: TunnelServerConfig,
}

impl ServerFile {
    /// Parses TOML (unknown keys are refused) and validates the tunnel settings.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let file: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        file.tunnel.validate().map_err(|e| match e {
            ConfigError::Invalid { key, reason } => invalid(format!("tunnel.{key}"), reason),
            other => other,
        })?;
        file.check_token_ports(None)?;
        Ok(file)
    }

    /// Checks each token's `ports`: every range non-empty and, given the
    /// server's final `data_port_range` (after command-line flags), inside it.
    pub fn check_token_ports(&self, range: Option<(u16, u16)>) -> Result<(), ConfigError> {
        for (i, token) in self.tokens.iter().enumerate() {
            validate_port_scope(token.ports.as_deref(), range)
                .map_err(|reason| invalid(format!("tokens[{i}].ports"), reason))?;
        }
        Ok(())
    }
}

/// Checks a token's port ranges: each non-empty and inside the server's
/// range, when given.
fn validate_port_scope(
    ranges: Option<&[(u16, u16)]>,
    server: Option<(u16, u16)>,
) -> Result<(), String> {
    for &(first, last) in ranges.unwrap_or_default() {
        if first == 0 || first > last {
            return Err(format!("{first}-{last} is empty: need 1 <= low <= high"));
        }
        let Some((low, high)) = server else { continue };
        if first < low || last > high {
            return Err(format!(
                "{first}-{last} is outside data_port_range {low}-{high}"
            ));
        }
    }
    Ok(())
}

/// An accepted token with its scope, in the server's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedToken {
    /// The token's lowercase hex SHA-256.
    pub hash: String,
    /// Services it may register; absent: any.
    #[serde(default)]
    pub register: Option<Vec<String>>,
    /// Services it may open access streams to; absent: any.
    #[serde(default)]
    pub access: Option<Vec<String>>,
    /// Public ports its services may be given, as inclusive `[low, high]`
    /// ranges within `data_port_range`; absent: any.
    #[serde(default)]
    pub ports: Option<Vec<(u16, u16)>>,
    /// Visitors its services admit, CIDR blocks; absent or empty: all.
    #[serde(default)]
    pub visitors_allow: Vec<crate::visitor_rules::Cidr>,
    /// Visitors its services refuse, whatever the allow lists say.
    #[serde(default)]
    pub visitors_deny: Vec<crate::visitor_rules::Cidr>,
}

/// A service the agent exposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name: 1-255 bytes of letters, digits, `-` and `_`.
    pub name: String,
    /// TCP or UDP. Default TCP.
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// Port of the service next to the agent.
    pub local_port: u16,
    /// Host of the service next to the agent. Default `127.0.0.1`.
    #[serde(default = "default_local_host")]
    pub local_host: String,
    /// Requested public port; 0 lets the server choose. Default 0.
    #[serde(default)]
    pub remote_port: u16,
    /// Checks of the local service: `"tcp"` dials it every
    /// `health_interval`; after `health_failures` failures in a row the
    /// server (if it supports it) sends this agent no new visitor for it
    /// until a check passes. Absent: no checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Time between two health checks. Default 5 s.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Failed checks in a row that make the service unhealthy. Default 3.
    #[serde(default = "default_health_failures")]
    pub health_failures: u32,
    /// A PROXY protocol header (`"v1"` or `"v2"`; UDP: `"v2"`) written to
    /// the local service before each visitor's first byte (each datagram,
    /// for UDP), with the visitor's address and the public address it
    /// reached. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyVersion>,
    /// Visitors the server admits, CIDR blocks (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<crate::visitor_rules::Cidr>,
    /// Visitors the server refuses, whatever `allow` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<crate::visitor_rules::Cidr>,
    /// New connections (UDP: new flows) one visitor address may open per
    /// second, a burst of one second's worth; the server refuses the rest.
    /// Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_rate: Option<u32>,
    /// Bytes a second each way, all the service's TCP streams together (a
    /// burst of one second's worth): the server reads its visitors less,
    /// the agent its service. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

/// How the agent checks a local service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// A TCP connection to the service's local address is accepted.
    Tcp,
}

fn default_local_host() -> String {
    "127.0.0.1".into()
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_health_failures() -> u32 {
    3
}

impl ServiceConfig {
    /// A TCP service on `127.0.0.1:local_port`.
    #[must_use]
    pub fn tcp(name: impl Into<String>, local_port: u16) -> Self {
        Self::with_protocol(name, ServiceProtocol::Tcp, local_port)
    }

    /// A UDP service on `127.0.0.1:local_port`.
    #[must_use]
    pub fn udp(name: impl Into<String>, local_port: u16) -> Self {
        Self::with_protocol(name, ServiceProtocol::Udp, local_port)
    }

    fn with_protocol(name: impl Into<String>, protocol: ServiceProtocol, local_port: u16) -> Self {
        Self {
            name: name.into(),
            protocol,
            local_port,
            local_host: default_local_host(),
            remote_port: 0,
            health_check: None,
            health_interval: default_health_interval(),
            health_failures: default_health_failures(),
            proxy_protocol: None,
            allow: Vec::new(),
            deny: Vec::new(),
            visitor_rate: None,
            bandwidth: None,
        }
    }

    /// At most `bytes_per_second` each way, all its streams together.
    #[must_use]
    pub const fn with_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second);
        self
    }

    /// At most `per_second` new connections (or UDP flows) a second from
    /// one visitor address, enforced by the server.
    #[must_use]
    pub const fn with_visitor_rate(mut self, per_second: u32) -> Self {
        self.visitor_rate = Some(per_second);
        self
    }

    /// Visitors the server admits (`allow`: empty admits all) and refuses
    /// (`deny`, which wins), checked before any stream opens.
    #[must_use]
    pub fn with_visitors(
        mut self,
        allow: Vec<crate::visitor_rules::Cidr>,
        deny: Vec<crate::visitor_rules::Cidr>,
    ) -> Self {
        self.allow = allow;
        self.deny = deny;
        self
    }

    /// Its address lists, as one value.
    pub fn visitor_rules(&self) -> crate::visitor_rules::VisitorRules {
        crate::visitor_rules::VisitorRules {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }

    /// Writes a PROXY protocol header of `version` to the local service
    /// before each visitor's bytes.
    #[must_use]
    pub const fn with_proxy_protocol(
        mut self,
        version: crate::proxy_protocol::ProxyVersion,
    ) -> Self {
        self.proxy_protocol = Some(version);
        self
    }

    /// The PROXY protocol header for a visitor at `visitor` who reached
    /// `public` (either may be empty: unknown), if the service wants one.
    pub fn proxy_header(&self, visitor: &str, public: &str) -> Option<bytes::Bytes> {
        use crate::proxy_protocol::{Transport, header};
        let transport = match self.protocol {
            ServiceProtocol::Tcp => Transport::Stream,
            ServiceProtocol::Udp => Transport::Datagram,
        };
        Some(header(self.proxy_protocol?, transport, visitor, public))
    }

    /// Checks the local service with `check` every `interval`; `failures`
    /// failed checks in a row make it unhealthy.
    #[must_use]
    pub fn with_health_check(
        mut self,
        check: HealthCheck,
        interval: Duration,
        failures: u32,
    ) -> Self {
        self.health_check = Some(check);
        self.health_interval = interval;
        self.health_failures = failures;
        self
    }

    /// Asks for a specific public port.
    #[must_use]
    pub const fn with_remote_port(mut self, port: u16) -> Self {
        self.remote_port = port;
        self
    }

    /// Sets the host of the local service.
    #[must_use]
    pub fn with_local_host(mut self, host: impl Into<String>) -> Self {
        self.local_host = host.into();
        self
    }

    /// The local address to dial, `host:port`.
    pub fn local_addr(&self) -> String {
        if self.local_host.contains(':') {
            format!("[{}]:{}", self.local_host, self.local_port)
        } else {
            format!("{}:{}", self.local_host, self.local_port)
        }
    }

    /// Checks the service on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at("service")
    }

    fn validate_at(&self, at: &str) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_SERVICE_NAME_LEN
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} must be 1-255 letters, digits, '-' or '_'", self.name),
            ));
        }
        if self.local_port == 0 {
            return Err(invalid(format!("{at}.local_port"), "must not be 0"));
        }
        if self.local_host.is_empty() {
            return Err(invalid(format!("{at}.local_host"), "must not be empty"));
        }
        if self.protocol == ServiceProtocol::Udp
            && self.proxy_protocol == Some(crate::proxy_protocol::ProxyVersion::V1)
        {
            return Err(invalid(
                format!("{at}.proxy_protocol"),
                "v1 is for TCP services; a UDP service takes \"v2\"",
            ));
        }
        if self.protocol == ServiceProtocol::Udp && self.bandwidth.is_some() {
            return Err(invalid(
                format!("{at}.bandwidth"),
                "is for TCP services: it slows their streams by reading less, and a UDP \
                 service has none (remove it; the server's max_datagram_rate limits a flow)",
            ));
        }
        if self.bandwidth == Some(0) {
            return Err(invalid(
                format!("{at}.bandwidth"),
                "must be at least 1 byte a second (or absent: no limit)",
            ));
        }
        if self.visitor_rate == Some(0) {
            return Err(invalid(
                format!("{at}.visitor_rate"),
                "must be at least 1 (or absent: no limit)",
            ));
        }
        if self.health_check.is_some() {
            positive(&format!("{at}.health_interval"), self.health_interval)?;
            if self.health_failures == 0 {
                return Err(invalid(
                    format!("{at}.health_failures"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

mod live;
pub use live::{LiveServerConfig, RESTART_ONLY};

#[cfg(test)]
mod tests;
