use super::*;

#[test]
fn seed_builder_api() {
    let config = TunnelClientConfig::new("wss://tunnel.example.com/tunnel/v1", "my-auth-token")
        .with_service(ServiceConfig::tcp("ssh", 22).with_remote_port(2222))
        .with_service(ServiceConfig::udp("dns", 53));
    assert_eq!(config.services[0].remote_port, 2222);
    assert_eq!(config.services[1].protocol, ServiceProtocol::Udp);
    assert_eq!(config.services[1].local_addr(), "127.0.0.1:53");
    assert!(config.validate().is_ok());
    assert!(!format!("{config:?}").contains("my-auth-token"));
}

#[test]
fn server_defaults_are_valid() {
    let config = TunnelServerConfig::default();
    assert!(config.validate().is_ok());
    assert_eq!(config.control_path, "/tunnel/v1");
    assert_eq!(config.data_port_range, (30000, 31000));
}

#[test]
fn errors_name_the_key() {
    let bad =
        TunnelServerConfig::new().with_heartbeat(Duration::from_secs(30), Duration::from_secs(5));
    let err = bad.validate().unwrap_err();
    assert!(err.to_string().starts_with("heartbeat_timeout:"), "{err}");

    let bad = TunnelServerConfig::new().with_port_range(10, 9);
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .starts_with("data_port_range:")
    );

    let bad = TunnelClientConfig::new("http://x", "t");
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .starts_with("server_url:")
    );

    let bad = TunnelClientConfig::new("ws://x", "t")
        .with_service(ServiceConfig::tcp("a", 1))
        .with_service(ServiceConfig::tcp("a b", 2));
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.starts_with("services[1].name:"), "{err}");

    let bad = TunnelClientConfig::new("ws://x", "t")
        .with_service(ServiceConfig::tcp("a", 1))
        .with_service(ServiceConfig::tcp("a", 2));
    assert!(bad.validate().unwrap_err().to_string().contains("twice"));

    let err = ServiceConfig::udp("dns", 53)
        .with_bandwidth(1000)
        .validate()
        .unwrap_err();
    assert!(
        err.to_string().starts_with("service.bandwidth: is for TCP"),
        "{err}"
    );

    let long = "n".repeat(256);
    let err = ServiceConfig::tcp(long, 1).validate().unwrap_err();
    assert!(err.to_string().starts_with("service.name:"));
}

