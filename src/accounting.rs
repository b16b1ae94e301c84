//! Live traffic counters for tunnels, services, node tunnels and access
//! sessions: bytes each way, active and total connections, datagrams and drops.
//!
//! Counters are atomics shared (`Arc`) between the actor that moves the bytes
//! and whoever reads them, so readings are live, not only at close.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::visitor_rules::Refusal;

/// Direction of traffic, seen from the tunnel server's public side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the visitor toward the service.
    In,
    /// From the service back to the visitor.
    Out,
}

/// Counters of one tunnel, service, flow or session.
#[derive(Debug, Default)]
pub struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections_active: AtomicU64,
    connections_total: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
    /// By [`DropKind::index`].
    drops: [AtomicU64; DropKind::ALL.len()],
    /// Visitors refused by the service's address lists, by [`Refusal::index`].
    refused: [AtomicU64; Refusal::ALL.len()],
    last_activity_ms: AtomicU64,
    unsent: AtomicU64,
}

/// Why a datagram was dropped, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    /// Larger than the largest datagram carried.
    Oversized,
    /// The service had its maximum of flows, none of which could make room.
    TooManyFlows,
    /// Its flow was over its datagrams per second.
    RateLimited,
    /// The bytes in flight between a listener and its channel were at their bound.
    OverBudget,
    /// Its flow had ended (a race with the flow's end).
    NoFlow,
    /// The socket's buffer was full.
    SocketFull,
}

impl DropKind {
    /// Every kind, in the order of their counters.
    pub const ALL: [Self; 6] = [
        Self::Oversized,
        Self::TooManyFlows,
        Self::RateLimited,
        Self::OverBudget,
        Self::NoFlow,
        Self::SocketFull,
    ];

    /// Its name, as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::TooManyFlows => "too_many_flows",
            Self::RateLimited => "rate_limited",
            Self::OverBudget => "over_budget",
            Self::NoFlow => "no_flow",
            Self::SocketFull => "socket_full",
        }
    }

    /// Its place in [`DropKind::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl From<crate::udp::DropReason> for DropKind {
    fn from(reason: crate::udp::DropReason) -> Self {
        use crate::udp::DropReason;
        match reason {
            DropReason::Oversized { .. } => Self::Oversized,
            DropReason::TooManyFlows { .. } => Self::TooManyFlows,
            DropReason::RateLimited { .. } => Self::RateLimited,
        }
    }
}

impl Counters {
    /// Fresh counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `n` payload bytes moved in `direction`.
    pub fn add_bytes(&self, direction: Direction, n: u64) {
        match direction {
            Direction::In => self.bytes_in.fetch_add(n, Relaxed),
            Direction::Out => self.bytes_out.fetch_add(n, Relaxed),
        };
    }

    /// Counts one datagram of `len` bytes in `direction`.
    pub fn add_datagram(&self, direction: Direction, len: u64) {
        self.add_bytes(direction, len);
        match direction {
            Direction::In => self.datagrams_in.fetch_add(1, Relaxed),
            Direction::Out => self.datagrams_out.fetch_add(1, Relaxed),
        };
    }

    /// Records traffic at `unix_ms` (milliseconds since the Unix epoch, read
    /// by the caller); the latest wins.
    pub fn touch(&self, unix_ms: u64) {
        self.last_activity_ms.fetch_max(unix_ms, Relaxed);
    }

    /// Counts one dropped datagram, by why.
    pub fn add_drop(&self, kind: DropKind) {
        self.drops[kind.index()].fetch_add(1, Relaxed);
    }

    /// Counts one visitor refused by the service's address lists.
    pub fn add_refused(&self, why: Refusal) {
        self.refused[why.index()].fetch_add(1, Relaxed);
    }

    /// Counts one frame not sent: it could not be built, or its type was not
    /// announced by the peer (a bug on our side either way, also logged).
    pub fn add_unsent(&self) {
        self.unsent.fetch_add(1, Relaxed);
    }

    /// Frames not sent (see [`add_unsent`](Self::add_unsent)).
    pub fn unsent(&self) -> u64 {
        self.unsent.load(Relaxed)
    }

    /// A connection (or flow) opened.
    pub fn connection_opened(&self) {
        self.connections_active.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    /// Connections (or flows) open now.
    pub fn open_connections(&self) -> u64 {
        self.connections_active.load(Relaxed)
    }

    /// A connection (or flow) closed; never goes below zero.
    pub fn connection_closed(&self) {
        let _ = self
            .connections_active
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// A consistent-enough reading of every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            datagrams_in: self.datagrams_in.load(Relaxed),
            datagrams_out: self.datagrams_out.load(Relaxed),
            drops: self.drops.iter().map(|n| n.load(Relaxed)).sum(),
            drops_by_kind: self.drops.each_ref().map(|n| n.load(Relaxed)),
            visitors_refused: self.refused.each_ref().map(|n| n.load(Relaxed)),
            last_activity_ms: self.last_activity_ms.load(Relaxed),
        }
    }
}

