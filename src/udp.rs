//! UDP flows on the server's public side: each visitor address is a flow,
//! with a per-flow rate limit, a cap on flows per service and an idle timeout
//! (docs/PROTOCOL.md §4.4). Pure: the caller passes `now` and fresh flow ids.
//!
//! As connection tracking does, a flow is judged by what it has carried. When
//! a service's flows are full, a new visitor takes the place of one the
//! service has not answered in a second (a flood from fresh source ports),
//! else of one that was a single exchange (a DNS query and its answer, from
//! a resolver that draws a new source port per query), else of the oldest
//! still awaiting its first answer; a single exchange is also forgotten after
//! [`ONE_EXCHANGE_IDLE`]. A flow of many exchanges (a VPN peer, a game) keeps
//! its place until its idle timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

/// The largest datagram the tunnel carries: the largest IPv4 UDP payload.
/// A `Datagram` frame of it (5 + 16 + 65507 bytes) fits in `MAX_MESSAGE_SIZE`.
pub const MAX_DATAGRAM: usize = 65_507;

/// How long a flow that was one exchange (a datagram each way) is kept once
/// it falls silent, when its idle timeout is longer.
pub const ONE_EXCHANGE_IDLE: Duration = Duration::from_secs(5);

/// How long a new flow may wait for its first answer before, the service's
/// flows being full, it is the first to make room for a newcomer.
pub const UNANSWERED_GRACE: Duration = Duration::from_secs(1);

/// Limits of one UDP service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Flows (visitor addresses) open at once.
    pub max_flows: usize,
    /// Datagrams per second one flow may send toward the service (burst: one second's worth).
    pub max_rate: u32,
    /// A flow silent both ways this long is forgotten.
    pub idle_timeout: Duration,
    /// Largest datagram carried; a larger one is dropped, never truncated.
    pub max_datagram: usize,
}

/// Why a visitor's datagram was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Larger than the largest datagram carried.
    #[error("datagram of {len} bytes is over the {max}-byte limit")]
    Oversized {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The service has its maximum of flows.
    #[error("service is at its limit of {max} flows")]
    TooManyFlows {
        /// The limit.
        max: usize,
    },
    /// The flow is over its datagrams per second.
    #[error("flow is over its rate of {rate} datagrams/s")]
    RateLimited {
        /// The limit.
        rate: u32,
    },
}

/// What to do with a visitor's datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it on flow `id`; `opened` when this datagram opened the flow
    /// (announce it to the agent first).
    Forward {
        /// The flow.
        id: Uuid,
        /// True for a new flow.
        opened: bool,
    },
    /// The service's flows were full: flow `evicted` (the least recently
    /// active of those the service never answered, else of those that were
    /// one exchange) made room for a new flow `id`. End `evicted`, announce
    /// `id`, forward the datagram on it.
    ForwardReplacing {
        /// The new flow.
        id: Uuid,
        /// The flow it replaced.
        evicted: Uuid,
    },
    /// Drop it (and count it).
    Drop(DropReason),
}

/// One flow's traffic, as reported in `/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FlowInfo {
    /// The visitor's address.
    pub visitor: Option<SocketAddr>,
    /// Datagrams from the visitor toward the service.
    pub datagrams_in: u64,
    /// Datagrams from the service back to the visitor.
    pub datagrams_out: u64,
    /// Payload bytes toward the service.
    pub bytes_in: u64,
    /// Payload bytes back to the visitor.
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    visitor: SocketAddr,
    last_seen: Instant,
    tokens: f64,
    refilled: Instant,
    traffic: FlowInfo,
}

impl Flow {
    /// The service never answered it.
    fn unanswered(&self) -> bool {
        self.traffic.datagrams_out == 0
    }

    /// A datagram each way, no more: a query and its answer.
    fn one_exchange(&self) -> bool {
        self.traffic.datagrams_in <= 1 && self.traffic.datagrams_out == 1
    }
}

/// The flows of one UDP service.
#[derive(Debug)]
pub struct FlowTable {
    limits: FlowLimits,
    by_visitor: HashMap<SocketAddr, Uuid>,
    flows: HashMap<Uuid, Flow>,
}

