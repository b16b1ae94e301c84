//! `AccessSession`: one per on-demand access session. Owns the session's
//! local listener; each accepted connection becomes a stream through the
//! tunnel server to the agent that registered the endpoint (relay mode), or is
//! spliced to the remote address dialed directly (direct mode, for nodes on
//! one overlay network), with live byte counts. At its TTL, or on `EndSession`, the
//! listener closes at once and open connections get a grace period, then are
//! closed.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::TunnelAgent;
use super::agent_connection::OpenStream;
use crate::accounting::{CounterSet, Direction};

/// Deadline for dialing the remote address.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Ends the session now (its open connections still get the grace period).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct EndSession;

/// Where a session's connections go.
#[derive(Clone)]
pub(crate) enum Route {
    /// Dial `remote` directly.
    Direct,
    /// Through the server this access link is connected to, to the service
    /// named `endpoint`.
    Relay {
        link: Box<TunnelAgent>,
        endpoint: String,
    },
}

/// How a session is set up.
pub(crate) struct SessionWiring {
    pub(crate) id: Uuid,
    pub(crate) route: Route,
    pub(crate) remote: String,
    pub(crate) ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) counters: CounterSet,
}

/// The session actor.
pub(crate) struct AccessSession {
    wiring: SessionWiring,
    /// Cancels every open connection of the session.
    connections: CancellationToken,
}

impl Actor for AccessSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_later(self.wiring.ttl, |act, ctx| {
            tracing::info!(session = %act.wiring.id, "access session expired");
            ctx.stop();
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // the listener is closed with the actor; open connections get the grace
        let (connections, grace) = (self.connections.clone(), self.wiring.grace);
        actix::spawn(async move {
            tokio::time::sleep(grace).await;
            connections.cancel();
        });
    }
}

impl Handler<EndSession> for AccessSession {
    type Result = ();

    fn handle(&mut self, _: EndSession, ctx: &mut Self::Context) {
        tracing::info!(session = %self.wiring.id, "access session ended");
        ctx.stop();
    }
}

impl StreamHandler<io::Result<(TcpStream, SocketAddr)>> for AccessSession {
    fn handle(&mut self, item: io::Result<(TcpStream, SocketAddr)>, _: &mut Self::Context) {
        let (local, peer) = match item {
            Ok(accepted) => accepted,
            Err(e) => return tracing::warn!(session = %self.wiring.id, error = %e, "accept failed"),
        };
        let remote = self.wiring.remote.clone();
        let counters = self.wiring.counters.clone();
        let cancel = self.connections.child_token();
        let id = self.wiring.id;
        if let Route::Relay { link, endpoint } = &self.wiring.route {
            let open = OpenStream {
                socket: local,
                service: endpoint.clone(),
                target: remote,
                visitor: None,
                bandwidth: None,
                counters,
                cancel,
            };
            if !link.open_stream(open) {
                tracing::warn!(session = %id, %peer, "the access link is not running");
            }
            return;
        }
        // a task, not an actor future: it outlives the listener by the grace period
        actix::spawn(async move {
            let dial = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&remote)).await;
            let remote_socket = match dial {
                Ok(Ok(socket)) => socket,
                Ok(Err(e)) => {
                    return tracing::info!(session = %id, %peer, %remote, error = %e, "remote unreachable");
                }
                Err(_) => {
                    return tracing::info!(session = %id, %peer, %remote, "remote did not answer in time");
                }
            };
            counters.connection_opened();
            tokio::select! {
                () = cancel.cancelled() => {}
                () = splice(local, remote_socket, &counters) => {}
            }
            counters.connection_closed();
        });
    }
}

impl AccessSession {
    /// Starts the session on `listener`.
    pub(crate) fn start(listener: TcpListener, wiring: SessionWiring) -> Addr<Self> {
        Self::create(|ctx| {
            ctx.add_stream(futures::stream::unfold(listener, |l| async {
                let next = l.accept().await;
                if next.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await; // do not spin
                }
                Some((next, l))
            }));
            Self {
                wiring,
                connections: CancellationToken::new(),
            }
        })
    }
}

/// Copies both ways until both ends are done, counting bytes as they pass;
/// an EOF on one side is passed on as a half-close.
async fn splice(local: TcpStream, remote: TcpStream, counters: &CounterSet) {
    let _ = (local.set_nodelay(true), remote.set_nodelay(true));
    let (mut local_read, mut local_write) = local.into_split();
    let (mut remote_read, mut remote_write) = remote.into_split();
    let inbound = copy_counted(&mut local_read, &mut remote_write, counters, Direction::In);
    let outbound = copy_counted(&mut remote_read, &mut local_write, counters, Direction::Out);
    let _ = tokio::join!(inbound, outbound);
}

async fn copy_counted(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    counters: &CounterSet,
    direction: Direction,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        counters.add_bytes(direction, n as u64);
        counters.touch(super::now_ms());
    }
}
