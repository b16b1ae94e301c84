//! # zlayer-tunnel
//!
//! Secure reverse tunnels for ZLayer nodes. An **agent** next to private
//! services dials *out* to a **tunnel server** over a WebSocket (`ws://` or
//! `wss://`), authenticates with a token (the server keeps only SHA-256
//! hashes) and registers TCP and UDP services; the server opens a public port
//! for each and forwards every visitor through the tunnel to the agent.
//!
//! ## Architecture
//!
//! * `src/` is the **sans-IO core**: the wire protocol ([`protocol`]),
//!   configuration ([`config`]), token auth ([`auth`]), the port pool
//!   ([`ports`]), reconnect backoff ([`backoff`]), flow-control windows
//!   ([`flow`]), the per-tunnel connection table ([`connections`]: streams, UDP flows, relayed access streams), heartbeat
//!   bookkeeping ([`liveness`]) and traffic counters ([`accounting`]). It opens no socket,
//!   reads no clock and draws no random number: callers pass `now` and random
//!   values in, so every rule is unit-tested with fabricated inputs.
//! * `actors/` is the **runtime** ([`actors`]): actix actors that move bytes
//!   and carry out the core's decisions, one actor per file; the handles a
//!   host holds in `actors/handles/`, IO plumbing in `actors/io/`.
//!
//! The normative wire format, including the negotiated data-plane extension,
//! is `docs/PROTOCOL.md`.

#![forbid(unsafe_code)]

#[path = "../actors/mod.rs"]
pub mod actors;

pub mod access;
pub mod accounting;
pub mod admin_access;
pub mod admission;
pub mod auth;
pub mod backoff;
pub mod bandwidth;
mod budget;
pub mod cluster;
pub mod config;
pub mod connections;
mod error;
pub mod fair;
pub mod flow;
pub mod health;
mod http_upgrade;
pub mod liveness;
pub mod log_limit;
pub mod node;
pub mod outbound;
pub mod ports;
pub mod protocol;
pub mod proxy_protocol;
pub mod replicas;
pub mod session;
pub mod status;
pub mod throttle;
pub mod tls;
pub mod tunnels;
pub mod udp;
pub mod visitor_rate;
pub mod visitor_rules;

pub use access::AccessSessionInfo;
/// The wait for SIGINT or SIGTERM (Ctrl-C off unix) that `serve`, the binary
/// and the examples stop on; for a host's own `main` too.
pub use actors::shutdown_signal;
pub use actors::{
    AccessManager, ConnectionCallback, ControlHandler, NodeTunnelManager, PublishedCallback,
    PublishedService, StartedSession, TunnelAgent, TunnelInfo, TunnelRegistry,
};
#[cfg(feature = "etcd")]
pub use actors::{EtcdOptions, EtcdStore};
pub use auth::{
    AuthError, LiveTokens, Secret, TokenScope, TokenStore, TokenValidator, accept_all_tokens,
    hash_token,
};
pub use cluster::{ClusterStore, StoreError, StoredToken};
pub use config::{
    ConfigError, HealthCheck, ScopedToken, ServerFile, ServiceConfig, TunnelClientConfig,
    TunnelServerConfig,
};
pub use error::{Result, TunnelError};
pub use node::{NodeTunnel, NodeTunnelStatus};
pub use protocol::{
    HEADER_SIZE, MAX_MESSAGE_SIZE, Message, MessageType, PROTOCOL_VERSION, ServiceProtocol,
};
pub use status::TunnelState;

/// The README's Rust examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
