//! Every file in `examples/config/` parses and validates, so the documented
//! samples cannot rot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use zlayer_tunnel::{ServerFile, TunnelClientConfig};

#[test]
fn every_sample_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let mut parsed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("server") {
            let file = ServerFile::from_toml_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!file.listen.is_empty(), "{name}: no listen address");
        } else if name.starts_with("agent") {
            let mut config: TunnelClientConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            config.token = "from-the-environment".into();
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!config.services.is_empty(), "{name}: no service");
        } else {
            panic!("{name}: neither a server nor an agent sample");
        }
        parsed += 1;
    }
    assert!(parsed >= 2, "parsed only {parsed} sample files");
}

#[test]
fn a_bad_tunnel_key_is_named_with_its_table() {
    let err = ServerFile::from_toml_str("[tunnel]\nheartbeat_interval = \"0s\"").unwrap_err();
    assert!(
        err.to_string().starts_with("tunnel.heartbeat_interval:"),
        "{err}"
    );
}

/// The keys `value` (a config serialized) has at its top level.
fn keys(value: serde_json::Value) -> Vec<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

/// The README's configuration section: from its heading to the next.
fn readme_configuration() -> String {
    let readme = include_str!("../README.md");
    let start = readme.find("\n## Configuration").unwrap();
    let end = readme[start + 1..]
        .find("\n## ")
        .map_or(readme.len(), |e| start + 1 + e);
    readme[start..end].to_owned()
}

/// The line of `section` that documents `key` as a table row, if any.
fn documented(section: &str, key: &str) -> bool {
    let row = format!("| `{key}` |");
    section.lines().any(|line| line.starts_with(&row))
}

/// Every key the config structs read is in the README's tables (the
/// server's and the agent's), its `[[services]]` row, or its list of a
/// server file's keys: a new key cannot go undocumented.
#[test]
fn the_readme_documents_every_config_key() {
    let section = readme_configuration();
    let server = zlayer_tunnel::TunnelServerConfig::default();
    let mut missing: Vec<String> = keys(serde_json::to_value(server).unwrap())
        .into_iter()
        .filter(|k| !documented(&section, k))
        .collect();
    let mut agent = TunnelClientConfig::new("ws://x", "t");
    // the keys left out when empty, set
    agent.ca_cert = Some("ca.pem".into());
    agent.client_id = Some(uuid::Uuid::nil());
    agent.servers = vec!["ws://y".into()];
    agent.access_targets = vec!["127.0.0.1:1".into()];
    let agent_keys = keys(serde_json::to_value(&agent).unwrap());
    missing.extend(
        (agent_keys.into_iter())
            .filter(|k| k != "services" && !documented(&section, k))
            .map(|k| format!("agent {k}")),
    );
    let services = section
        .lines()
        .find(|l| l.starts_with("| `[[services]]` |"))
        .unwrap();
    let mut service = zlayer_tunnel::ServiceConfig::tcp("a", 1)
        .with_proxy_protocol(zlayer_tunnel::proxy_protocol::ProxyVersion::V2)
        .with_visitor_rate(1)
        .with_bandwidth(1);
    service.health_check = Some(zlayer_tunnel::HealthCheck::Tcp);
    service.allow = vec!["10.0.0.0/8".parse().unwrap()];
    service.deny = service.allow.clone();
    for key in keys(serde_json::to_value(service).unwrap()) {
        if !services.contains(&format!("`{key}`")) {
            missing.push(format!("[[services]] {key}"));
        }
    }
    let file_keys = keys(serde_json::to_value(ServerFile::default()).unwrap());
    let token_keys = ["hash", "register", "access", "ports", "visitors_allow"];
    for key in file_keys.iter().map(String::as_str).chain(token_keys) {
        let named = |form: String| section.contains(&form);
        if key != "tunnel" && !named(format!("`{key}`")) && !named(format!("`[[{key}]]`")) {
            missing.push(format!("server file {key}"));
        }
    }
    assert!(missing.is_empty(), "undocumented config keys: {missing:?}");
}