/// The first key a validation error names.
fn bad_key(result: Result<(), ConfigError>) -> String {
    match result {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

#[test]
fn window_and_budget_errors_name_the_key() {
    let server = |edit: fn(&mut TunnelServerConfig)| {
        let mut config = TunnelServerConfig::new();
        edit(&mut config);
        bad_key(config.validate())
    };
    assert_eq!(server(|c| c.stream_window = 1023), "stream_window");
    assert_eq!(server(|c| c.read_ahead = 65535), "read_ahead");
    assert_eq!(server(|c| c.udp_in_flight = 0), "udp_in_flight");
    assert_eq!(
        server(|c| c.max_stream_window = c.stream_window - 1),
        "max_stream_window"
    );
    assert_eq!(
        server(|c| c.max_stream_window = MAX_WINDOW + 1),
        "max_stream_window"
    );
    assert_eq!(
        server(|c| c.tunnel_window_budget = 0),
        "tunnel_window_budget"
    );

    let agent = |edit: fn(&mut TunnelClientConfig)| {
        let mut config = TunnelClientConfig::new("ws://x", "t");
        edit(&mut config);
        bad_key(config.validate())
    };
    assert_eq!(agent(|c| c.stable_after = Duration::ZERO), "stable_after");
    assert_eq!(agent(|c| c.read_ahead = 1000), "read_ahead");
    assert_eq!(agent(|c| c.udp_waiting = 0), "udp_waiting");
    assert_eq!(agent(|c| c.stream_window = 0), "stream_window");
    assert_eq!(
        agent(|c| c.max_stream_window = c.stream_window - 1),
        "max_stream_window"
    );
    assert_eq!(
        agent(|c| c.max_stream_window = MAX_WINDOW + 1),
        "max_stream_window"
    );
    assert_eq!(
        agent(|c| c.tunnel_window_budget = 0),
        "tunnel_window_budget"
    );
}

#[test]
fn no_growth_at_all_is_a_valid_window_setting() {
    let mut server = TunnelServerConfig::new();
    server.max_stream_window = server.stream_window;
    server.tunnel_window_budget = 0;
    assert_eq!(server.validate(), Ok(()));
    let mut agent = TunnelClientConfig::new("ws://x", "t");
    agent.max_stream_window = agent.stream_window;
    agent.tunnel_window_budget = 0;
    assert_eq!(agent.validate(), Ok(()));
}

#[test]
fn the_server_file_prefixes_tunnel_keys() {
    let err = ServerFile::from_toml_str("[tunnel]\ntunnel_window_budget = 0").unwrap_err();
    assert!(
        err.to_string().starts_with("tunnel.tunnel_window_budget:"),
        "{err}"
    );
}

#[test]
fn a_token_scope_takes_port_ranges_inside_the_server_range() {
    let hash = "a".repeat(64);
    let file = ServerFile::from_toml_str(&format!(
        "[[tokens]]\nhash = \"{hash}\"\nports = [[30000, 30009], [30100, 30100]]\n"
    ))
    .unwrap();
    assert_eq!(
        file.tokens[0].ports,
        Some(vec![(30000, 30009), (30100, 30100)])
    );
    let err = ServerFile::from_toml_str(&format!(
        "[[tokens]]\nhash = \"{hash}\"\nports = [[30005, 30001]]\n"
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tokens[0].ports: 30005-30001 is empty: need 1 <= low <= high"
    );
    // checked against the final range, which a flag may have changed
    assert!(file.check_token_ports(Some((30000, 31000))).is_ok());
    let err = file.check_token_ports(Some((30005, 31000))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tokens[0].ports: 30000-30009 is outside data_port_range 30005-31000"
    );
}

#[test]
fn single_port_range_is_valid() {
    assert!(
        TunnelServerConfig::new()
            .with_port_range(21011, 21011)
            .validate()
            .is_ok()
    );
}

#[test]
fn toml_round_trip_with_human_durations() {
    let text = r#"
        control_path = "/t"
        data_port_range = [21000, 21010]
        heartbeat_interval = "500ms"
        heartbeat_timeout = "3s"
        max_tunnels = 7
    "#;
    let config = TunnelServerConfig::from_toml_str(text).unwrap();
    assert_eq!(config.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(config.max_tunnels, 7);
    assert_eq!(config.bind_host, "0.0.0.0");
    let again = toml::to_string(&config).unwrap();
    assert_eq!(TunnelServerConfig::from_toml_str(&again).unwrap(), config);
}

#[test]
fn toml_refuses_unknown_keys_and_bad_values() {
    let err = TunnelServerConfig::from_toml_str("max_tunels = 3").unwrap_err();
    assert!(
        matches!(err, ConfigError::Parse(ref m) if m.contains("max_tunels")),
        "{err}"
    );
    let err = TunnelServerConfig::from_toml_str("max_tunnels = 0").unwrap_err();
    assert!(err.to_string().starts_with("max_tunnels:"));
}

#[test]
fn client_toml_with_services() {
    let text = r#"
        server_url = "ws://127.0.0.1:7000/tunnel/v1"
        token = "secret"
        reconnect_interval = "100ms"

        [[services]]
        name = "ssh"
        local_port = 22
        remote_port = 30000

        [[services]]
        name = "dns"
        protocol = "udp"
        local_port = 53
        local_host = "::1"
    "#;
    let config = TunnelClientConfig::from_toml_str(text).unwrap();
    assert_eq!(config.token.expose(), "secret");
    assert_eq!(config.reconnect_interval, Duration::from_millis(100));
    assert_eq!(config.services[1].local_addr(), "[::1]:53");
    assert_eq!(config.services[0].protocol, ServiceProtocol::Tcp);
}

/// The target load: 10,000 visitor connections through one agent.
const TEN_THOUSAND: usize = 10_000;

#[test]
fn defaults_carry_ten_thousand_connections_through_one_agent() {
    let server = TunnelServerConfig::default();
    assert!(server.max_connections_per_service >= TEN_THOUSAND);
    assert!(server.max_streams_per_tunnel >= TEN_THOUSAND);
    assert!(server.stream_settings(0).max_streams >= TEN_THOUSAND);
    // the agent's own cap (against a server that asks without end) is above
    // the target too
    let agent = TunnelClientConfig::new("ws://x", "t");
    assert!(agent.stream_settings(0).max_streams >= TEN_THOUSAND);
}

#[test]
fn an_agent_links_to_every_server_once() {
    let config = TunnelClientConfig::from_toml_str(
        r#"
        server_url = "ws://a:7000/tunnel/v1"
        servers = ["wss://b:7000/tunnel/v1", "ws://a:7000/tunnel/v1"]
        token = "t"
        "#,
    )
    .unwrap();
    assert_eq!(
        config.server_urls(),
        ["ws://a:7000/tunnel/v1", "wss://b:7000/tunnel/v1"]
    );
    let link = config.for_server("wss://b:7000/tunnel/v1");
    assert_eq!(link.server_urls(), ["wss://b:7000/tunnel/v1"]);
    // the list alone is enough; a bad entry is named by its index
    let only_list = TunnelClientConfig::new("", "t").with_servers(["ws://b/tunnel/v1"]);
    assert!(only_list.validate().is_ok());
    let bad = TunnelClientConfig::new("ws://a/tunnel/v1", "t").with_server("http://b");
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.starts_with("servers[0]:"), "{err}");
    assert!(TunnelClientConfig::new("", "t").validate().is_err());
}
