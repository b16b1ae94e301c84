//! The dashboard (`GET /` on the admin listener), loaded in a real browser:
//! Debian's chromium, headless, driven over its DevTools protocol, against
//! a live server and agent with traffic running. What is checked is the
//! page as its script left it (the DOM after it read `/status`, in real
//! time): the services, their public ports, non-zero rates, and the read
//! token asked for, and taken from the page's fragment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::browser::Browser;
use common::free_ports;
use common::host::installed;
use common::process::Proc;

/// The row of service `name` in `dom`, if it has one.
fn service_row<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let start = dom.find(&format!("<tr data-service=\"{name}\""))?;
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    Some(&dom[start..end])
}

/// The number in attribute `attribute` of `row`.
fn number(row: &str, attribute: &str) -> f64 {
    let Some(at) = row.find(&format!("{attribute}=\"")) else {
        return 0.0;
    };
    let at = at + attribute.len() + 2;
    let end = row[at..].find('"').map_or(row.len(), |e| e + at);
    row[at..end].parse().unwrap_or(0.0)
}

/// Whether `dom` shows service `name` with bytes moving both ways.
fn moving(dom: &str, name: &str) -> bool {
    service_row(dom, name)
        .is_some_and(|row| number(row, "data-rate-in") > 0.0 && number(row, "data-rate-out") > 0.0)
}

/// Streams a pattern through the echo behind `port` until `stop`, reading
/// it back at once and checking every byte: traffic for the rates, with no
/// pause between connections for the page to fall into.
fn keep_busy(port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let chunk = common::pattern(7, 64 << 10);
        let socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        let (mut r, mut w) = socket.unwrap().into_split();
        let send = async {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                w.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            w.shutdown().await.unwrap();
            sent
        };
        let receive = async {
            let (mut got, mut buf) = (0, vec![0; 64 << 10]);
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                for (i, byte) in buf[..n].iter().enumerate() {
                    assert_eq!(*byte, chunk[(got + i) % chunk.len()], "byte {}", got + i);
                }
                got += n;
            }
        };
        let (sent, got) = tokio::join!(send, receive);
        assert_eq!(sent, got, "every byte echoed");
    })
}

#[actix_web::test]
async fn the_dashboard_shows_services_and_live_rates_in_a_real_browser() {
    let Some(chromium) = installed("chromium", "chromium") else {
        return;
    };
    let flags = ["--admin-listen", "127.0.0.1:0"];
    let mut server = Proc::server_with(free_ports(2), &flags, |c| {
        c.env("ZLAYER_TUNNEL_ADMIN_READ_TOKEN", "read-secret");
    });
    let control = server.listening_addr("control channel listening");
    let admin = server.listening_addr("admin endpoints listening");
    let url = format!("ws://{control}/tunnel/v1");
    let web = format!("web:{}:0", common::services::echo().await);
    let dns = format!("dns:{}:0", common::services::udp_echo());
    let args = [
        "agent",
        "--server",
        &url,
        "--tcp",
        &web,
        "--udp",
        &dns,
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let mut agent = Proc::spawn(&args);
    let (mut web_port, mut dns_port) = (0, 0);
    for _ in 0..2 {
        let port = agent.registered_port();
        let line = agent.seen().last().unwrap().clone();
        match line.contains("service=web") {
            true => web_port = port,
            false => dns_port = port,
        }
    }
    let agent_admin = agent.listening_addr("admin endpoints listening");
    let stop = Arc::new(AtomicBool::new(false));
    let busy = keep_busy(web_port, stop.clone());

    // without the read token: the page asks for it and shows nothing
    let mut page = Browser::open(&chromium, &format!("http://{admin}/")).await;
    let dom = page
        .wait_for("the token form", |dom| {
            dom.contains("id=\"login\" style=\"display: block;\"")
        })
        .await;
    assert!(!dom.contains("<tr data-service"), "{dom}");

    // with it (in the fragment): the services, their ports, live rates
    let url = format!("http://{admin}/#token=read-secret");
    let mut page = Browser::open(&chromium, &url).await;
    let dom = page
        .wait_for("web's bytes moving both ways", |dom| moving(dom, "web"))
        .await;
    let row = service_row(&dom, "web").unwrap();
    assert!(row.contains(&format!(">{web_port}<")), "{row}");
    let row = service_row(&dom, "dns").unwrap();
    assert!(row.contains(&format!(">{dns_port}<")), "{row}");
    assert!(dom.contains("id=\"tunnels\""), "{dom}");
    assert!(dom.contains("<div id=\"error\"></div>"), "{dom}");

    // the agent's own dashboard (its listener is open to read)
    let mut page = Browser::open(&chromium, &format!("http://{agent_admin}/")).await;
    let dom = page
        .wait_for("web's bytes moving both ways", |dom| moving(dom, "web"))
        .await;
    assert!(
        service_row(&dom, "web").unwrap().contains("healthy"),
        "{dom}"
    );
    assert!(dom.contains("agent of ws://"), "{dom}");
    // its link, by server and connection number
    let links = dom
        .split("<section id=\"links\">")
        .nth(1)
        .unwrap_or_default();
    assert!(links.contains("<th>connection</th>"), "{dom}");
    assert!(
        links.contains(&format!(
            "<td>ws://{control}/tunnel/v1</td><td class=\"num\">0</td>"
        )),
        "{dom}"
    );

    stop.store(true, Ordering::Relaxed);
    busy.await.unwrap();
}
