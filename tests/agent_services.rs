//! An agent's services change while it runs: from the library and the
//! admin API (`GET/POST/DELETE /services`, the admin token required to
//! change), and on `SIGHUP` from its config file. Added services are
//! published, removed ones withdrawn (their streams end), the others'
//! streams are not touched: a transfer runs through one meanwhile, checked
//! byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::free_ports;
use common::process::Proc;

/// A server; its control URL.
fn server() -> (Proc, String) {
    let mut server = Proc::server(free_ports(4), &[]);
    let control = server.listening_addr("control channel listening");
    (server, format!("ws://{control}/tunnel/v1"))
}

/// A stream through `port` that echoes a byte, held open.
async fn held(port: u16) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).await.unwrap();
    s
}

/// True once `stream` ends (EOF or reset) within two seconds.
async fn ends(mut stream: tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
    matches!(read, Ok(Ok(0) | Err(_)))
}

/// True if a visitor of `port` is answered.
async fn answered(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let _ = s.write_all(b"?").await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut byte)).await;
    matches!(read, Ok(Ok(_)))
}

async fn admin_call(
    method: &str,
    admin: SocketAddr,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    let client = awc::Client::new();
    let url = format!("http://{admin}{path}");
    let request = match method {
        "POST" => client.post(url).content_type("application/json"),
        "DELETE" => client.delete(url),
        _ => client.get(url),
    };
    let request = request.insert_header(("Authorization", format!("Bearer {token}")));
    let mut answer = request.send_body(body.to_owned()).await.unwrap();
    let text = answer.body().await.unwrap();
    (
        answer.status().as_u16(),
        String::from_utf8_lossy(&text).into_owned(),
    )
}

#[actix_web::test]
async fn services_added_and_removed_through_the_admin_api_leave_the_others_untouched() {
    let (_server, url) = server();
    let local = common::services::echo().await;
    let keep = format!("keep:{local}:0");
    let args = [
        "agent",
        "--server",
        &url,
        "--tcp",
        &keep,
        "--admin-listen",
        "127.0.0.1:0",
        "--connections",
        "1",
    ];
    let mut agent = Proc::spawn_with(&args, |c| {
        c.env("ZLAYER_TUNNEL_ADMIN_TOKEN", "admin-secret");
    });
    let admin = agent.listening_addr("admin endpoints listening");
    let keep_port = agent.registered_port();
    let transfer = tokio::spawn(common::echo_through(
        ([127, 0, 0, 1], keep_port).into(),
        1,
        32 << 20,
    ));

    let body = format!("{{\"name\": \"added\", \"local_port\": {local}}}");
    assert_eq!(
        admin_call("POST", admin, "/services", "wrong", &body)
            .await
            .0,
        401
    );
    let (status, listed) = admin_call("POST", admin, "/services", "admin-secret", &body).await;
    assert_eq!(status, 200, "{listed}");
    assert!(
        listed.contains("\"added\"") && listed.contains("\"keep\""),
        "{listed}"
    );
    let added_port = agent.registered_port();
    common::echo_through(([127, 0, 0, 1], added_port).into(), 2, 1 << 20).await;
    let stream = held(added_port).await;

    let (status, _) = admin_call("DELETE", admin, "/services/added", "admin-secret", "").await;
    assert_eq!(status, 204);
    assert!(ends(stream).await, "the withdrawn service's stream ends");
    assert!(!answered(added_port).await, "its port no longer answers");
    assert_eq!(
        transfer.await.unwrap(),
        32 << 20,
        "the kept service's transfer whole"
    );
    let (status, listed) = admin_call("GET", admin, "/services", "admin-secret", "").await;
    assert_eq!(status, 200);
    assert!(
        !listed.contains("\"added\"") && listed.contains("\"keep\""),
        "{listed}"
    );
    let (status, text) = admin_call("DELETE", admin, "/services/added", "admin-secret", "").await;
    assert_eq!(status, 404, "{text}");
    let bad = "{\"name\": \"bad name\", \"local_port\": 1}";
    let (status, text) = admin_call("POST", admin, "/services", "admin-secret", bad).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("service.name"), "{text}");
}

#[actix_web::test]
async fn sighup_rereads_the_agents_services() {
    let (_server, url) = server();
    let local = common::services::echo().await;
    let dir = std::env::temp_dir().join(format!("zlt-agent-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("agent.toml");
    let services = |names: &[&str]| {
        let mut toml = format!(
            "server_url = \"{url}\"\ntoken = \"{}\"\n",
            common::process::TOKEN
        );
        for name in names {
            toml.push_str(&format!(
                "[[services]]\nname = \"{name}\"\nlocal_port = {local}\n"
            ));
        }
        toml
    };
    std::fs::write(&config, services(&["a", "b"])).unwrap();
    let mut agent = Proc::spawn(&["agent", "--config", config.to_str().unwrap()]);
    let (first, second) = (agent.registered_port(), agent.registered_port());
    let lines = agent.seen().join("\n");
    let (a_port, b_port) = if lines.contains(&format!("service=a public_port={first}")) {
        (first, second)
    } else {
        (second, first)
    };
    let transfer = tokio::spawn(common::echo_through(
        ([127, 0, 0, 1], a_port).into(),
        3,
        32 << 20,
    ));
    let b_stream = held(b_port).await;

    std::fs::write(&config, services(&["a", "c"])).unwrap();
    agent.hangup();
    // c's registration and the reload's summary come from two threads:
    // either may be logged first, so c's is awaited first, then the summary
    // (looked up among the lines read meanwhile too)
    let c_port = agent.registered_port();
    let summary = "configuration reloaded added=1 removed=1 changed=0";
    if !agent.seen().iter().any(|l| l.contains(summary)) {
        agent.wait_for(summary);
    }
    assert!(ends(b_stream).await, "b's stream ends");
    common::echo_through(([127, 0, 0, 1], c_port).into(), 4, 1 << 20).await;
    assert_eq!(transfer.await.unwrap(), 32 << 20, "a's transfer whole");

    // a file that does not parse changes nothing
    std::fs::write(&config, "server_url = 1\n").unwrap();
    agent.hangup();
    agent.wait_for("configuration not reloaded; nothing changed");
    common::echo_through(([127, 0, 0, 1], c_port).into(), 5, 1 << 20).await;
    let _ = std::fs::remove_dir_all(&dir);
}
