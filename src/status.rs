//! What a server reports about itself: tunnels and services with live
//! counters, as plain data, and their renderings for `/status` (JSON) and
//! `/metrics` (Prometheus text format). No IO: the runtime serves the text.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

use crate::accounting::{DropKind, GuardSnapshot, Snapshot};
use crate::protocol::ServiceProtocol;
use crate::visitor_rules::Refusal;

/// A registered service, as reported in [`TunnelInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    /// The service's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// Its public port.
    pub port: u16,
    /// Its traffic so far, live.
    pub stats: Snapshot,
    /// UDP: each open flow's traffic (refreshed twice a second).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flows: Vec<crate::udp::FlowInfo>,
    /// False while its agent's health checks of it fail (replicas: it gets
    /// no new visitor); true without checks.
    pub healthy: bool,
    /// The address lists a visitor must pass (its token's, its
    /// registration's), each `{allow, deny}`; none: everyone.
    #[serde(skip_serializing_if = "crate::visitor_rules::ServiceRules::is_empty")]
    pub visitors: crate::visitor_rules::ServiceRules,
    /// New connections (UDP: flows) a second one visitor address may open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visitor_rate: Option<u32>,
    /// Bytes a second each way, all its streams together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

/// A connected tunnel (one agent session), as the registry reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelInfo {
    /// The tunnel's id.
    pub id: Uuid,
    /// The agent's stable client id.
    pub client_id: Uuid,
    /// The agent's address.
    pub client_addr: SocketAddr,
    /// When the agent authenticated (seconds since the Unix epoch in JSON).
    #[serde(serialize_with = "unix_seconds")]
    pub connected_since: SystemTime,
    /// Public ports held.
    pub ports: Vec<u16>,
    /// Its services.
    pub services: Vec<ServiceInfo>,
    /// Its traffic so far, live (all services together).
    pub stats: Snapshot,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport<'a> {
    /// Connected tunnels.
    pub tunnels: &'a [TunnelInfo],
    /// The services by public port, each with its replicas (see [`replicas`]).
    pub services: Vec<ServiceReplicas>,
    /// Free public ports.
    pub free_ports: usize,
    /// Connections awaiting authentication, and what the admission limits
    /// turned away.
    pub guards: GuardSnapshot,
    /// The cluster, for a server of one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A server's view of its cluster (docs/CLUSTER.md), for `/status` and
/// `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// This server's id among its peers (none: it has no peer token).
    pub server_id: Option<String>,
    /// The store answered the last time it was asked.
    pub store_reachable: bool,
    /// Tokens read from the store.
    pub stored_tokens: usize,
    /// Every server's routes, as last read.
    pub routes: Vec<crate::cluster::Route>,
    /// Public ports this server forwards to its peers, with their traffic.
    pub forwards: Vec<ForwardStatus>,
    /// This server's peer links, with the streams sent through each.
    pub peer_links: Vec<PeerLinkStatus>,
}

/// A peer link of this server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerLinkStatus {
    /// The peer's advertised URL.
    pub peer: String,
    /// Whether the link is up.
    pub connected: bool,
    /// Visitors' streams sent through it, now and in all.
    pub stats: Snapshot,
}

/// A public port forwarded to peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForwardStatus {
    /// The port.
    pub port: u16,
    /// Its service.
    pub service: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// Visitors' streams (or UDP flows) through peer links, now and in all.
    pub stats: Snapshot,
}

impl ClusterStatus {
    /// The servers seen in the routes (this one too if it routes anything).
    pub fn servers(&self) -> Vec<&str> {
        let mut servers: Vec<&str> = self.routes.iter().map(|r| r.server.as_str()).collect();
        servers.sort_unstable();
        servers.dedup();
        servers
    }
}

