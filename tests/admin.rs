//! The admin listener is guarded: `/healthz` stays open, reading needs the
//! read token when one is set (the admin token reads too), a wrong or
//! missing token is a 401 that is counted and logged without the token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::free_ports;
use common::process::Proc;

/// `GET path` on `admin` with `token` as bearer, if any: status and body.
async fn get(admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    common::http_bearer("GET", &format!("http://{admin}{path}"), token).await
}

/// Reading with the read token, the admin token, neither, a wrong one.
async fn guarded(admin: SocketAddr) {
    assert_eq!(
        get(admin, "/healthz", None).await.0,
        200,
        "/healthz stays open"
    );
    let (status, body) = get(admin, "/status", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token is required"), "{body}");
    assert_eq!(get(admin, "/metrics", Some("wrong-secret")).await.0, 401);
    assert_eq!(get(admin, "/status", Some("reader")).await.0, 200);
    let (status, metrics) = get(admin, "/metrics", Some("admin-secret")).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("zlayer_tunnel_admin_refused_total 2\n"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_servers_admin_listener_wants_its_tokens() {
    let public = free_ports(1);
    let flags = [
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-read-token",
        "reader",
    ];
    let mut server = Proc::server_with(public, &flags, |c| {
        c.env("ZLAYER_TUNNEL_ADMIN_TOKEN", "admin-secret");
    });
    let admin = server.listening_addr("admin endpoints listening");
    guarded(admin).await;
    let line = server.wait_for("admin request refused");
    assert!(
        line.contains("/status") && !line.contains("wrong-secret"),
        "{line}"
    );
    let logged = server.seen().join("\n");
    assert!(
        !logged.contains("admin-secret") && !logged.contains("reader"),
        "a token was logged"
    );
}

#[actix_web::test]
async fn an_agents_admin_listener_wants_its_tokens() {
    let public = free_ports(1);
    let mut server = Proc::server(public, &[]);
    let control = server.listening_addr("control channel listening");
    let url = format!("ws://{control}/tunnel/v1");
    let dir = std::env::temp_dir().join(format!("zlt-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("admin-token");
    std::fs::write(&file, "admin-secret\n").unwrap();
    let args = [
        "agent",
        "--server",
        &url,
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-token-file",
        file.to_str().unwrap(),
    ];
    let mut agent = Proc::spawn_with(&args, |c| {
        c.env("ZLAYER_TUNNEL_ADMIN_READ_TOKEN", "reader");
    });
    let admin = agent.listening_addr("admin endpoints listening");
    guarded(admin).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn without_tokens_reading_is_open_as_before() {
    let public = free_ports(1);
    let mut server = Proc::server(public, &["--admin-listen", "127.0.0.1:0"]);
    let admin = server.listening_addr("admin endpoints listening");
    assert_eq!(get(admin, "/status", None).await.0, 200);
    assert_eq!(get(admin, "/metrics", Some("anything")).await.0, 200);
}
