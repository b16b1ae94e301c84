//! The server's tunnels as data: which are open (by id, and by token hash and
//! client id, so that a reconnecting agent takes its old tunnel over), how
//! many may be, which ones stopped reporting (the watchdog), the public ports
//! each holds, and the services each registered (where a relayed access
//! stream for a service name goes). The `Registry` actor carries out what it
//! decides; `T` is what the actor keeps of each tunnel (its channel's
//! address, counters, ...).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::liveness::Liveness;
use crate::ports::{PortError, PortPool};
use crate::protocol::{RegisterRefusal, ServiceProtocol};

/// Why the registry refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The server holds its maximum of tunnels.
    #[error("server is at its limit of {max} tunnels")]
    TooManyTunnels {
        /// The limit.
        max: usize,
    },
    /// The tunnel is no longer registered (it was closed or taken over).
    #[error("tunnel is no longer registered")]
    UnknownTunnel,
    /// A port could not be allocated.
    #[error(transparent)]
    Port(#[from] PortError),
    /// Another agent's tunnel already registered a service of this name, and
    /// this one may not join it as a replica (another token, whose scope
    /// does not name the service).
    #[error(
        "service {name:?} is already registered on this server by another agent; to add a replica of it, use that agent's token or one whose register scope names {name:?}"
    )]
    NameTaken {
        /// The name.
        name: String,
    },
    /// A replica asked for another public port than its service has.
    #[error(
        "service {name:?} already has public port {port}; a replica must ask for {port} or for 0"
    )]
    PortMismatch {
        /// The service.
        name: String,
        /// The port it has.
        port: u16,
    },
    /// A replica of another protocol than its service.
    #[error("service {name:?} is registered as {protocol}; a replica must be {protocol} too")]
    ProtocolMismatch {
        /// The service.
        name: String,
        /// Its protocol.
        protocol: ServiceProtocol,
    },
    /// A replica's token may not be given the service's port.
    #[error("service {name:?} has public port {port}, which this agent's token may not use")]
    PortOutsideScope {
        /// The service.
        name: String,
        /// Its port.
        port: u16,
    },
}

impl RegistryError {
    /// Whether asking again soon can help: a port or a place another
    /// agent holds may free; what the request or its token asks cannot.
    pub fn refusal(&self) -> RegisterRefusal {
        match self {
            Self::TooManyTunnels { .. }
            | Self::UnknownTunnel
            | Self::Port(
                PortError::Taken(_) | PortError::Exhausted { .. } | PortError::NoneAllowed { .. },
            ) => RegisterRefusal::Later,
            Self::Port(_)
            | Self::NameTaken { .. }
            | Self::PortMismatch { .. }
            | Self::ProtocolMismatch { .. }
            | Self::PortOutsideScope { .. } => RegisterRefusal::Lasting,
        }
    }
}

/// What a registration asks of [`TunnelTable::allocate`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The service's name.
    pub name: &'a str,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// The public port asked for; 0: any.
    pub requested: u16,
    /// The ports the tunnel's token may use (`None`: any in the range).
    pub allowed: Option<&'a [(u16, u16)]>,
    /// The token's register scope names the service explicitly: it may join
    /// another token's registration of it as a replica.
    pub named_in_scope: bool,
}

/// A port [`TunnelTable::allocate`] gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// A port of the service's own: the first registration of the name.
    New(u16),
    /// The port of the service another tunnel registered: a replica.
    Joined(u16),
}

impl Granted {
    /// The port, either way.
    pub fn port(self) -> u16 {
        match self {
            Self::New(port) | Self::Joined(port) => port,
        }
    }
}

/// What identifies an agent across its reconnects: its token's hash and its client id.
pub type AgentKey = (String, Uuid);

/// A service a tunnel registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredService {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// Its public port.
    pub port: u16,
    /// Who may visit it.
    pub visitors: crate::visitor_rules::ServiceRules,
    /// New connections a second one visitor address may open (none: no limit).
    pub visitor_rate: Option<u32>,
    /// Bytes a second each way, all its streams together (none: no limit).
    pub bandwidth: Option<u64>,
}

