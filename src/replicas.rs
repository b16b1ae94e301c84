//! The replicas of one service: several agents' registrations of one name
//! behind one public port, and which of them the next visitor goes to.
//!
//! Pure: the listener that owns a [`ReplicaSet`] says how loaded each
//! replica is (its open streams) when it asks for one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How a service's visitors are spread over its replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalance {
    /// The replica with the fewest open streams; ties in turn.
    #[default]
    LeastStreams,
    /// Each replica in turn, whatever it carries.
    RoundRobin,
}

impl fmt::Display for LoadBalance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LeastStreams => "least-streams",
            Self::RoundRobin => "round-robin",
        })
    }
}

/// A `load_balance` that is neither `least-streams` nor `round-robin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown load balancing {0:?}: use least-streams or round-robin")]
pub struct UnknownLoadBalance(String);

impl FromStr for LoadBalance {
    type Err = UnknownLoadBalance;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "least-streams" => Ok(Self::LeastStreams),
            "round-robin" => Ok(Self::RoundRobin),
            other => Err(UnknownLoadBalance(other.to_owned())),
        }
    }
}

/// The bits of a link's client id that hold its number among its agent's
/// links to one server (`connections`, at most
/// [`MAX_CONNECTIONS`](crate::config::MAX_CONNECTIONS)).
const LINK_NUMBER_BITS: u128 = (crate::config::MAX_CONNECTIONS - 1) as u128;

const _: () = assert!(crate::config::MAX_CONNECTIONS.is_power_of_two());

/// The client id of an agent's link number `connection` to one server: the
/// agent's own for the first, and for each extra link the agent's with the
/// number XORed into its last bits (docs/PROTOCOL.md §4.9).
pub fn link_client_id(agent: Uuid, connection: usize) -> Uuid {
    Uuid::from_u128(agent.as_u128() ^ (connection as u128 & LINK_NUMBER_BITS))
}

/// The agent a link belongs to, from the link's client id: the links of one
/// agent differ only in the bits that hold their number, which this clears.
/// Two agents with random client ids share all other bits by a chance of
/// 2^-119; two whose configured ids differ only in those bits are taken for
/// one (a visitor one refuses is then not offered to the other).
pub fn agent_of(client_id: Uuid) -> Uuid {
    Uuid::from_u128(client_id.as_u128() & !LINK_NUMBER_BITS)
}

/// The replicas of one service, keyed by `K` (the tunnel each belongs to).
#[derive(Debug)]
pub struct ReplicaSet<K, R> {
    replicas: Vec<(K, R)>,
    /// Where the next turn starts.
    cursor: usize,
}

impl<K: PartialEq, R> Default for ReplicaSet<K, R> {
    fn default() -> Self {
        Self {
            replicas: Vec::new(),
            cursor: 0,
        }
    }
}

