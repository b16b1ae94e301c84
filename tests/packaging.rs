//! What packagers and operators install beside the binary, checked by the
//! tools that read it: the shell completions (bash parses them), the man
//! pages, the hardened systemd units (`systemd-analyze verify` and
//! `security`), `check-config`, and JSON logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::host::{TempDir, installed};
use common::process::Proc;

const EXE: &str = env!("CARGO_BIN_EXE_zlayer-tunnel");

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env_remove("ZLAYER_TUNNEL_TOKEN")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for command in ["server", "agent", "access", "check-config", "port-range"] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
    // bash reads the bash script without a syntax error
    let dir = TempDir::new("completions");
    let path = dir.join("zlayer-tunnel.bash");
    std::fs::write(&path, run(&["completions", "bash"]).stdout).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(checked.status.success(), "{}", stderr(&checked));
}

#[test]
fn man_pages_are_written_one_per_command() {
    let dir = TempDir::new("man");
    let out = run(&["man", "--dir", dir.0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let main = page("zlayer-tunnel.1");
    assert!(main.starts_with(".ie"), "{main}");
    assert!(main.contains(".TH zlayer-tunnel 1"), "{main}");
    let server = page("zlayer-tunnel-server.1");
    assert!(server.contains("port\\-range"), "{server}");
    assert!(page("zlayer-tunnel-agent.1").contains("proxy\\-protocol"));
    assert!(stdout(&run(&["man"])).contains(".TH zlayer-tunnel 1"));
}

/// `unit` of examples/systemd with its program here, in `dir`.
fn unit_here(dir: &TempDir, unit: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(Path::new("examples/systemd").join(unit)).unwrap();
    assert!(
        text.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "{unit}"
    );
    let path = dir.join(unit);
    std::fs::write(&path, text.replace("/usr/local/bin/zlayer-tunnel", EXE)).unwrap();
    path
}

#[test]
fn the_systemd_units_verify_and_are_hardened() {
    let Some(analyze) = installed("systemd-analyze", "systemd") else {
        return;
    };
    let dir = TempDir::new("systemd");
    for unit in [
        "zlayer-tunnel-server.service",
        "zlayer-tunnel-agent.service",
    ] {
        let path = unit_here(&dir, unit);
        let verified = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        // unknown or misspelt keys are only warned about: none may be
        let said = stderr(&verified);
        assert!(
            verified.status.success() && said.is_empty(),
            "{unit}: {said}"
        );
        // exposure 2.0 at most on systemd's scale of 10 ("OK" is below 4.0)
        let security = Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            security.status.success(),
            "{unit}: {}",
            stdout(&security).lines().last().unwrap_or_default()
        );
    }
}

#[test]
fn check_config_says_what_a_file_would_run_and_names_a_wrong_key() {
    let out = run(&["check-config", "examples/config/server.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("a valid server file"), "{said}");
    assert!(said.contains("control channel: ws://"), "{said}");
    assert!(said.contains("public ports: "), "{said}");

    let out = run(&["check-config", "examples/config/agent.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("a valid agent file"), "{said}");
    assert!(said.contains("service "), "{said}");

    let dir = TempDir::new("check-config");
    let bad = dir.join("server.toml");
    std::fs::write(
        &bad,
        "listen = [\"127.0.0.1:7000\"]\n[tunnel]\nmax_tunels = 3\n",
    )
    .unwrap();
    let out = run(&["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains("max_tunels") && said.contains("max_tunnels") && said.contains("line 3"),
        "{said}"
    );
    std::fs::write(&bad, "[tunnel]\ndata_port_range = [9, 1]\n").unwrap();
    let out = run(&["check-config", bad.to_str().unwrap(), "--as", "server"]);
    assert!(
        stderr(&out).contains("tunnel.data_port_range"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn logs_are_json_objects_with_their_span_fields_on_request() {
    let flags = ["--log-format", "json"];
    let mut server = Proc::server(common::free_ports(1), &flags);
    let line = server.wait_for("control channel listening");
    let object: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(object["level"], "INFO", "{line}");
    assert!(object["timestamp"].is_string(), "{line}");
    let control = object["addr"].as_str().unwrap().to_owned();
    let url = format!("ws://{control}/tunnel/v1");
    let _agent = Proc::spawn(&["agent", "--server", &url, "--tcp", "web:1:0"]);
    // logged inside the control channel's span: its fields come along
    let line = server.wait_for("service registered");
    let object: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(object["service"], "web", "{line}");
    let spans = object["spans"].as_array().unwrap();
    let control = spans.iter().find(|s| s["name"] == "control").unwrap();
    assert!(
        control["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert!(control["tunnel_id"].is_string(), "{line}");
}
