//! A real browser for the dashboard's tests: Debian's chromium, headless,
//! driven over its DevTools protocol (a WebSocket). Pages run in real time
//! (no virtual clock), and a test waits for what it expects in the page's
//! DOM, with a deadline.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_http::ws;
use awc::BoxedSocket;
use futures::{SinkExt, StreamExt};

use super::host::TempDir;

/// How long a page may take to show what a test waits for.
const DEADLINE: Duration = Duration::from_secs(15);

/// A headless chromium with one page open; killed on drop.
pub struct Browser {
    child: Child,
    page: actix_codec::Framed<BoxedSocket, ws::Codec>,
    next_id: u64,
    _profile: TempDir,
}

impl Browser {
    /// Starts `chromium` and opens `url` in it.
    pub async fn open(chromium: &Path, url: &str) -> Self {
        let profile = TempDir::new(&format!("chromium-{}", rand_suffix()));
        let child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox", // the tests may run as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let port = devtools_port(&profile.0).await;
        let client = awc::Client::new();
        // the page's URL is the query: its fragment escaped, or it would be this one's
        let created = format!(
            "http://127.0.0.1:{port}/json/new?{}",
            url.replace('#', "%23")
        );
        let mut answer = client.put(created).send().await.unwrap();
        let target: serde_json::Value = answer.json().await.unwrap();
        let socket = target["webSocketDebuggerUrl"].as_str().unwrap().to_owned();
        let (_, page) = client
            .ws(socket)
            .max_frame_size(16 << 20)
            .connect()
            .await
            .unwrap();
        Self {
            child,
            page,
            next_id: 0,
            _profile: profile,
        }
    }

    /// The page's DOM as its scripts left it now.
    pub async fn dom(&mut self) -> String {
        self.next_id += 1;
        let id = self.next_id;
        let call = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": "document.documentElement.outerHTML", "returnByValue": true},
        });
        let text = call.to_string();
        self.page
            .send(ws::Message::Text(text.into()))
            .await
            .unwrap();
        while let Some(frame) = self.page.next().await {
            let ws::Frame::Text(bytes) = frame.unwrap() else {
                continue;
            };
            let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            if answer["id"] == id {
                let value = &answer["result"]["result"]["value"];
                return value.as_str().unwrap_or_default().to_owned();
            }
        }
        panic!("the browser closed its page");
    }

    /// The DOM once `shows` holds for it; panics naming `what`, with the
    /// last DOM, after the deadline.
    pub async fn wait_for(&mut self, what: &str, shows: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let dom = self.dom().await;
            if shows(&dom) {
                return dom;
            }
            assert!(Instant::now() < end, "the page never showed {what}:\n{dom}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port chromium's DevTools listen on, once it has written it.
async fn devtools_port(profile: &Path) -> u16 {
    let file = profile.join("DevToolsActivePort");
    let end = Instant::now() + DEADLINE;
    loop {
        let port = std::fs::read_to_string(&file).ok().and_then(|text| {
            let first = text.lines().next()?;
            first.trim().parse().ok()
        });
        if let Some(port) = port {
            return port;
        }
        assert!(
            Instant::now() < end,
            "chromium never opened its DevTools port"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tells apart the profiles of the browsers of one test process.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
