//! Capability bits that negotiate our data-plane extension (see docs/PROTOCOL.md §4).

use std::fmt;

/// Version of the extension block carried after `Auth` and `AuthOk`.
pub const EXT_VERSION: u8 = 1;

/// Default initial per-stream window, used when a peer announces none.
pub const DEFAULT_INITIAL_WINDOW: u32 = 64 * 1024;

/// Largest window (and window increment) a peer may announce: 2^31 - 1, as HTTP/2.
pub const MAX_WINDOW: u32 = i32::MAX as u32;

/// A set of data-plane features, as announced in the extension block.
///
/// ```
/// use zlayer_tunnel::protocol::Features;
/// let ours = Features::STREAMS | Features::DATAGRAMS;
/// assert_eq!(ours & Features::STREAMS, Features::STREAMS);
/// assert!(!ours.contains(Features::ACCESS));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u32);

impl Features {
    /// No feature: a legacy (control-plane only) peer.
    pub const NONE: Self = Self(0);
    /// TCP streams multiplexed over the control WebSocket (`Data`, `Close`, `Window`).
    pub const STREAMS: Self = Self(1);
    /// UDP flows carried as `Datagram` messages.
    pub const DATAGRAMS: Self = Self(1 << 1);
    /// `Open`: streams to a named service, for on-demand access sessions.
    pub const ACCESS: Self = Self(1 << 2);
    /// `Health`: the agent reports a service's local health checks.
    pub const HEALTH: Self = Self(1 << 3);
    /// `Open` of UDP flows (a cluster's peer links forward UDP visitors).
    pub const ACCESS_UDP: Self = Self(1 << 4);
    /// `Connect` carries the public address the visitor reached (for the
    /// PROXY protocol headers an agent writes).
    pub const PROXY: Self = Self(1 << 5);
    /// `Register` carries visitor address lists the server enforces.
    pub const VISITOR_RULES: Self = Self(1 << 6);
    /// An `Open` may be a probe: the server answers whether the service
    /// exists and may be reached (`ConnectAck` or `ConnectFail`) and relays
    /// nothing.
    pub const ACCESS_PROBE: Self = Self(1 << 7);
    /// The server takes several links from one agent, each registering the
    /// agent's services as replicas (`connections`): an agent opens links
    /// beyond its first only to a server that announces it.
    pub const LINKS: Self = Self(1 << 8);
    /// Everything this implementation supports.
    pub const ALL: Self = Self(0b1_1111_1111);

    /// Builds a set from raw bits; unknown bits are kept (a newer peer's features).
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The raw bits, as they travel on the wire.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True when every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Features {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Features {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::STREAMS, "STREAMS"),
            (Self::DATAGRAMS, "DATAGRAMS"),
            (Self::ACCESS, "ACCESS"),
            (Self::HEALTH, "HEALTH"),
            (Self::ACCESS_UDP, "ACCESS_UDP"),
            (Self::PROXY, "PROXY"),
            (Self::VISITOR_RULES, "VISITOR_RULES"),
            (Self::ACCESS_PROBE, "ACCESS_PROBE"),
            (Self::LINKS, "LINKS"),
        ];
        let mut list = f.debug_set();
        for (bit, name) in names {
            if self.contains(bit) {
                list.entry(&format_args!("{name}"));
            }
        }
        let unknown = self.0 & !Self::ALL.0;
        if unknown != 0 {
            list.entry(&format_args!("{unknown:#x}"));
        }
        list.finish()
    }
}

/// What a peer announces in the extension block of `Auth` (agent) or `AuthOk` (server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Features offered (`Auth`) or accepted (`AuthOk`, a subset of the offer).
    pub features: Features,
    /// Bytes the announcer accepts on each new stream before its first `Window`.
    pub initial_window: u32,
}

impl Capabilities {
    /// Capabilities with the default initial window.
    pub const fn new(features: Features) -> Self {
        Self {
            features,
            initial_window: DEFAULT_INITIAL_WINDOW,
        }
    }

    /// The answer a server gives to `offer`: the features both sides support.
    pub fn accept(offer: Self, supported: Features, initial_window: u32) -> Self {
        Self {
            features: offer.features & supported,
            initial_window,
        }
    }
}

/// Features of a peer that sent no extension block: control plane only.
pub fn features_of(caps: Option<Capabilities>) -> Features {
    caps.map_or(Features::NONE, |c| c.features)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_is_the_intersection() {
        let offer = Capabilities::new(Features::from_bits(0b10_0000_0101));
        let answer = Capabilities::accept(offer, Features::ALL, 4096);
        assert_eq!(answer.features, Features::STREAMS | Features::ACCESS);
        assert_eq!(answer.initial_window, 4096);
    }

    #[test]
    fn debug_names_bits_and_keeps_unknown_ones() {
        let f = Features::STREAMS | Features::LINKS | Features::from_bits(0x400);
        assert_eq!(format!("{f:?}"), "{STREAMS, LINKS, 0x400}");
    }

    #[test]
    fn no_block_means_legacy() {
        assert!(features_of(None).is_empty());
    }
}