impl FlowTable {
    /// An empty table.
    pub fn new(limits: FlowLimits) -> Self {
        Self {
            limits,
            by_visitor: HashMap::new(),
            flows: HashMap::new(),
        }
    }

    /// Flows open now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when no flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A datagram of `len` bytes from `visitor`; `fresh` is the id a new flow gets.
    pub fn on_visitor(
        &mut self,
        visitor: SocketAddr,
        len: usize,
        now: Instant,
        fresh: Uuid,
    ) -> Verdict {
        let max = self.limits.max_datagram;
        if len > max {
            return Verdict::Drop(DropReason::Oversized { len, max });
        }
        if let Some(&id) = self.by_visitor.get(&visitor) {
            let verdict = self.spend(id, now);
            if matches!(verdict, Verdict::Forward { .. }) {
                self.count_in(id, len);
            }
            return verdict;
        }
        let mut evicted = None;
        if self.flows.len() >= self.limits.max_flows {
            // a flood from many source ports, or a resolver's fresh port per
            // query, must not keep a genuine visitor out until its flows idle
            // away: the least recently heard of the flows that never had an
            // answer, else of those that were one exchange, makes room
            let Some(victim) = self.eviction_candidate(now) else {
                return Verdict::Drop(DropReason::TooManyFlows {
                    max: self.limits.max_flows,
                });
            };
            self.remove(victim);
            evicted = Some(victim);
        }
        let burst = f64::from(self.limits.max_rate);
        self.by_visitor.insert(visitor, fresh);
        self.flows.insert(
            fresh,
            Flow {
                visitor,
                last_seen: now,
                tokens: burst,
                refilled: now,
                traffic: FlowInfo {
                    visitor: Some(visitor),
                    ..FlowInfo::default()
                },
            },
        );
        match (self.spend(fresh, now), evicted) {
            (Verdict::Forward { id, .. }, None) => {
                self.count_in(id, len);
                Verdict::Forward { id, opened: true }
            }
            (Verdict::Forward { id, .. }, Some(evicted)) => {
                self.count_in(id, len);
                Verdict::ForwardReplacing { id, evicted }
            }
            (drop, _) => drop,
        }
    }

    /// The flow heard from longest ago among those the service has not
    /// answered in [`UNANSWERED_GRACE`], else among those that were one
    /// exchange, else among those still awaiting their first answer (a query
    /// in flight is not dropped for the next while answered ones can go).
    fn eviction_candidate(&self, now: Instant) -> Option<Uuid> {
        let least_recent = |class: &dyn Fn(&Flow) -> bool| {
            (self.flows.iter())
                .filter(|(_, f)| class(f))
                .min_by_key(|(_, f)| f.last_seen)
                .map(|(id, _)| *id)
        };
        let stale = |f: &Flow| {
            f.unanswered() && now.saturating_duration_since(f.last_seen) >= UNANSWERED_GRACE
        };
        least_recent(&stale)
            .or_else(|| least_recent(&Flow::one_exchange))
            .or_else(|| least_recent(&Flow::unanswered))
    }