/// The cluster's lines of `/metrics`.
///
/// ```
/// let text = zlayer_tunnel::status::render_cluster_metrics(&Default::default());
/// assert!(text.contains("zlayer_tunnel_cluster_store_reachable 0\n"));
/// ```
pub fn render_cluster_metrics(cluster: &ClusterStatus) -> String {
    let mut out = String::new();
    let count = |n: usize| n as u64;
    gauge(
        &mut out,
        "zlayer_tunnel_cluster_store_reachable",
        "1 if the cluster's store answered when last asked.",
        u64::from(cluster.store_reachable),
    );
    gauge(
        &mut out,
        "zlayer_tunnel_cluster_stored_tokens",
        "Tokens read from the cluster's store.",
        count(cluster.stored_tokens),
    );
    gauge(
        &mut out,
        "zlayer_tunnel_cluster_servers",
        "Servers of the cluster seen in its routes.",
        count(cluster.servers().len()),
    );
    gauge(
        &mut out,
        "zlayer_tunnel_cluster_routes",
        "Routes of the cluster (a server with a link for a service).",
        count(cluster.routes.len()),
    );
    gauge(
        &mut out,
        "zlayer_tunnel_cluster_forwarded_ports",
        "Public ports this server forwards to its peers.",
        count(cluster.forwards.len()),
    );
    let per_peer = [
        (
            "zlayer_tunnel_cluster_peer_link_up",
            "1 if this server's peer link to the peer is up.",
        ),
        (
            "zlayer_tunnel_cluster_peer_link_streams",
            "Visitors' streams through this server's peer link, open now.",
        ),
    ];
    for (i, (name, help)) in per_peer.into_iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for link in &cluster.peer_links {
            let value = if i == 0 {
                u64::from(link.connected)
            } else {
                link.stats.connections_active
            };
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {value}", escape(&link.peer));
        }
    }
    let per_port = [
        (
            "zlayer_tunnel_cluster_forwarded_streams",
            "gauge",
            "Visitors' streams through peer links, open now.",
        ),
        (
            "zlayer_tunnel_cluster_forwarded_streams_total",
            "counter",
            "Visitors' streams through peer links since start.",
        ),
    ];
    for (name, kind, help) in per_port {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for forward in &cluster.forwards {
            let value = match kind {
                "gauge" => forward.stats.connections_active,
                _ => forward.stats.connections_total,
            };
            let service = escape(&forward.service);
            let _ = writeln!(
                out,
                "{name}{{service=\"{service}\",protocol=\"{}\",port=\"{}\"}} {value}",
                forward.protocol, forward.port
            );
        }
    }
    out
}

/// A service as its visitors see it: one public port, and the agents'
/// registrations of its name that serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceReplicas {
    /// Its name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// Its public port.
    pub port: u16,
    /// The registrations serving it.
    pub replicas: Vec<ReplicaInfo>,
}

/// One agent's registration of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaInfo {
    /// The agent's tunnel.
    pub tunnel_id: Uuid,
    /// The agent's stable client id.
    pub client_id: Uuid,
    /// The agent's address.
    pub client_addr: SocketAddr,
    /// Streams (UDP: flows) open through it now.
    pub open_streams: u64,
    /// Payload bytes from visitors to it.
    pub bytes_in: u64,
    /// Payload bytes from it to visitors.
    pub bytes_out: u64,
    /// False while its agent's health checks fail: it gets no new visitor.
    pub healthy: bool,
}

/// The tunnels' services grouped by public port, ordered by port.
pub fn replicas(tunnels: &[TunnelInfo]) -> Vec<ServiceReplicas> {
    let mut services: Vec<ServiceReplicas> = Vec::new();
    for tunnel in tunnels {
        for service in &tunnel.services {
            let replica = ReplicaInfo {
                tunnel_id: tunnel.id,
                client_id: tunnel.client_id,
                client_addr: tunnel.client_addr,
                open_streams: service.stats.connections_active,
                bytes_in: service.stats.bytes_in,
                bytes_out: service.stats.bytes_out,
                healthy: service.healthy,
            };
            match services.iter_mut().find(|s| s.port == service.port) {
                Some(known) => known.replicas.push(replica),
                None => services.push(ServiceReplicas {
                    name: service.name.clone(),
                    protocol: service.protocol,
                    port: service.port,
                    replicas: vec![replica],
                }),
            }
        }
    }
    services.sort_by_key(|s| s.port);
    services
}

