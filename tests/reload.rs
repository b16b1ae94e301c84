//! A server's tokens change without a restart: `POST /reload` (with the
//! admin token) or `SIGHUP` re-reads the config file and token files. New
//! tokens are accepted, a removed token's tunnels are closed with a
//! `Disconnect` saying so, the other tunnels are untouched (a transfer runs
//! through one meanwhile, checked byte for byte), and a file that does not
//! parse changes nothing and is reported by key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::free_ports;
use common::process::Proc;

/// A server config with `[[tokens]]` of `tokens` (raw, hashed here).
fn write_config(path: &Path, tokens: &[&str]) {
    let mut toml = String::from("listen = []\n");
    for token in tokens {
        let hash = zlayer_tunnel::hash_token(token);
        toml.push_str(&format!("[[tokens]]\nhash = \"{hash}\"\n"));
    }
    std::fs::write(path, toml).unwrap();
}

/// `POST /reload` on `admin` with `token` as bearer: status and body.
async fn reload(admin: SocketAddr, token: Option<&str>) -> (u16, String) {
    common::http_bearer("POST", &format!("http://{admin}/reload"), token).await
}

/// An agent with `token` publishing service `name` on `url`.
fn agent(url: &str, token: &str, name: &str, local: u16) -> Proc {
    let service = format!("{name}:{local}:0");
    let one_link = ["--connections", "1"];
    Proc::spawn_with(&["agent", "--server", url, "--tcp", &service], |c| {
        c.args(one_link).env("ZLAYER_TUNNEL_TOKEN", token);
    })
}

/// A server of `config` with `ports` public ports and an admin listener
/// guarded by `admin-secret`: it, its control URL and its admin address.
fn server_of(config: &Path, ports: u16) -> (Proc, String, SocketAddr) {
    let flags = [
        "--config",
        config.to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let mut server = Proc::server_with(free_ports(ports), &flags, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
        c.env("ZLAYER_TUNNEL_ADMIN_TOKEN", "admin-secret");
    });
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    (server, format!("ws://{control}/tunnel/v1"), admin)
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[actix_web::test]
async fn tokens_change_without_a_restart_and_the_other_tunnels_are_untouched() {
    let dir = Dir(std::env::temp_dir().join(format!("zlt-reload-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let config = dir.0.join("server.toml");
    write_config(&config, &["keep-token", "drop-token"]);
    let (mut server, url, admin) = server_of(&config, 3);
    let local = common::services::echo().await;
    let mut kept = agent(&url, "keep-token", "kept", local);
    let kept_port = kept.registered_port();
    let mut dropped = agent(&url, "drop-token", "dropped", local);
    dropped.registered_port();

    // a transfer through the kept tunnel while the other token goes
    let transfer = tokio::spawn(common::echo_through(
        ([127, 0, 0, 1], kept_port).into(),
        1,
        32 << 20,
    ));
    write_config(&config, &["keep-token", "new-token"]);
    assert_eq!(
        reload(admin, None).await.0,
        401,
        "a reload needs the admin token"
    );
    let (status, body) = reload(admin, Some("admin-secret")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"removed\":1") && body.contains("\"tunnels_closed\":1"),
        "{body}"
    );
    dropped.wait_for("the token was removed from the server's configuration");
    assert_eq!(
        transfer.await.unwrap(),
        32 << 20,
        "the kept tunnel's transfer whole"
    );
    let mut newcomer = agent(&url, "new-token", "new", local);
    let port = newcomer.registered_port();
    common::echo_through(([127, 0, 0, 1], port).into(), 2, 1 << 20).await;

    // a file that does not parse changes nothing, and says where it is wrong
    std::fs::write(&config, "listen = []\n[[tokens]]\nhash = \"not-hex\"\n").unwrap();
    let (status, body) = reload(admin, Some("admin-secret")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("nothing changed") && body.contains("tokens[0].hash"),
        "{body}"
    );
    common::echo_through(([127, 0, 0, 1], kept_port).into(), 3, 1 << 20).await;
    // where tokens come from changes only with a restart
    std::fs::write(&config, "listen = []\naccept_any_token = true\n").unwrap();
    let (status, body) = reload(admin, Some("admin-secret")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("only with a restart"), "{body}");

    // SIGHUP reloads too: the new token goes
    write_config(&config, &["keep-token"]);
    server.hangup();
    server.wait_for("configuration reloaded tokens=1 removed=1 tunnels_closed=1");
    newcomer.wait_for("the token was removed from the server's configuration");
    common::echo_through(([127, 0, 0, 1], kept_port).into(), 4, 1 << 20).await;
}

#[actix_web::test]
async fn changed_limits_apply_to_the_next_tunnels_and_listeners_keep_theirs() {
    let dir = Dir(std::env::temp_dir().join(format!("zlt-limits-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let config = dir.0.join("server.toml");
    let limits = |services: usize, control_path: &str| {
        let hash = zlayer_tunnel::hash_token("a-token");
        let toml = format!(
            "listen = []\n[tunnel]\ncontrol_path = \"{control_path}\"\nmax_services_per_tunnel = {services}\n\
             [[tokens]]\nhash = \"{hash}\"\n"
        );
        std::fs::write(&config, toml).unwrap();
    };
    limits(2, "/tunnel/v1");
    let (_server, url, admin) = server_of(&config, 4);
    let local = common::services::echo().await;
    let two = |name: &str| {
        let first = format!("{name}-a:{local}:0");
        let second = format!("{name}-b:{local}:0");
        let args = ["agent", "--server", &url, "--tcp", &first, "--tcp", &second];
        Proc::spawn_with(&args, |c| {
            c.env("ZLAYER_TUNNEL_TOKEN", "a-token");
        })
    };
    let mut before = two("before");
    let port = before.registered_port();
    before.registered_port();

    let transfer = tokio::spawn(common::echo_through(
        ([127, 0, 0, 1], port).into(),
        1,
        16 << 20,
    ));
    limits(1, "/moved");
    let (status, body) = reload(admin, Some("admin-secret")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"restart_needed\":[\"control_path\"]"),
        "a changed listener key is reported, not applied: {body}"
    );
    assert_eq!(
        transfer.await.unwrap(),
        16 << 20,
        "the running tunnel untouched"
    );

    // the next tunnel has the new limit, on the path the server still serves
    let mut after = two("after");
    let port = after.registered_port();
    after.wait_for("tunnel is at its limit of 1 services");
    common::echo_through(([127, 0, 0, 1], port).into(), 2, 1 << 20).await;
}

#[actix_web::test]
async fn without_an_admin_token_nothing_can_be_changed() {
    let public = free_ports(1);
    let mut server = Proc::server(public, &["--admin-listen", "127.0.0.1:0"]);
    let admin = server.listening_addr("admin endpoints listening");
    let (status, body) = reload(admin, Some("anything")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--admin-token"), "{body}");
}
