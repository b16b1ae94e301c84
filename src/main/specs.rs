//! The values of the flags that take a spec (`--port-range LOW-HIGH`,
//! `--tcp`/`--udp NAME:LOCAL_PORT:REMOTE_PORT`, `--node-tunnel
//! NAME:LOCAL_PORT:REMOTE_PORT@URL`). clap calls these and prints their error
//! after `invalid value`, so each names the text it refused and the form wanted.

use zlayer_tunnel::ServiceConfig;

/// `LOW-HIGH`, inclusive, with `1 <= LOW <= HIGH`.
pub(crate) fn parse_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected LOW-HIGH"))?;
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{text:?}: {p:?} is not a port"))
    };
    let (low, high) = (port(low)?, port(high)?);
    if low == 0 || low > high {
        return Err(format!("{text:?}: need 1 <= LOW <= HIGH"));
    }
    Ok((low, high))
}

/// A UDP service: the same spec as [`parse_service`].
pub(crate) fn parse_udp_service(text: &str) -> Result<ServiceConfig, String> {
    let tcp = parse_service(text)?;
    Ok(ServiceConfig {
        protocol: zlayer_tunnel::ServiceProtocol::Udp,
        ..tcp
    })
}

/// A TCP service: `NAME:LOCAL_PORT:REMOTE_PORT` (on 127.0.0.1) or
/// `NAME:HOST:PORT:REMOTE_PORT`, the host an IPv6 address in brackets or not.
pub(crate) fn parse_service(text: &str) -> Result<ServiceConfig, String> {
    let bad =
        || format!("{text:?}: expected NAME:LOCAL_PORT:REMOTE_PORT or NAME:HOST:PORT:REMOTE_PORT");
    let (name, rest) = text.split_once(':').ok_or_else(bad)?;
    let (local, remote) = rest.rsplit_once(':').ok_or_else(bad)?;
    let remote: u16 = remote.parse().map_err(|_| bad())?;
    let (host, port) = match local.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port),
        None => ("127.0.0.1", local),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let service = ServiceConfig::tcp(name, port)
        .with_remote_port(remote)
        .with_local_host(host);
    service.validate().map_err(|e| format!("{text:?}: {e}"))?;
    Ok(service)
}

/// A node tunnel: `NAME:LOCAL_PORT:REMOTE_PORT@URL`, the URL ws:// or wss://.
pub(crate) fn parse_node_tunnel(text: &str) -> Result<(String, u16, u16, String), String> {
    let bad = || format!("{text:?}: expected NAME:LOCAL_PORT:REMOTE_PORT@URL");
    let (spec, url) = text.split_once('@').ok_or_else(bad)?;
    let mut parts = spec.split(':');
    let (Some(name), Some(local), Some(remote), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
        return Err(format!("{text:?}: the URL must start with ws:// or wss://"));
    }
    Ok((name.to_owned(), port(local)?, port(remote)?, url.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_inclusive_and_starts_at_one() {
        assert_eq!(parse_range("21011-21011"), Ok((21011, 21011)));
        assert!(parse_range("0-10").is_err());
        assert!(parse_range("5-1").is_err());
        assert!(parse_range("5").is_err());
    }

    #[test]
    fn a_service_has_a_default_host_or_its_own() {
        let ssh = parse_service("ssh:22:30000").unwrap();
        assert_eq!((ssh.local_port, ssh.remote_port), (22, 30000));
        assert_eq!(ssh.local_host, "127.0.0.1");
        let v6 = parse_udp_service("dns:[::1]:53:0").unwrap();
        assert_eq!(v6.local_host, "::1");
        assert_eq!(v6.protocol, zlayer_tunnel::ServiceProtocol::Udp);
        assert!(parse_service("ssh:22").is_err());
    }

    #[test]
    fn a_node_tunnel_needs_a_websocket_url() {
        let parsed = parse_node_tunnel("db:5432:15432@ws://b:7000/tunnel/v1").unwrap();
        assert_eq!(parsed.0, "db");
        assert_eq!((parsed.1, parsed.2), (5432, 15432));
        assert!(parse_node_tunnel("db:5432:15432@http://b").is_err());
        assert!(parse_node_tunnel("db:5432@ws://b").is_err());
    }
}