/// What the server's admission limits did, in the same format (appended to
/// [`render_metrics`]'s text by the admin listener).
///
/// ```
/// let text = zlayer_tunnel::status::render_guard_metrics(&Default::default());
/// assert!(text.contains("zlayer_tunnel_remote_events_total{event=\"auth_evicted\"} 0\n"));
/// ```
pub fn render_guard_metrics(guards: &GuardSnapshot) -> String {
    let mut out = String::new();
    gauge(
        &mut out,
        "zlayer_tunnel_awaiting_auth",
        "Control connections awaiting authentication.",
        guards.awaiting_auth,
    );
    counter(
        &mut out,
        "zlayer_tunnel_accept_pauses_total",
        "Times a public port paused accepting because its tunnel was not taking visitors.",
        guards.accept_pauses,
    );
    let name = "zlayer_tunnel_remote_events_total";
    out.push_str(&format!(
        "# HELP {name} What remote parties made happen, by kind (logged at most once a second each).\n# TYPE {name} counter\n"
    ));
    for kind in crate::log_limit::RemoteEvent::ALL {
        let count = guards.remote_events[kind.index()];
        out.push_str(&format!("{name}{{event=\"{}\"}} {count}\n", kind.name()));
    }
    out
}

/// Renders the Prometheus text exposition format (version 0.0.4).
///
/// ```
/// let text = zlayer_tunnel::status::render_metrics(&[], 10);
/// assert!(text.contains("zlayer_tunnel_tunnels 0\n"));
/// ```
pub fn render_metrics(tunnels: &[TunnelInfo], free_ports: usize) -> String {
    let mut out = String::new();
    gauge(
        &mut out,
        "zlayer_tunnel_tunnels",
        "Connected tunnels: agents' links (2 per agent by default, its connections setting).",
        tunnels.len() as u64,
    );
    gauge(
        &mut out,
        "zlayer_tunnel_free_ports",
        "Free public ports.",
        free_ports as u64,
    );
    // replicas of one service share its name and port: the agent's client
    // id tells their series apart
    let services: Vec<(&ServiceInfo, Option<Uuid>)> = (tunnels.iter())
        .flat_map(|t| t.services.iter().map(|s| (s, Some(t.client_id))))
        .collect();
    render_services(&mut out, &services);
    let name = "zlayer_tunnel_replica_healthy";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while a replica passes its agent's health checks (or has none), 0 while it gets no new visitor.\n# TYPE {name} gauge"
    );
    for (service, client) in &services {
        let _ = writeln!(
            out,
            "{name}{{{}}} {}",
            labels(service, *client, ""),
            u64::from(service.healthy)
        );
    }
    out
}

/// Where an agent's (or a node tunnel's) link to its server stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TunnelState {
    /// Dialing, authenticating and registering, the first time.
    Connecting,
    /// Authenticated, every service registered.
    Connected {
        /// Since when (seconds since the Unix epoch in JSON).
        #[serde(serialize_with = "unix_seconds")]
        since: SystemTime,
    },
    /// The link failed; the next attempt is scheduled.
    Reconnecting {
        /// Why the last link ended or could not be made.
        last_error: String,
        /// Retrying soon cannot fix it (a certificate not trusted, a server
        /// that does not speak TLS): attempts come at the longest delay.
        permanent: bool,
        /// When the next attempt starts (seconds since the Unix epoch in JSON).
        #[serde(serialize_with = "unix_seconds")]
        next_attempt: SystemTime,
    },
    /// A fault that retrying cannot fix (the server refused the token).
    Failed {
        /// The fault.
        error: String,
    },
    /// Stopped on request.
    Stopped,
}

