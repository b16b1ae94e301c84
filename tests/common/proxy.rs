//! A TCP proxy on 127.0.0.1 whose open connections can be frozen: from then
//! on no byte crosses them either way and nothing is closed, as on a link
//! that died without a word. Connections accepted later pass normally.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy; its tasks (and frozen connections) end with the test's runtime.
pub struct Proxy {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    open: Arc<Mutex<Vec<watch::Sender<bool>>>>,
}

impl Proxy {
    /// Forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(Mutex::new(Vec::new()));
        let conns = open.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (freeze, frozen) = watch::channel(false);
                conns.lock().unwrap().push(freeze);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, frozen.clone()));
                tokio::spawn(pump(server_read, client_write, frozen));
            }
        });
        Self { addr, open }
    }

    /// Freezes every connection accepted so far; answers how many were not frozen yet.
    pub fn freeze_open(&self) -> usize {
        let open = self.open.lock().unwrap();
        open.iter().filter(|f| !f.send_replace(true)).count()
    }
}

/// Copies `from` to `to` until the end, or until frozen: then holds both open forever.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = tokio::select! {
            () = async { drop(frozen.wait_for(|f| *f).await) } => break,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
        };
        if *frozen.borrow() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    std::future::pending::<()>().await;
    drop((from, to));
}
