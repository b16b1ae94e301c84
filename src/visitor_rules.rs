//! Who may visit a service: address lists of CIDR blocks, `allow` and
//! `deny`, checked by the server when a visitor connects (before any stream
//! opens). Deny wins; an empty allow list admits everyone. A service has the
//! lists of its registration (the agent's `allow`/`deny`) and of its token
//! (`visitors_allow`/`visitors_deny`); a visitor must pass both. Pure.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A block of addresses: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A CIDR block that does not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an address block like 10.0.0.0/8 or 2001:db8::/32: {why}")]
pub struct BadCidr {
    text: String,
    why: &'static str,
}

impl Cidr {
    /// True when `ip` is in the block (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, unmapped(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadCidr {
            text: text.to_owned(),
            why,
        };
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let network: IpAddr = address.parse().map_err(|_| bad("not an IP address"))?;
        let network = unmapped(network);
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| bad("the prefix is not a number"))?,
        };
        if prefix > max {
            return Err(bad("the prefix is longer than the address"));
        }
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a visitor was refused, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address is in a deny list.
    Denied,
    /// An allow list does not have its address.
    NotAllowed,
    /// Its address opened connections faster than the service's `visitor_rate`.
    RateLimited,
}

impl Refusal {
    /// Every reason, in the order of their counters.
    pub const ALL: [Self; 3] = [Self::Denied, Self::NotAllowed, Self::RateLimited];

    /// Its metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::NotAllowed => "not_allowed",
            Self::RateLimited => "rate_limited",
        }
    }

    /// Its place in [`Refusal::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Address lists: deny wins; an empty allow list admits everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VisitorRules {
    /// Blocks whose visitors are admitted (empty: everyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    /// Blocks whose visitors are refused, whatever `allow` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,
}

impl VisitorRules {
    /// True when they admit everyone.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a visitor from `ip` is admitted.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(Refusal::Denied);
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(ip)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    /// Both `self` and `other` (a token's and a registration's): deny
    /// lists joined; a visitor must be in every non-empty allow list.
    pub fn and(&self, other: &Self) -> ServiceRules {
        ServiceRules {
            lists: [self, other]
                .into_iter()
                .filter(|r| !r.is_empty())
                .cloned()
                .collect(),
        }
    }

    /// The lists as the wire carries them: blocks separated by commas.
    pub fn to_wire(&self) -> (String, String) {
        let join = |list: &[Cidr]| {
            (list.iter().map(ToString::to_string))
                .collect::<Vec<_>>()
                .join(",")
        };
        (join(&self.allow), join(&self.deny))
    }

    /// The lists from the wire (`allow`, `deny`: blocks separated by commas).
    pub fn from_wire(allow: &str, deny: &str) -> Result<Self, BadCidr> {
        let parse = |text: &str| -> Result<Vec<Cidr>, BadCidr> {
            (text.split(',').filter(|t| !t.trim().is_empty()))
                .map(str::parse)
                .collect()
        };
        Ok(Self {
            allow: parse(allow)?,
            deny: parse(deny)?,
        })
    }
}

/// A service's rules: every list it must pass (its token's, its
/// registration's); none admits everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceRules {
    lists: Vec<VisitorRules>,
}

impl ServiceRules {
    /// True when they admit everyone (nothing to check).
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// Whether a visitor from `ip` is admitted.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.lists.iter().try_for_each(|l| l.check(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn rules(allow: &str, deny: &str) -> VisitorRules {
        VisitorRules::from_wire(allow, deny).unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses_in_both_families() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(
            net.contains(ip("::ffff:10.1.0.9")),
            "an IPv4-mapped visitor"
        );
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.1.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
    }

    #[test]
    fn a_bad_block_says_what_is_wrong() {
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("longer than the address"), "{e}");
        let e = "ten/8".parse::<Cidr>().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("\"ten/8\" is not an address block"),
            "{e}"
        );
    }

    #[test]
    fn deny_wins_and_an_empty_allow_admits_everyone() {
        let r = rules("10.0.0.0/8", "10.9.0.0/16");
        assert_eq!(r.check(ip("10.1.1.1")), Ok(()));
        assert_eq!(r.check(ip("10.9.1.1")), Err(Refusal::Denied));
        assert_eq!(r.check(ip("192.0.2.1")), Err(Refusal::NotAllowed));
        let open = rules("", "192.0.2.0/24");
        assert_eq!(open.check(ip("198.51.100.1")), Ok(()));
        assert_eq!(open.check(ip("192.0.2.1")), Err(Refusal::Denied));
    }

    #[test]
    fn a_service_passes_its_tokens_lists_and_its_registrations() {
        let token = rules("10.0.0.0/8", "");
        let registration = rules("10.1.0.0/16, 192.0.2.0/24", "");
        let both = token.and(&registration);
        assert_eq!(both.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(both.check(ip("10.2.0.1")), Err(Refusal::NotAllowed));
        assert_eq!(both.check(ip("192.0.2.1")), Err(Refusal::NotAllowed));
        assert!(
            VisitorRules::default()
                .and(&VisitorRules::default())
                .is_empty()
        );
    }

    #[test]
    fn the_wire_form_round_trips() {
        let r = rules("10.0.0.0/8,2001:db8::/32", "10.9.0.0/16");
        let (allow, deny) = r.to_wire();
        assert_eq!(allow, "10.0.0.0/8,2001:db8::/32");
        assert_eq!(VisitorRules::from_wire(&allow, &deny), Ok(r));
    }
}
