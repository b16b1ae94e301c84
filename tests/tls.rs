//! `wss://` with the binaries, with certificates made at test time: a private
//! CA, the server's own self-signed `CA:TRUE` certificate pinned with
//! `--ca-cert`, and the refusal of a server the agent cannot verify.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::certs::{self, Pem};
use common::process::Proc;
use common::{echo_through, free_ports, services};

/// A directory of PEM files, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zlt-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `wss://` server with `pem` on a control port of the OS's choosing,
/// publishing on `public`: it and its control port, once it listens.
fn tls_server(files: &Files, pem: &Pem, public: u16) -> (Proc, u16) {
    let cert = files.write("server.pem", &pem.cert);
    let key = files.write("server-key.pem", &pem.key);
    let mut server = Proc::server((public, public), &["--tls-cert", &cert, "--tls-key", &key]);
    let control = server.listening_addr("scheme=\"wss\"").port();
    (server, control)
}

fn agent(url: &str, ca: &str, service: u16, public: u16) -> Proc {
    let spec = format!("echo:{service}:{public}");
    let one_link = ["--connections", "1"];
    Proc::spawn_with(
        &["agent", "--server", url, "--ca-cert", ca, "--tcp", &spec],
        |c| {
            c.args(one_link);
        },
    )
}

#[actix_web::test]
async fn an_agent_trusts_a_private_ca() {
    let files = Files::new("ca");
    let (ca, pem) = certs::private_ca();
    let public = free_ports(1).0;
    let (_server, control) = tls_server(&files, &pem, public);
    let ca = files.write("ca.pem", &ca);
    let url = format!("wss://localhost:{control}/tunnel/v1");
    let mut agent = agent(&url, &ca, services::echo().await, public);
    assert_eq!(agent.registered_port(), public);
    echo_through(([127, 0, 0, 1], public).into(), 7, 2 << 20).await;
}

/// The agent pins the server's own self-signed certificate with
/// `--ca-cert`, and so does `access`.
#[actix_web::test]
async fn an_agent_and_access_pin_a_self_signed_ca_true_certificate() {
    let files = Files::new("pinned");
    let pem = certs::self_signed_ca_true();
    let public = free_ports(1).0;
    let (_server, control) = tls_server(&files, &pem, public);
    let pinned = files.write("cert.pem", &pem.cert);
    let url = format!("wss://127.0.0.1:{control}/tunnel/v1");
    let mut agent = agent(&url, &pinned, services::echo().await, public);
    assert_eq!(agent.registered_port(), public);
    echo_through(([127, 0, 0, 1], public).into(), 7, 2 << 20).await;
    let args = [
        "access",
        "--server",
        &url,
        "--ca-cert",
        &pinned,
        "--service",
        "echo",
    ];
    let mut access = Proc::spawn_with(&args, |c| {
        c.stdout(std::process::Stdio::piped());
    });
    let line = access.wait_for("access open");
    let local: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("local="))
        .unwrap()
        .parse()
        .unwrap();
    echo_through(local, 8, 1 << 20).await;
}

#[actix_web::test]
async fn an_agent_refuses_a_server_it_cannot_verify() {
    let files = Files::new("refused");
    let pem = certs::self_signed_ca_true();
    let public = free_ports(1).0;
    let (mut server, control) = tls_server(&files, &pem, public);
    let (other_ca, _) = certs::private_ca();
    let other = files.write("other-ca.pem", &other_ca);
    let url = format!("wss://localhost:{control}/tunnel/v1");
    let mut doubting = agent(&url, &other, services::echo().await, public);
    let line = doubting.wait_for("certificate");
    assert!(line.contains("not trusted"), "{line}");
    // said once, and retried at the longest delay: retrying soon cannot help
    let line = doubting.wait_for("retrying soon cannot fix this");
    assert!(
        line.contains("ERROR") && line.contains("--ca-cert"),
        "{line}"
    );
    // access fails at once, saying what to give
    let (_, err) = Proc::failed(&["access", "--server", &url, "--service", "echo"]);
    assert!(
        err.contains("error: ") && err.contains("not trusted") && err.contains("--ca-cert"),
        "{err}"
    );
    // without --ca-cert the system roots do not vouch for it either
    let spec = format!("echo:1:{public}");
    let mut system = Proc::spawn(&["agent", "--server", &url, "--tcp", &spec]);
    let line = system.wait_for("certificate");
    assert!(
        line.contains("not trusted") || line.contains("no trusted root"),
        "{line}"
    );
    // each told why, and neither registered anywhere: an agent that trusts
    // the server gets the one public port, and is the only one authenticated
    // in the server's log up to its registration
    let pinned = files.write("cert.pem", &pem.cert);
    let trusting = format!("wss://127.0.0.1:{control}/tunnel/v1");
    let mut trusted = agent(&trusting, &pinned, services::echo().await, public);
    assert_eq!(trusted.registered_port(), public);
    server.wait_for("service registered");
    let authenticated = server
        .seen()
        .iter()
        .filter(|l| l.contains("agent authenticated"))
        .count();
    assert_eq!(
        authenticated, 1,
        "an agent authenticated to a server it could not verify"
    );
}

/// A `wss://` URL at a plain `ws://` server: the agent says the server does
/// not speak TLS there and what to use, not a TLS parser's complaint alone.
#[actix_web::test]
async fn wss_to_a_plain_server_says_to_use_ws() {
    let public = free_ports(1).0;
    let mut server = Proc::server((public, public), &[]);
    let control = server.listening_addr("control channel listening");
    let url = format!("wss://{control}/tunnel/v1");
    let spec = format!("echo:1:{public}");
    let mut agent = Proc::spawn(&["agent", "--server", &url, "--tcp", &spec]);
    let line = agent.wait_for("does not speak TLS");
    assert!(line.contains("use ws://"), "{line}");
}