    /// Counts a forwarded datagram of `len` bytes toward the service.
    fn count_in(&mut self, id: Uuid, len: usize) {
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.traffic.datagrams_in += 1;
            flow.traffic.bytes_in += len as u64;
        }
    }

    /// Every flow's traffic so far.
    pub fn traffic(&self) -> Vec<FlowInfo> {
        self.flows.values().map(|f| f.traffic).collect()
    }

    /// The traffic so far of the flows whose id `include` accepts.
    pub fn traffic_where(&self, include: impl Fn(&Uuid) -> bool) -> Vec<FlowInfo> {
        (self.flows.iter())
            .filter(|(id, _)| include(id))
            .map(|(_, f)| f.traffic)
            .collect()
    }

    /// The flow of `visitor`, if it has one.
    pub fn flow_of(&self, visitor: SocketAddr) -> Option<Uuid> {
        self.by_visitor.get(&visitor).copied()
    }

    /// A reply of `len` bytes on flow `id`: the visitor to send it to (the
    /// flow stays alive, and the reply is counted).
    pub fn on_reply(&mut self, id: Uuid, len: usize, now: Instant) -> Option<SocketAddr> {
        let flow = self.flows.get_mut(&id)?;
        flow.last_seen = now;
        flow.traffic.datagrams_out += 1;
        flow.traffic.bytes_out += len as u64;
        Some(flow.visitor)
    }

    /// Forgets flow `id` (the agent refused or closed it); its visitor, if it existed.
    pub fn remove(&mut self, id: Uuid) -> Option<SocketAddr> {
        let flow = self.flows.remove(&id)?;
        self.by_visitor.remove(&flow.visitor);
        Some(flow.visitor)
    }

    /// Forgets every flow idle since before `now - idle_timeout` (one that
    /// was one exchange: `now - ONE_EXCHANGE_IDLE`, if sooner); their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<Uuid> {
        let timeout = self.limits.idle_timeout;
        let short = timeout.min(ONE_EXCHANGE_IDLE);
        let idle: Vec<Uuid> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                let limit = if f.one_exchange() { short } else { timeout };
                now.saturating_duration_since(f.last_seen) >= limit
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            self.remove(*id);
        }
        idle
    }

    /// Forgets every flow; their ids.
    pub fn drain(&mut self) -> Vec<Uuid> {
        self.by_visitor.clear();
        self.flows.drain().map(|(id, _)| id).collect()
    }

    /// Takes one token from flow `id`'s bucket, refilled at `max_rate` per second.
    fn spend(&mut self, id: Uuid, now: Instant) -> Verdict {
        let rate = self.limits.max_rate;
        let Some(flow) = self.flows.get_mut(&id) else {
            return Verdict::Drop(DropReason::RateLimited { rate });
        };
        flow.last_seen = now;
        let elapsed = now.saturating_duration_since(flow.refilled).as_secs_f64();
        flow.tokens = (flow.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
        flow.refilled = now;
        if flow.tokens < 1.0 {
            return Verdict::Drop(DropReason::RateLimited { rate });
        }
        flow.tokens -= 1.0;
        Verdict::Forward { id, opened: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FlowLimits {
        FlowLimits {
            max_flows: 2,
            max_rate: 10,
            idle_timeout: Duration::from_secs(60),
            max_datagram: 9000,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        ([192, 0, 2, 1], port).into()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn each_visitor_address_is_one_flow() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        let first = t.on_visitor(addr(1), 10, now, id(1));
        assert_eq!(
            first,
            Verdict::Forward {
                id: id(1),
                opened: true
            }
        );
        let again = t.on_visitor(addr(1), 10, now, id(9));
        assert_eq!(
            again,
            Verdict::Forward {
                id: id(1),
                opened: false
            }
        );
        let other = t.on_visitor(addr(2), 10, now, id(2));
        assert_eq!(
            other,
            Verdict::Forward {
                id: id(2),
                opened: true
            }
        );
        assert_eq!(t.on_reply(id(2), 1, now), Some(addr(2)));
        assert_eq!(t.on_reply(id(3), 1, now), None);
        let mut traffic = t.traffic();
        traffic.sort_by_key(|f| f.visitor);
        assert_eq!((traffic[0].datagrams_in, traffic[0].bytes_in), (2, 20));
        assert_eq!((traffic[1].datagrams_out, traffic[1].bytes_out), (1, 1));
    }

    #[test]
    fn limits_drop_and_say_why() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        let big = t.on_visitor(addr(1), 9001, now, id(1));
        assert_eq!(
            big,
            Verdict::Drop(DropReason::Oversized {
                len: 9001,
                max: 9000
            })
        );
        assert!(t.is_empty(), "an oversized datagram opens no flow");
        // two flows of two exchanges each: a third visitor waits its turn
        for _ in 0..2 {
            t.on_visitor(addr(1), 9000, now, id(1));
            t.on_visitor(addr(2), 1, now, id(2));
            t.on_reply(id(1), 1, now);
            t.on_reply(id(2), 1, now);
        }
        let third = t.on_visitor(addr(3), 1, now, id(3));
        assert_eq!(third, Verdict::Drop(DropReason::TooManyFlows { max: 2 }));
    }

    #[test]
    fn a_full_table_evicts_the_oldest_flow_the_service_never_answered() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        t.on_visitor(addr(1), 1, now, id(1)); // a flood's flow: never answered
        for _ in 0..2 {
            t.on_visitor(addr(2), 1, now, id(2)); // a genuine one, answered
            t.on_reply(id(2), 1, now);
        }
        // a newcomer replaces the unanswered flow, not the answered one
        let third = t.on_visitor(addr(3), 1, later, id(3));
        assert_eq!(
            third,
            Verdict::ForwardReplacing {
                id: id(3),
                evicted: id(1)
            }
        );
        assert_eq!(t.len(), 2);
        // the next newcomer replaces the newest unanswered one
        let fourth = t.on_visitor(addr(4), 1, later, id(4));
        assert_eq!(
            fourth,
            Verdict::ForwardReplacing {
                id: id(4),
                evicted: id(3)
            }
        );
        assert_eq!(t.on_reply(id(2), 1, later), Some(addr(2)), "kept");
    }

    #[test]
    fn a_single_exchange_gives_way_after_the_unanswered_and_goes_sooner() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        // a flow of many exchanges, and a query with its answer
        for _ in 0..3 {
            t.on_visitor(addr(1), 1, now, id(1));
            t.on_reply(id(1), 1, now);
        }
        t.on_visitor(addr(2), 1, now, id(2));
        t.on_reply(id(2), 1, now);
        // the next resolver query takes the answered query's place
        let third = t.on_visitor(addr(3), 1, later, id(3));
        let replacing = Verdict::ForwardReplacing {
            id: id(3),
            evicted: id(2),
        };
        assert_eq!(third, replacing);
        // unanswered (id 3) goes before any answered flow
        t.on_reply(id(1), 1, later);
        let fourth = t.on_visitor(addr(4), 1, later, id(4));
        assert!(matches!(fourth, Verdict::ForwardReplacing { evicted, .. } if evicted == id(3)));
        // answered once: forgotten 5 s after; the flow of many exchanges is not
        t.on_reply(id(4), 1, later);
        let expired = t.expire(later + ONE_EXCHANGE_IDLE);
        assert_eq!(expired, vec![id(4)]);
        assert_eq!(t.on_reply(id(1), 1, later), Some(addr(1)), "kept");
    }

    #[test]
    fn a_query_in_flight_is_not_dropped_while_an_answered_one_can_go() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        t.on_visitor(addr(1), 1, now, id(1));
        t.on_reply(id(1), 1, now); // answered: one exchange
        t.on_visitor(addr(2), 1, now, id(2)); // in flight, older than the newcomer
        let third = t.on_visitor(addr(3), 1, now, id(3));
        assert!(matches!(third, Verdict::ForwardReplacing { evicted, .. } if evicted == id(1)));
        // past the grace, a flow never answered goes first again
        let later = now + UNANSWERED_GRACE;
        t.on_reply(id(3), 1, later);
        let fourth = t.on_visitor(addr(4), 1, later, id(4));
        assert!(matches!(fourth, Verdict::ForwardReplacing { evicted, .. } if evicted == id(2)));
    }

    #[test]
    fn a_flow_is_held_to_its_rate_and_refills() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        let forwarded = (0..15)
            .filter(|_| {
                matches!(
                    t.on_visitor(addr(1), 1, now, id(1)),
                    Verdict::Forward { .. }
                )
            })
            .count();
        assert_eq!(forwarded, 10, "one second's burst");
        let later = now + Duration::from_millis(500);
        let refilled = (0..15)
            .filter(|_| {
                matches!(
                    t.on_visitor(addr(1), 1, later, id(1)),
                    Verdict::Forward { .. }
                )
            })
            .count();
        assert_eq!(refilled, 5);
    }

    #[test]
    fn idle_flows_expire_and_replies_keep_them_alive() {
        let mut t = FlowTable::new(limits());
        let now = Instant::now();
        t.on_visitor(addr(1), 1, now, id(1));
        t.on_visitor(addr(2), 1, now, id(2));
        let later = now + Duration::from_secs(59);
        t.on_reply(id(2), 1, later);
        assert_eq!(t.expire(now + Duration::from_secs(60)), vec![id(1)]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(id(2)), Some(addr(2)));
        // the address opens a new flow after that
        let again = t.on_visitor(addr(2), 1, later, id(7));
        assert_eq!(
            again,
            Verdict::Forward {
                id: id(7),
                opened: true
            }
        );
    }
}
