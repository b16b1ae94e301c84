//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an agent
//! writes to a local service before a visitor's first byte (or before each
//! datagram of a UDP flow, version 2), so that the service sees the
//! visitor's address rather than the agent's. Encoding only; no IO.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The version 2 header's first twelve bytes.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Which PROXY protocol header a service is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`); TCP services only.
    V1,
    /// The binary header; TCP and UDP services.
    V2,
}

impl fmt::Display for ProxyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// A PROXY protocol version that is not `v1` or `v2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown PROXY protocol version {0:?}: use v1 or v2")]
pub struct UnknownVersion(pub String);

impl FromStr for ProxyVersion {
    type Err = UnknownVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(Self::V1),
            "v2" | "2" => Ok(Self::V2),
            _ => Err(UnknownVersion(s.to_owned())),
        }
    }
}

/// What the visitor's bytes travel as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP stream.
    Stream,
    /// UDP datagrams.
    Datagram,
}

/// The header for a visitor at `source` who reached `destination` (the
/// public address and port), both as the server wrote them. Either one
/// missing or unparsable (a stream opened by an access client or a peer
/// with no visitor address) gives the header that says so: `PROXY UNKNOWN`
/// (v1) or the `LOCAL` command (v2), which receivers accept and answer with
/// the connection's own addresses.
pub fn header(
    version: ProxyVersion,
    transport: Transport,
    source: &str,
    destination: &str,
) -> Bytes {
    let addresses = parse(source).zip(parse(destination)).map(same_family);
    match version {
        ProxyVersion::V1 => v1(addresses),
        ProxyVersion::V2 => v2(transport, addresses),
    }
}

fn parse(text: &str) -> Option<SocketAddr> {
    text.parse().ok()
}

/// Both addresses in one family: an IPv4 one beside an IPv6 one becomes
/// IPv4-mapped IPv6.
fn same_family((source, destination): (SocketAddr, SocketAddr)) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

fn v1(addresses: Option<(SocketAddr, SocketAddr)>) -> Bytes {
    let Some((source, destination)) = addresses else {
        return Bytes::from_static(b"PROXY UNKNOWN\r\n");
    };
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    let line = format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    );
    Bytes::from(line)
}

fn v2(transport: Transport, addresses: Option<(SocketAddr, SocketAddr)>) -> Bytes {
    let mut header = BytesMut::with_capacity(16 + 36);
    header.put_slice(&V2_SIGNATURE);
    let Some((source, destination)) = addresses else {
        // version 2, LOCAL; family unspecified, no addresses
        header.put_slice(&[0x20, 0x00, 0x00, 0x00]);
        return header.freeze();
    };
    header.put_u8(0x21); // version 2, PROXY
    let protocol = match transport {
        Transport::Stream => 0x1,
        Transport::Datagram => 0x2,
    };
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            header.put_u8(0x10 | protocol);
            header.put_u16(12);
            header.put_slice(&from.octets());
            header.put_slice(&to.octets());
        }
        (from, to) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                IpAddr::V6(ip) => ip.octets(),
            };
            header.put_u8(0x20 | protocol);
            header.put_u16(36);
            header.put_slice(&v6(from));
            header.put_slice(&v6(to));
        }
    }
    header.put_u16(source.port());
    header.put_u16(destination.port());
    header.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_says_the_visitor_and_the_public_address() {
        let h = header(
            ProxyVersion::V1,
            Transport::Stream,
            "192.0.2.7:4000",
            "198.51.100.1:443",
        );
        assert_eq!(&h[..], b"PROXY TCP4 192.0.2.7 198.51.100.1 4000 443\r\n");
        let h = header(
            ProxyVersion::V1,
            Transport::Stream,
            "[2001:db8::7]:4000",
            "[2001:db8::1]:443",
        );
        assert_eq!(&h[..], b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n");
        let unknown = header(ProxyVersion::V1, Transport::Stream, "", "198.51.100.1:443");
        assert_eq!(&unknown[..], b"PROXY UNKNOWN\r\n");
        // the longest v1 line fits the spec's 107 bytes
        let longest = header(
            ProxyVersion::V1,
            Transport::Stream,
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        assert_eq!(longest.len(), 104);
    }

    #[test]
    fn v2_is_the_specs_binary_header() {
        let h = header(
            ProxyVersion::V2,
            Transport::Stream,
            "192.0.2.7:4000",
            "198.51.100.1:443",
        );
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend([0x21, 0x11, 0, 12, 192, 0, 2, 7, 198, 51, 100, 1]);
        expected.extend([0x0f, 0xa0, 0x01, 0xbb]);
        assert_eq!(&h[..], &expected[..]);
        let udp = header(
            ProxyVersion::V2,
            Transport::Datagram,
            "[2001:db8::7]:53",
            "[::1]:5353",
        );
        assert_eq!(&udp[12..16], &[0x21, 0x22, 0, 36]);
        assert_eq!(udp.len(), 16 + 36);
        assert_eq!(&udp[48..52], &[0, 53, 0x14, 0xe9]);
        let local = header(ProxyVersion::V2, Transport::Stream, "", "");
        assert_eq!(&local[12..], &[0x20, 0, 0, 0]);
    }

    #[test]
    fn mixed_families_become_mapped_ipv6() {
        let h = header(
            ProxyVersion::V1,
            Transport::Stream,
            "192.0.2.7:1",
            "[::1]:2",
        );
        assert_eq!(&h[..], b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n");
    }

    #[test]
    fn versions_parse_with_a_clear_error() {
        assert_eq!("v2".parse::<ProxyVersion>(), Ok(ProxyVersion::V2));
        assert_eq!("V1".parse::<ProxyVersion>(), Ok(ProxyVersion::V1));
        let e = "v3".parse::<ProxyVersion>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown PROXY protocol version \"v3\": use v1 or v2"
        );
    }
}