/// A reading of [`Counters`], plain data for status pages and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// Bytes from visitors toward services.
    pub bytes_in: u64,
    /// Bytes from services toward visitors.
    pub bytes_out: u64,
    /// Connections or flows open now.
    pub connections_active: u64,
    /// Connections or flows ever opened.
    pub connections_total: u64,
    /// Datagrams toward services.
    pub datagrams_in: u64,
    /// Datagrams toward visitors.
    pub datagrams_out: u64,
    /// Datagrams dropped, for any reason.
    pub drops: u64,
    /// Datagrams dropped, by why ([`DropKind::ALL`]'s order).
    pub drops_by_kind: [u64; DropKind::ALL.len()],
    /// Visitors refused by the address lists, by why ([`Refusal::ALL`]'s order).
    pub visitors_refused: [u64; Refusal::ALL.len()],
    /// Last traffic, in milliseconds since the Unix epoch (0: none yet).
    pub last_activity_ms: u64,
}

/// Counters of a stream and of every scope it belongs to (service, tunnel, ...),
/// updated together so that each level stays the sum of its parts.
#[derive(Debug, Clone, Default)]
pub struct CounterSet {
    scopes: Vec<std::sync::Arc<Counters>>,
}

impl CounterSet {
    /// Updates all of `scopes` together.
    pub fn new(scopes: Vec<std::sync::Arc<Counters>>) -> Self {
        Self { scopes }
    }

    /// Counts bytes on every scope.
    pub fn add_bytes(&self, direction: Direction, n: u64) {
        self.scopes.iter().for_each(|c| c.add_bytes(direction, n));
    }

    /// Counts a datagram on every scope.
    pub fn add_datagram(&self, direction: Direction, len: u64) {
        self.scopes
            .iter()
            .for_each(|c| c.add_datagram(direction, len));
    }

    /// Records traffic at `unix_ms` on every scope.
    pub fn touch(&self, unix_ms: u64) {
        self.scopes.iter().for_each(|c| c.touch(unix_ms));
    }

    /// Counts a drop on every scope, by why.
    pub fn add_drop(&self, kind: DropKind) {
        self.scopes.iter().for_each(|c| c.add_drop(kind));
    }

    /// Opens a connection on every scope.
    pub fn connection_opened(&self) {
        self.scopes.iter().for_each(|c| c.connection_opened());
    }

    /// Closes a connection on every scope.
    pub fn connection_closed(&self) {
        self.scopes.iter().for_each(|c| c.connection_closed());
    }
}

/// What a server's admission limits saw: atomics shared by the
/// control handler, the service listeners and `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct GuardCounters {
    awaiting_auth: AtomicU64,
    accept_pauses: AtomicU64,
    /// Remote events by kind (`RemoteEvent::index`), logged or held back.
    remote_events: [AtomicU64; crate::log_limit::RemoteEvent::ALL.len()],
}

impl GuardCounters {
    /// A control connection took a place to authenticate.
    pub fn auth_started(&self) {
        self.awaiting_auth.fetch_add(1, Relaxed);
    }

    /// A control connection gave its place back (authenticated, or ended).
    pub fn auth_ended(&self) {
        let _ = self
            .awaiting_auth
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// A public port paused accepting: its tunnel was not taking visitors.
    pub fn accept_paused(&self) {
        self.accept_pauses.fetch_add(1, Relaxed);
    }

    /// A remote party made `event` happen (whether or not it was logged).
    pub fn remote_event(&self, event: crate::log_limit::RemoteEvent) {
        self.remote_events[event.index()].fetch_add(1, Relaxed);
    }

    /// A reading.
    pub fn snapshot(&self) -> GuardSnapshot {
        GuardSnapshot {
            awaiting_auth: self.awaiting_auth.load(Relaxed),
            accept_pauses: self.accept_pauses.load(Relaxed),
            remote_events: self.remote_events.each_ref().map(|n| n.load(Relaxed)),
        }
    }
}

/// A reading of [`GuardCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuardSnapshot {
    /// Control connections awaiting authentication now.
    pub awaiting_auth: u64,
    /// Times a public port paused accepting, since the start.
    pub accept_pauses: u64,
    /// Remote events since the start, by kind (`RemoteEvent::ALL`'s order).
    pub remote_events: [u64; crate::log_limit::RemoteEvent::ALL.len()],
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_each_way_and_connections() {
        let c = Counters::new();
        c.connection_opened();
        c.add_bytes(Direction::In, 10);
        c.add_bytes(Direction::Out, 7);
        c.add_datagram(Direction::In, 5);
        c.add_drop(DropKind::RateLimited);
        c.connection_closed();
        c.connection_closed(); // never below zero
        let s = c.snapshot();
        assert_eq!((s.bytes_in, s.bytes_out), (15, 7));
        assert_eq!((s.connections_active, s.connections_total), (0, 1));
        assert_eq!((s.datagrams_in, s.drops), (1, 1));
        assert_eq!(s.drops_by_kind[DropKind::RateLimited.index()], 1);
    }

    #[test]
    fn a_set_updates_every_scope() {
        let service = Arc::new(Counters::new());
        let tunnel = Arc::new(Counters::new());
        let set = CounterSet::new(vec![service.clone(), tunnel.clone()]);
        set.connection_opened();
        set.add_bytes(Direction::Out, 3);
        assert_eq!(service.snapshot(), tunnel.snapshot());
        assert_eq!(tunnel.snapshot().bytes_out, 3);
    }
}
