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
    Proc::spawn_with(&["agent", "--server", url, "--tcp", &service], |c| {
        c.env("ZLAYER_TUNNEL_TOKEN", token);
    })
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
    let public = free_ports(3);
    let flags = [
        "--config",
        config.to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let mut server = Proc::server_with(public, &flags, |c| {
        c.env_remove("ZLAYER_TUNNEL_TOKEN");
        c.env("ZLAYER_TUNNEL_ADMIN_TOKEN", "admin-secret");
    });
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    let url = format!("ws://{control}/tunnel/v1");
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

    // SIGHUP reloads too: the new token goes
    write_config(&config, &["keep-token"]);
    server.hangup();
    server.wait_for("configuration reloaded tokens=1 removed=1 tunnels_closed=1");
    newcomer.wait_for("the token was removed from the server's configuration");
    common::echo_through(([127, 0, 0, 1], kept_port).into(), 4, 1 << 20).await;
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