/// A tunnel that ended: what its owner must close, and the ports it gave back.
#[derive(Debug)]
pub struct ClosedTunnel<T> {
    /// Its id.
    pub id: Uuid,
    /// What the owner kept of it.
    pub io: T,
    /// The public ports it held, now free.
    pub ports: Vec<u16>,
}

#[derive(Debug)]
struct Entry<T> {
    key: AgentKey,
    /// When it opened: of an agent's links, the newest gives way first.
    opened: Instant,
    liveness: Liveness,
    ports: Vec<u16>,
    /// The service each port was allocated for.
    names: Vec<Named>,
    services: Vec<RegisteredService>,
    io: T,
}

/// A port's service, as its tunnel claimed it.
#[derive(Debug)]
struct Named {
    name: String,
    port: u16,
    protocol: ServiceProtocol,
}

/// The tunnels of one server.
#[derive(Debug)]
pub struct TunnelTable<T> {
    ports: Result<PortPool, PortError>,
    tunnels: HashMap<Uuid, Entry<T>>,
    by_agent: HashMap<AgentKey, Uuid>,
}

/// The answer to [`TunnelTable::open`].
#[derive(Debug)]
pub struct Opened<T> {
    /// The agent's previous tunnel, taken over (closed) first, if it had one.
    pub taken_over: Option<ClosedTunnel<T>>,
    /// Another agent's extra link, closed to make room at the limit of
    /// tunnels for an agent that had none.
    pub displaced: Option<ClosedTunnel<T>>,
    /// Whether the new tunnel is open.
    pub result: Result<(), RegistryError>,
}

impl<T> TunnelTable<T> {
    /// No tunnels; public ports from `range` (an invalid range refuses every allocation).
    pub fn new(range: (u16, u16)) -> Self {
        Self {
            ports: PortPool::new(range),
            tunnels: HashMap::new(),
            by_agent: HashMap::new(),
        }
    }

    /// Open tunnels.
    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    /// True when no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }

    /// Opens tunnel `id` for `agent` at `now`, silent for at most `timeout`.
    /// The agent's previous tunnel, if it still has one (a half-dead
    /// connection), is taken over first: closed, its ports freed. At `max`
    /// tunnels, an agent that has none displaces the newest link of the
    /// agent with the most (`connections`: that agent keeps the others);
    /// anyone else is refused.
    pub fn open(
        &mut self,
        id: Uuid,
        agent: AgentKey,
        io: T,
        (now, timeout): (Instant, Duration),
        max: usize,
    ) -> Opened<T> {
        let taken_over = (self.by_agent.get(&agent).copied()).and_then(|old| self.close(old));
        let mut displaced = None;
        if self.tunnels.len() >= max {
            displaced = self
                .extra_link_for(&agent)
                .and_then(|extra| self.close(extra));
            if displaced.is_none() {
                let result = Err(RegistryError::TooManyTunnels { max });
                return Opened {
                    taken_over,
                    displaced,
                    result,
                };
            }
        }
        let entry = Entry {
            key: agent.clone(),
            opened: now,
            liveness: Liveness::new(now, timeout),
            ports: Vec::new(),
            names: Vec::new(),
            services: Vec::new(),
            io,
        };
        self.by_agent.insert(agent, id);
        self.tunnels.insert(id, entry);
        Opened {
            taken_over,
            displaced,
            result: Ok(()),
        }
    }

    /// The tunnel that gives way to `arriving` at the limit: none when the
    /// arriving link's agent already has one (an extra link waits its
    /// turn); else the newest link of the agent with the most links, if
    /// any has two (an agent is its token and `replicas::agent_of` its
    /// client id).
    fn extra_link_for(&self, arriving: &AgentKey) -> Option<Uuid> {
        let agent = |(hash, client): &AgentKey| (hash.clone(), crate::replicas::agent_of(*client));
        let mut links: HashMap<(String, Uuid), Vec<(Instant, Uuid)>> = HashMap::new();
        for (id, entry) in &self.tunnels {
            let group = links.entry(agent(&entry.key)).or_default();
            group.push((entry.opened, *id));
        }
        if links.contains_key(&agent(arriving)) {
            return None;
        }
        let most = links
            .into_values()
            .filter(|l| l.len() > 1)
            .max_by_key(Vec::len)?;
        most.into_iter().max().map(|(_, id)| id)
    }