/// What an agent reports about itself: its session with the server, if
/// connected, and its services with their public ports and live counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentStatus {
    /// The server's control URL.
    pub server_url: String,
    /// The agent's stable client id.
    pub client_id: Uuid,
    /// True while authenticated to the server.
    pub connected: bool,
    /// Where the link stands.
    pub state: TunnelState,
    /// The tunnel id the server gave this session.
    pub tunnel_id: Option<Uuid>,
    /// When this session authenticated (seconds since the Unix epoch in JSON).
    #[serde(serialize_with = "unix_seconds_opt")]
    pub connected_since: Option<SystemTime>,
    /// Services registered in this session (`port`: the public port).
    pub services: Vec<ServiceInfo>,
    /// The agent's traffic since it started (all sessions).
    pub stats: Snapshot,
    /// Each server the agent links to (the first is the one above).
    pub links: Vec<LinkStatus>,
    /// Services the server above refuses now (each is asked for again).
    pub refused: Vec<RefusedService>,
}

/// A service a server refuses to register, as the agent last heard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedService {
    /// The service's name.
    pub name: String,
    /// The server's reason.
    pub reason: String,
    /// The server said asking again soon cannot help (the token's scope, a
    /// port another process holds): it is asked for at the longest delay.
    pub lasting: bool,
}

/// One of an agent's links: a server and where the link to it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkStatus {
    /// The server's control URL.
    pub server_url: String,
    /// Which of the agent's links to that server (0 for the first; more
    /// with `connections`).
    pub connection: usize,
    /// True while authenticated to it.
    pub connected: bool,
    /// Where the link stands (`last_error` when reconnecting).
    pub state: TunnelState,
    /// When this session authenticated (seconds since the Unix epoch in JSON).
    #[serde(serialize_with = "unix_seconds_opt")]
    pub connected_since: Option<SystemTime>,
    /// Services registered on it, with their public ports there.
    pub services: Vec<ServiceInfo>,
    /// Services it refuses now.
    pub refused: Vec<RefusedService>,
}

fn unix_seconds_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => unix_seconds(t, s),
        None => s.serialize_none(),
    }
}

/// Renders an agent's metrics (Prometheus text format, version 0.0.4).
pub fn render_agent_metrics(status: &AgentStatus) -> String {
    let mut out = String::new();
    let name = "zlayer_tunnel_agent_connected";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while the agent is authenticated to the server.\n# TYPE {name} gauge"
    );
    for link in &status.links {
        let server = escape(&link.server_url);
        let _ = writeln!(
            out,
            "{name}{{server=\"{server}\",connection=\"{}\"}} {}",
            link.connection,
            u8::from(link.connected)
        );
    }
    let name = "zlayer_tunnel_agent_drops_total";
    let _ = writeln!(
        out,
        "# HELP {name} Datagrams the agent dropped, by reason: its services' and those of no service (a cluster's forwarded flows).\n# TYPE {name} counter"
    );
    for kind in DropKind::ALL {
        let (reason, value) = (kind.name(), status.stats.drops_by_kind[kind.index()]);
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {value}");
    }
    let services: Vec<(&ServiceInfo, Option<Uuid>)> =
        status.services.iter().map(|s| (s, None)).collect();
    render_services(&mut out, &services);
    out
}

/// Renders node tunnels' metrics (Prometheus text format, version 0.0.4):
/// state (1 while connected), bytes each way, connections.
pub fn render_node_tunnel_metrics(tunnels: &[crate::node::NodeTunnelStatus]) -> String {
    let mut out = String::new();
    let rows: Vec<(String, bool, Snapshot)> = tunnels
        .iter()
        .map(|t| {
            let labels = format!(
                "tunnel=\"{}\",from=\"{}\",to=\"{}\"",
                escape(&t.name),
                escape(&t.from_node),
                escape(&t.to_node)
            );
            let up = matches!(t.state, TunnelState::Connected { .. });
            (labels, up, t.stats)
        })
        .collect();
    render_scoped(&mut out, "zlayer_tunnel_node_tunnel", "node tunnel", &rows);
    out
}

