//! What a UDP listener refuses and drops: datagrams from addresses its
//! service's lists refuse, and datagrams over a limit, each counted by why
//! and logged at most once a second (a visitor decides how often).

use std::net::SocketAddr;
use std::time::Instant;

use uuid::Uuid;

use super::UdpServiceListener;
use crate::accounting::DropKind;
use crate::visitor_rules::Refusal;

impl UdpServiceListener {
    /// Counts a visitor's datagram dropped, by why (on the flow's replica,
    /// or the service's first when it has none yet), and logs it at most
    /// once a second (a visitor decides how often).
    pub(super) fn dropped(
        &mut self,
        kind: DropKind,
        flow: Option<Uuid>,
        visitor: SocketAddr,
        reason: &str,
    ) {
        let replica = flow.and_then(|id| self.owner(id));
        if let Some(replica) = replica.or_else(|| self.replicas.iter().next()) {
            replica.counters.add_drop(kind);
        }
        if let Some(held_back) = self.drop_log.admit(Instant::now()) {
            tracing::info!(port = self.settings.port, %visitor, reason, drop = kind.name(), held_back, "datagram dropped");
        }
    }

    /// Why `visitor` may not send to the service, if no healthy replica's
    /// address lists admit it (nothing to check without lists).
    pub(super) fn refusal(&self, visitor: SocketAddr) -> Option<Refusal> {
        if self.replicas.iter().all(|r| r.visitors.is_empty()) {
            return None;
        }
        let mut verdicts = (self.replicas.iter())
            .filter(|r| r.healthy)
            .map(|r| r.visitors.check(visitor.ip()));
        let first = verdicts.next()?;
        match first {
            Ok(()) => None,
            Err(why) => verdicts.all(|v| v.is_err()).then_some(why),
        }
    }

    /// A datagram from an address the lists refuse: counted by why on the
    /// service's first replica, logged at most once a second.
    pub(super) fn refused(&mut self, why: Refusal, visitor: SocketAddr) {
        if let Some(replica) = self.replicas.iter().next() {
            replica.counters.add_refused(why);
        }
        if let Some(held_back) = self.refusal_log.admit(Instant::now()) {
            tracing::info!(port = self.settings.port, %visitor, reason = why.name(), held_back, "datagram refused by the service's rules");
        }
    }
}