    /// Tunnel `id` reported at `now`.
    pub fn alive(&mut self, id: Uuid, now: Instant) {
        if let Some(entry) = self.tunnels.get_mut(&id) {
            entry.liveness.seen(now);
        }
    }

    /// Closes the tunnels that stopped reporting (a frozen channel) by `now`.
    pub fn close_silent(&mut self, now: Instant) -> Vec<ClosedTunnel<T>> {
        let silent: Vec<Uuid> = (self.tunnels.iter())
            .filter(|(_, t)| t.liveness.is_expired(now))
            .map(|(id, _)| *id)
            .collect();
        silent.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Closes tunnel `id` and frees its ports (a port a replica of another
    /// tunnel still holds stays taken).
    pub fn close(&mut self, id: Uuid) -> Option<ClosedTunnel<T>> {
        let entry = self.tunnels.remove(&id)?;
        if self.by_agent.get(&entry.key) == Some(&id) {
            self.by_agent.remove(&entry.key);
        }
        let freed: Vec<u16> = (entry.ports.iter().copied())
            .filter(|p| self.free_if_unheld(*p))
            .collect();
        Some(ClosedTunnel {
            id,
            io: entry.io,
            ports: freed,
        })
    }

    /// Gives `port` back to the pool unless a tunnel still holds it.
    fn free_if_unheld(&mut self, port: u16) -> bool {
        if self.tunnels.values().any(|t| t.ports.contains(&port)) {
            return false;
        }
        if let Ok(pool) = self.ports.as_mut() {
            pool.release(port);
        }
        true
    }

    /// Closes the tunnels of the tokens whose hashes are `hashes` (revoked).
    pub fn close_of_tokens(&mut self, hashes: &[String]) -> Vec<ClosedTunnel<T>> {
        let ids: Vec<Uuid> = (self.by_agent.iter())
            .filter(|((hash, _), _)| hashes.contains(hash))
            .map(|(_, id)| *id)
            .collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Closes every tunnel (shutdown).
    pub fn close_all(&mut self) -> Vec<ClosedTunnel<T>> {
        let ids: Vec<Uuid> = self.tunnels.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// A public port for a service of tunnel `id`: `claim.requested` (0:
    /// the lowest free), from `claim.allowed` when its token is scoped to
    /// some ports. A name another tunnel holds is joined as a replica when
    /// the same token or a scope naming it asks, on the same port and
    /// protocol; otherwise refused. One tunnel's second registration of a
    /// name is the session's to refuse, before it gets here.
    pub fn allocate(&mut self, id: Uuid, claim: Claim<'_>) -> Result<Granted, RegistryError> {
        let token = &(self.tunnels.get(&id))
            .ok_or(RegistryError::UnknownTunnel)?
            .key
            .0;
        let held = self.tunnels.iter().find_map(|(other, t)| {
            let named = t.names.iter().find(|n| n.name == claim.name)?;
            (*other != id).then_some((named.port, named.protocol, t.key.0 == *token))
        });
        let granted = match held {
            Some((port, protocol, same_token)) => {
                joinable(&claim, port, protocol, same_token)?;
                Granted::Joined(port)
            }
            None => {
                let pool = self.ports.as_mut().map_err(|e| e.clone())?;
                Granted::New(match claim.allowed {
                    Some(allowed) => pool.allocate_within(claim.requested, allowed)?,
                    None => pool.allocate(claim.requested)?,
                })
            }
        };
        let entry = self
            .tunnels
            .get_mut(&id)
            .ok_or(RegistryError::UnknownTunnel)?;
        entry.ports.push(granted.port());
        entry.names.push(Named {
            name: claim.name.to_owned(),
            port: granted.port(),
            protocol: claim.protocol,
        });
        Ok(granted)
    }

    /// Tunnel `id` gives `port` back (its service was unregistered or not
    /// listened on); the service on it, if any, is forgotten.
    pub fn release(&mut self, id: Uuid, port: u16) {
        let Some(entry) = self.tunnels.get_mut(&id) else {
            return;
        };
        if !entry.ports.contains(&port) {
            return; // never ours: another tunnel's port stays taken
        }
        entry.ports.retain(|p| *p != port);
        entry.names.retain(|n| n.port != port);
        entry.services.retain(|s| s.port != port);
        self.free_if_unheld(port);
    }

    /// Tunnel `id` registered `service` (on a port it holds).
    pub fn registered(&mut self, id: Uuid, service: RegisteredService) {
        if let Some(entry) = self.tunnels.get_mut(&id) {
            entry.services.push(service);
        }
    }

    /// The tunnel that registered service `name` over `protocol`, if one did.
    pub fn find_service(&self, name: &str, protocol: ServiceProtocol) -> Option<(Uuid, &T)> {
        self.tunnels.iter().find_map(|(id, t)| {
            let has = (t.services.iter()).any(|s| s.name == name && s.protocol == protocol);
            has.then_some((*id, &t.io))
        })
    }

    /// Public ports free.
    pub fn free_ports(&self) -> usize {
        self.ports.as_ref().map_or(0, PortPool::available)
    }

    /// Every open tunnel: its id, what the owner keeps, its ports and services.
    pub fn iter(&self) -> impl Iterator<Item = (Uuid, &T, &[u16], &[RegisteredService])> {
        (self.tunnels.iter()).map(|(id, t)| (*id, &t.io, &t.ports[..], &t.services[..]))
    }

    /// What the owner keeps of tunnel `id`.
    pub fn get(&self, id: Uuid) -> Option<&T> {
        self.tunnels.get(&id).map(|t| &t.io)
    }

    /// What the owner keeps of tunnel `id`, to change.
    pub fn get_mut(&mut self, id: Uuid) -> Option<&mut T> {
        self.tunnels.get_mut(&id).map(|t| &mut t.io)
    }
}

/// Whether a claim may join the service on `port` as a replica.
fn joinable(
    claim: &Claim<'_>,
    port: u16,
    protocol: ServiceProtocol,
    same_token: bool,
) -> Result<(), RegistryError> {
    let name = claim.name.to_owned();
    if !same_token && !claim.named_in_scope {
        return Err(RegistryError::NameTaken { name });
    }
    if protocol != claim.protocol {
        return Err(RegistryError::ProtocolMismatch { name, protocol });
    }
    if claim.requested != 0 && claim.requested != port {
        return Err(RegistryError::PortMismatch { name, port });
    }
    if claim
        .allowed
        .is_some_and(|ranges| !crate::ports::in_ranges(ranges, port))
    {
        return Err(RegistryError::PortOutsideScope { name, port });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn agent(n: u128) -> AgentKey {
        ("hash".to_owned(), Uuid::from_u128(n))
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(1000 + n)
    }

    /// A TCP claim of `name` on `port` by tunnel `id`, unscoped.
    fn alloc(
        t: &mut TunnelTable<impl Sized>,
        id: Uuid,
        name: &str,
        port: u16,
    ) -> Result<u16, RegistryError> {
        claim(t, id, name, port, ServiceProtocol::Tcp, false).map(Granted::port)
    }

    fn claim(
        t: &mut TunnelTable<impl Sized>,
        id: Uuid,
        name: &str,
        requested: u16,
        protocol: ServiceProtocol,
        named_in_scope: bool,
    ) -> Result<Granted, RegistryError> {
        let claim = Claim {
            name,
            protocol,
            requested,
            allowed: None,
            named_in_scope,
        };
        t.allocate(id, claim)
    }

    fn other_token(n: u128) -> AgentKey {
        ("other".to_owned(), Uuid::from_u128(n))
    }

    fn service(name: &str, port: u16) -> RegisteredService {
        RegisteredService {
            id: Uuid::from_u128(u128::from(port)),
            name: name.to_owned(),
            protocol: ServiceProtocol::Tcp,
            port,
            visitors: crate::visitor_rules::ServiceRules::default(),
            visitor_rate: None,
            bandwidth: None,
        }
    }

    #[test]
    fn revoking_a_token_closes_its_tunnels_only() {
        let mut t = TunnelTable::new((5000, 5010));
        let now = Instant::now();
        t.open(id(1), agent(1), "a", (now, S), 10);
        t.open(
            id(2),
            ("other".into(), Uuid::from_u128(2)),
            "b",
            (now, S),
            10,
        );
        let hash = agent(1).0;
        let closed = t.close_of_tokens(&[hash]);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].id, id(1));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_reconnecting_agent_takes_its_tunnel_and_ports_over() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_001));
        assert!(
            t.open(id(1), agent(7), "old", (now, 10 * S), 10)
                .result
                .is_ok()
        );
        assert_eq!(alloc(&mut t, id(1), "svc1", 30_001), Ok(30_001));
        let opened = t.open(id(2), agent(7), "new", (now, 10 * S), 10);
        let old = opened.taken_over.expect("the old tunnel is taken over");
        assert_eq!((old.id, old.io, old.ports), (id(1), "old", vec![30_001]));
        // the new tunnel asks for the port it had, and gets it
        assert_eq!(alloc(&mut t, id(2), "svc2", 30_001), Ok(30_001));
        assert_eq!(t.len(), 1);
        // another agent of the same token is another tunnel
        assert!(
            t.open(id(3), agent(8), "other", (now, 10 * S), 10)
                .taken_over
                .is_none()
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_tunnel_limit_refuses_but_a_takeover_frees_its_place_first() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_009));
        assert!(t.open(id(1), agent(1), (), (now, S), 1).result.is_ok());
        let refused = t.open(id(2), agent(2), (), (now, S), 1);
        assert_eq!(
            refused.result,
            Err(RegistryError::TooManyTunnels { max: 1 })
        );
        assert_eq!(t.len(), 1);
        let again = t.open(id(3), agent(1), (), (now, S), 1);
        assert!(again.taken_over.is_some() && again.result.is_ok());
    }

