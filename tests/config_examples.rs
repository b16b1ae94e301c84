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