/// Renders access sessions' metrics (Prometheus text format, version 0.0.4):
/// 1 while the session lives, bytes each way, connections.
pub fn render_access_metrics(sessions: &[crate::access::AccessSessionInfo]) -> String {
    let mut out = String::new();
    let rows: Vec<(String, bool, Snapshot)> = sessions
        .iter()
        .map(|s| {
            let labels = format!(
                "session=\"{}\",endpoint=\"{}\",local=\"{}\"",
                s.id,
                escape(&s.endpoint),
                s.local_addr
            );
            (labels, !s.expired, s.stats)
        })
        .collect();
    render_scoped(
        &mut out,
        "zlayer_tunnel_access_session",
        "access session",
        &rows,
    );
    out
}

/// `<prefix>_up`, `<prefix>_bytes_total{direction}`, `<prefix>_connections`
/// and `<prefix>_connections_total` for labelled rows.
fn render_scoped(out: &mut String, prefix: &str, what: &str, rows: &[(String, bool, Snapshot)]) {
    let _ = writeln!(
        out,
        "# HELP {prefix}_up 1 while the {what} is up.\n# TYPE {prefix}_up gauge"
    );
    for (labels, up, _) in rows {
        let _ = writeln!(out, "{prefix}_up{{{labels}}} {}", u8::from(*up));
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_bytes_total Payload bytes through a {what}.\n# TYPE {prefix}_bytes_total counter"
    );
    for (labels, _, stats) in rows {
        let _ = writeln!(
            out,
            "{prefix}_bytes_total{{{labels},direction=\"in\"}} {}",
            stats.bytes_in
        );
        let _ = writeln!(
            out,
            "{prefix}_bytes_total{{{labels},direction=\"out\"}} {}",
            stats.bytes_out
        );
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections Open connections of a {what}.\n# TYPE {prefix}_connections gauge"
    );
    for (labels, _, stats) in rows {
        let _ = writeln!(
            out,
            "{prefix}_connections{{{labels}}} {}",
            stats.connections_active
        );
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_total Connections of a {what}.\n# TYPE {prefix}_connections_total counter"
    );
    for (labels, _, stats) in rows {
        let _ = writeln!(
            out,
            "{prefix}_connections_total{{{labels}}} {}",
            stats.connections_total
        );
    }
}

/// The per-service families, shared by server (with each registration's
/// client id) and agent (without).
fn render_services(out: &mut String, services: &[(&ServiceInfo, Option<Uuid>)]) {
    let families: [Family; 4] = [
        (
            "zlayer_tunnel_service_bytes_total",
            "counter",
            "Payload bytes through a service.",
            |s| vec![("in", s.bytes_in), ("out", s.bytes_out)],
        ),
        (
            "zlayer_tunnel_service_connections",
            "gauge",
            "Open connections (UDP: flows) of a service.",
            |s| vec![("", s.connections_active)],
        ),
        (
            "zlayer_tunnel_service_connections_total",
            "counter",
            "Connections a service accepted.",
            |s| vec![("", s.connections_total)],
        ),
        (
            "zlayer_tunnel_service_datagrams_total",
            "counter",
            "UDP datagrams through a service.",
            |s| vec![("in", s.datagrams_in), ("out", s.datagrams_out)],
        ),
    ];
    for (name, kind, help, values) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for &(service, client) in services {
            for (direction, value) in values(&service.stats) {
                let labels = labels(service, client, direction);
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    }
    let name = "zlayer_tunnel_service_drops_total";
    let _ = writeln!(
        out,
        "# HELP {name} Datagrams a service dropped, by reason.\n# TYPE {name} counter"
    );
    for &(service, client) in services {
        let labels = labels(service, client, "");
        for kind in DropKind::ALL {
            let (reason, value) = (kind.name(), service.stats.drops_by_kind[kind.index()]);
            let _ = writeln!(out, "{name}{{{labels},reason=\"{reason}\"}} {value}");
        }
    }
    let name = "zlayer_tunnel_visitors_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} Visitors a service's address lists refused, by reason.\n# TYPE {name} counter"
    );
    for &(service, client) in services {
        let labels = labels(service, client, "");
        for why in Refusal::ALL {
            let (reason, value) = (why.name(), service.stats.visitors_refused[why.index()]);
            let _ = writeln!(out, "{name}{{{labels},reason=\"{reason}\"}} {value}");
        }
    }
}

