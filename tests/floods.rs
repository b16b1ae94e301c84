//! What anyone who can reach the server can make it do, done as a flood: the
//! server's log stays bounded (one line per kind per second, with the count
//! held back) and every event is counted in `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::Proc;
use common::{RawWs, free_ports};
use zlayer_tunnel::protocol::Message;

const GUESSES: usize = 300;

#[actix_web::test]
async fn a_flood_of_wrong_tokens_leaves_a_bounded_log_and_a_count() {
    let public = free_ports(1).0;
    let mut server = Proc::server((public, public), &["--admin-listen", "127.0.0.1:0"]);
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    let started = std::time::Instant::now();
    for _ in 0..GUESSES {
        let mut ws = RawWs::connect(control, "/tunnel/v1").await;
        let guess = Message::auth("a wrong guess", uuid::Uuid::new_v4(), None).unwrap();
        ws.send(&guess).await;
        // refused: AuthFail, then the close
        assert!(matches!(ws.expect().await, Some(Message::AuthFail { .. })));
    }
    let seconds = started.elapsed().as_secs() + 1;
    let metrics = common::http_get(&format!("http://{admin}/metrics")).await;
    let count = |event: &str| -> u64 {
        let key = format!("zlayer_tunnel_remote_events_total{{event=\"{event}\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&key)).unwrap();
        line[key.len()..].parse().unwrap()
    };
    assert_eq!(
        count("auth_refused") + count("auth_locked_out"),
        GUESSES as u64,
        "{metrics}"
    );
    server.signal("TERM");
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("authentication")).count();
    // two kinds (refused, refused unchecked during a lockout), a line a second each
    let bound = 2 * seconds as usize + 2;
    assert!(
        lines <= bound,
        "{lines} log lines for {GUESSES} guesses in {seconds} s (at most {bound}):\n{log}"
    );
    assert!(
        log.contains("held_back="),
        "the lines say how many were held back"
    );
}