impl<K: PartialEq, R> ReplicaSet<K, R> {
    /// Adds replica `key` (or replaces the one of that key).
    pub fn add(&mut self, key: K, replica: R) {
        match self.replicas.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = replica,
            None => self.replicas.push((key, replica)),
        }
    }

    /// Removes replica `key`: it gets no visitor from now on.
    pub fn remove(&mut self, key: &K) -> Option<R> {
        let at = self.replicas.iter().position(|(k, _)| k == key)?;
        if at < self.cursor {
            self.cursor -= 1;
        }
        Some(self.replicas.remove(at).1)
    }

    /// Replica `key`.
    pub fn get(&self, key: &K) -> Option<&R> {
        self.replicas.iter().find(|(k, _)| k == key).map(|(_, r)| r)
    }

    /// Replica `key`, to change.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut R> {
        self.replicas
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, r)| r)
    }

    /// Replicas left.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// True when the last replica is gone.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The replicas.
    pub fn iter(&self) -> impl Iterator<Item = &R> {
        self.replicas.iter().map(|(_, r)| r)
    }

    /// The replica the next visitor goes to, among those `eligible` says may
    /// take one, by `policy`; `load` is a replica's open streams.
    pub fn pick(
        &mut self,
        policy: LoadBalance,
        eligible: impl Fn(&R) -> bool,
        load: impl Fn(&R) -> u64,
    ) -> Option<&R> {
        let n = self.replicas.len();
        let turn = |i: usize| (self.cursor + i) % n.max(1);
        let mut candidates = (0..n).map(turn).filter(|&i| eligible(&self.replicas[i].1));
        let chosen = match policy {
            LoadBalance::RoundRobin => candidates.next()?,
            // the first in turn among the least loaded
            LoadBalance::LeastStreams => {
                candidates
                    .enumerate()
                    .min_by_key(|&(order, i)| (load(&self.replicas[i].1), order))?
                    .1
            }
        };
        self.cursor = (chosen + 1) % n;
        Some(&self.replicas[chosen].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replicas keyed 0.. whose value is (key, load).
    fn set(loads: &[u64]) -> ReplicaSet<usize, (usize, u64)> {
        let mut s = ReplicaSet::default();
        loads
            .iter()
            .enumerate()
            .for_each(|(k, l)| s.add(k, (k, *l)));
        s
    }

    /// The keys of the next `n` picks.
    fn picks(s: &mut ReplicaSet<usize, (usize, u64)>, policy: LoadBalance, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| s.pick(policy, |_| true, |r| r.1).expect("a replica").0)
            .collect()
    }

    #[test]
    fn least_streams_goes_to_the_least_loaded_and_takes_turns_on_ties() {
        let mut s = set(&[5, 1, 1, 9]);
        assert_eq!(picks(&mut s, LoadBalance::LeastStreams, 4), [1, 2, 1, 2]);
        let mut s = set(&[0, 0, 0]);
        assert_eq!(
            picks(&mut s, LoadBalance::LeastStreams, 6),
            [0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn an_agents_links_name_the_agent_and_no_other() {
        let agent = Uuid::new_v4();
        let links: Vec<Uuid> = (0..crate::config::MAX_CONNECTIONS)
            .map(|n| link_client_id(agent, n))
            .collect();
        assert_eq!(links[0], agent);
        let distinct: std::collections::HashSet<_> = links.iter().collect();
        assert_eq!(distinct.len(), links.len());
        assert!(links.iter().all(|l| agent_of(*l) == agent_of(agent)));
        let other = Uuid::from_u128(agent.as_u128() ^ (1 << 3));
        assert_ne!(agent_of(other), agent_of(agent));
    }

    #[test]
    fn round_robin_ignores_load() {
        let mut s = set(&[100, 0, 7]);
        assert_eq!(
            picks(&mut s, LoadBalance::RoundRobin, 6),
            [0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn a_removed_replica_gets_nothing_and_an_ineligible_one_is_skipped() {
        let mut s = set(&[0, 0, 0]);
        assert_eq!(s.remove(&1), Some((1, 0)));
        assert_eq!(s.remove(&1), None);
        let mut s2: ReplicaSet<usize, (usize, bool)> = ReplicaSet::default();
        for (k, healthy) in [(0, true), (1, false), (2, true)] {
            s2.add(k, (k, healthy));
        }
        for policy in [LoadBalance::LeastStreams, LoadBalance::RoundRobin] {
            for _ in 0..6 {
                let (k, _) = *s2.pick(policy, |r| r.1, |_| 0).expect("a healthy one");
                assert_ne!(k, 1);
            }
        }
        let mut none: ReplicaSet<usize, (usize, bool)> = ReplicaSet::default();
        none.add(0, (0, false));
        assert!(
            none.pick(LoadBalance::LeastStreams, |r| r.1, |_| 0)
                .is_none()
        );
        assert_eq!(s.len(), 2);
        s.remove(&0);
        s.remove(&2);
        assert!(s.is_empty());
        assert!(s.pick(LoadBalance::RoundRobin, |_| true, |_| 0).is_none());
    }

    #[test]
    fn policies_parse_from_their_names() {
        for p in [LoadBalance::LeastStreams, LoadBalance::RoundRobin] {
            assert_eq!(p.to_string().parse::<LoadBalance>(), Ok(p));
        }
        assert!("random".parse::<LoadBalance>().is_err());
    }
}