/// A metric family: name, type, help, and its labelled values from a snapshot.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Snapshot) -> Vec<(&'static str, u64)>,
);

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn labels(service: &ServiceInfo, client: Option<Uuid>, direction: &str) -> String {
    let mut labels = format!(
        "service=\"{}\",protocol=\"{}\",port=\"{}\"",
        escape(&service.name),
        service.protocol,
        service.port
    );
    if let Some(client) = client {
        let _ = write!(labels, ",client_id=\"{client}\"");
    }
    if !direction.is_empty() {
        let _ = write!(labels, ",direction=\"{direction}\"");
    }
    labels
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel() -> TunnelInfo {
        TunnelInfo {
            id: Uuid::nil(),
            client_id: Uuid::nil(),
            client_addr: ([127, 0, 0, 1], 5000).into(),
            connected_since: UNIX_EPOCH,
            ports: vec![30000],
            services: vec![ServiceInfo {
                id: Uuid::nil(),
                name: "s\"sh".into(),
                protocol: ServiceProtocol::Tcp,
                port: 30000,
                stats: Snapshot {
                    bytes_in: 1234,
                    bytes_out: 99,
                    connections_active: 1,
                    connections_total: 3,
                    ..Snapshot::default()
                },
                flows: Vec::new(),
                healthy: true,
                visitors: Default::default(),
                visitor_rate: None,
                bandwidth: None,
            }],
            stats: Snapshot::default(),
        }
    }

    #[test]
    fn metrics_carry_labels_and_values() {
        let text = render_metrics(&[tunnel()], 7);
        assert!(text.contains("zlayer_tunnel_tunnels 1\n"));
        assert!(text.contains("zlayer_tunnel_free_ports 7\n"));
        assert!(text.contains(
            "zlayer_tunnel_service_bytes_total{service=\"s\\\"sh\",protocol=\"tcp\",port=\"30000\",client_id=\"00000000-0000-0000-0000-000000000000\",direction=\"in\"} 1234\n"
        ));
        assert!(text.contains("zlayer_tunnel_service_connections_total{service=\"s\\\"sh\",protocol=\"tcp\",port=\"30000\",client_id=\"00000000-0000-0000-0000-000000000000\"} 3\n"));
        assert!(text.contains("# TYPE zlayer_tunnel_service_bytes_total counter\n"));
    }

    #[test]
    fn status_is_json_with_unix_times() {
        let tunnels = [tunnel()];
        let json = serde_json::to_value(StatusReport {
            cluster: None,
            tunnels: &tunnels,
            services: replicas(&tunnels),
            free_ports: 0,
            guards: GuardSnapshot::default(),
        })
        .unwrap();
        assert_eq!(json["guards"]["awaiting_auth"], 0);
        assert_eq!(json["tunnels"][0]["connected_since"], 0);
        assert_eq!(json["tunnels"][0]["services"][0]["stats"]["bytes_in"], 1234);
        assert_eq!(json["tunnels"][0]["client_addr"], "127.0.0.1:5000");
        assert_eq!(json["services"][0]["port"], 30000);
        assert_eq!(json["services"][0]["replicas"][0]["open_streams"], 1);
    }

    #[test]
    fn replicas_of_one_port_are_grouped() {
        let mut second = tunnel();
        second.id = Uuid::from_u128(2);
        second.client_id = Uuid::from_u128(2);
        let services = replicas(&[tunnel(), second]);
        assert_eq!(services.len(), 1);
        let ids: Vec<Uuid> = services[0].replicas.iter().map(|r| r.client_id).collect();
        assert_eq!(ids, [Uuid::nil(), Uuid::from_u128(2)]);
    }
}