    #[test]
    fn at_the_limit_an_agent_without_a_link_displaces_anothers_newest_extra_one() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_009));
        let a = 0x100_u128; // agent A's first link; its extra link is a ^ 1
        let (b, c) = (0x200_u128, 0x300_u128);
        let open = |t: &mut TunnelTable<()>, n: u128, key: u128, at: Duration| {
            t.open(id(n), agent(key), (), (now + at, S), 3)
        };
        assert!(open(&mut t, 1, a, Duration::ZERO).result.is_ok());
        assert!(open(&mut t, 2, a ^ 1, S).result.is_ok());
        assert!(open(&mut t, 3, b, S).result.is_ok());
        // C has no link: A's newest link gives way
        let opened = open(&mut t, 4, c, 2 * S);
        assert!(opened.result.is_ok());
        assert_eq!(opened.displaced.map(|d| d.id), Some(id(2)));
        assert_eq!(t.len(), 3);
        // now no agent has two: a newcomer is refused, and so is an extra link
        let refused = open(&mut t, 5, 0x400, 3 * S);
        assert!(refused.result.is_err() && refused.displaced.is_none());
        let extra = open(&mut t, 6, b ^ 1, 3 * S);
        assert!(extra.result.is_err() && extra.displaced.is_none());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn the_watchdog_closes_silent_tunnels_and_frees_their_ports() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_000));
        t.open(id(1), agent(1), (), (now, 10 * S), 10);
        t.open(id(2), agent(2), (), (now, 10 * S), 10);
        assert_eq!(alloc(&mut t, id(1), "svc1", 0), Ok(30_000));
        assert!(alloc(&mut t, id(2), "svc2", 0).is_err(), "one port in all");
        t.alive(id(2), now + 5 * S);
        assert!(t.close_silent(now + 9 * S).is_empty());
        let closed = t.close_silent(now + 10 * S);
        assert_eq!(closed.iter().map(|c| c.id).collect::<Vec<_>>(), [id(1)]);
        assert_eq!(
            alloc(&mut t, id(2), "svc2", 0),
            Ok(30_000),
            "its port is free again"
        );
        assert_eq!(t.close_silent(now + 15 * S).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn services_are_found_by_name_and_go_with_their_port() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_009));
        t.open(id(1), agent(1), "a", (now, S), 10);
        let port = alloc(&mut t, id(1), "svc1", 0).unwrap();
        t.registered(id(1), service("db", port));
        assert_eq!(
            t.find_service("db", ServiceProtocol::Tcp),
            Some((id(1), &"a"))
        );
        assert_eq!(t.find_service("web", ServiceProtocol::Tcp), None);
        // a port another tunnel holds is not released by this one
        t.open(id(2), other_token(2), "b", (now, S), 10);
        t.release(id(2), port);
        assert!(t.find_service("db", ServiceProtocol::Tcp).is_some());
        t.release(id(1), port);
        assert_eq!(t.find_service("db", ServiceProtocol::Tcp), None);
        assert_eq!(t.free_ports(), 10);
        assert_eq!(
            alloc(&mut t, id(9), "svc9", 0),
            Err(RegistryError::UnknownTunnel)
        );
        // one name, one service across the server's tunnels
        let port = alloc(&mut t, id(1), "web", 0).unwrap();
        let taken = RegistryError::NameTaken {
            name: "web".to_owned(),
        };
        assert_eq!(alloc(&mut t, id(2), "web", 0), Err(taken));
        t.release(id(1), port);
        assert!(
            alloc(&mut t, id(2), "web", 0).is_ok(),
            "free again once released"
        );
    }

    #[test]
    fn a_second_agent_of_the_same_token_joins_the_service_as_a_replica() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_009));
        t.open(id(1), agent(1), (), (now, S), 10);
        t.open(id(2), agent(2), (), (now, S), 10);
        t.open(id(3), other_token(3), (), (now, S), 10);
        assert_eq!(
            claim(&mut t, id(1), "web", 0, ServiceProtocol::Tcp, false),
            Ok(Granted::New(30_000))
        );
        assert_eq!(
            claim(&mut t, id(2), "web", 0, ServiceProtocol::Tcp, false),
            Ok(Granted::Joined(30_000))
        );
        // another token joins only when its scope names the service
        assert!(matches!(
            claim(&mut t, id(3), "web", 0, ServiceProtocol::Tcp, false),
            Err(RegistryError::NameTaken { .. })
        ));
        assert_eq!(
            claim(&mut t, id(3), "web", 30_000, ServiceProtocol::Tcp, true),
            Ok(Granted::Joined(30_000))
        );
        // the port stays taken while one replica holds it
        assert_eq!(t.close(id(1)).map(|c| c.ports), Some(vec![]));
        t.release(id(2), 30_000);
        assert_eq!(t.free_ports(), 9);
        assert_eq!(t.close(id(3)).map(|c| c.ports), Some(vec![30_000]));
        assert_eq!(t.free_ports(), 10);
    }

    #[test]
    fn a_replica_must_match_the_service_port_protocol_and_scope() {
        let now = Instant::now();
        let mut t = TunnelTable::new((30_000, 30_009));
        t.open(id(1), agent(1), (), (now, S), 10);
        t.open(id(2), agent(2), (), (now, S), 10);
        assert_eq!(alloc(&mut t, id(1), "db", 30_005), Ok(30_005));
        let wrong_port = alloc(&mut t, id(2), "db", 30_006).unwrap_err();
        assert_eq!(
            wrong_port,
            RegistryError::PortMismatch {
                name: "db".to_owned(),
                port: 30_005
            }
        );
        assert!(wrong_port.to_string().contains("public port 30005"));
        assert!(matches!(
            claim(&mut t, id(2), "db", 0, ServiceProtocol::Udp, false),
            Err(RegistryError::ProtocolMismatch { .. })
        ));
        let scoped = Claim {
            name: "db",
            protocol: ServiceProtocol::Tcp,
            requested: 0,
            allowed: Some(&[(30_000, 30_001)]),
            named_in_scope: false,
        };
        assert!(matches!(
            t.allocate(id(2), scoped),
            Err(RegistryError::PortOutsideScope { port: 30_005, .. })
        ));
        // nothing was recorded by the refusals: a plain join still works
        assert_eq!(alloc(&mut t, id(2), "db", 0), Ok(30_005));
        assert_eq!(t.free_ports(), 9);
    }
}
