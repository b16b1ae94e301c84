//! `ServiceListener`: one per registered TCP service, on its public port.
//!
//! Owns the listening socket (bound with `SO_REUSEADDR`, so a port comes back
//! at once after a restart or takeover). Sends each accepted visitor to its
//! control channel as `VisitorArrived`, at most [`MAX_WAITING_VISITORS`] at a
//! time not yet taken by the channel: a channel that is not taking them (its
//! WebSocket actor frozen by an agent that reads nothing) pauses accepting,
//! and further visitors wait in the kernel's listen backlog instead of as
//! the server's sockets. Stops with its tunnel (cancellation token) or when
//! its service is unregistered (`StopListener`).

use std::io;
use std::net::SocketAddr;

use std::sync::Arc;

use actix::prelude::*;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::io::socket_options::limit_unsent;
use crate::accounting::GuardCounters;

/// Accepted sockets inherit `TCP_NODELAY` and `TCP_NOTSENT_LOWAT` from their
/// listener on Linux, so [`ServiceListener::bind`] sets them there once, and
/// visitors' sockets need no setting of their own (two system calls fewer per
/// connection).
pub(crate) const ACCEPTED_SOCKETS_TUNED: bool = cfg!(target_os = "linux");

/// Visitors a listener hands its control channel that the channel has not
/// taken yet; at this many, the listener stops accepting until it takes one.
pub(crate) const MAX_WAITING_VISITORS: usize = 128;

/// A pause in accepting that lasts this long is logged and counted.
const PAUSE_WORTH_A_LINE: std::time::Duration = std::time::Duration::from_secs(1);

/// A visitor connected to a service's public port.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct VisitorArrived {
    pub(crate) service_id: Uuid,
    pub(crate) socket: TcpStream,
    pub(crate) peer: SocketAddr,
    /// Its place among the listener's waiting visitors, freed when the
    /// channel has handled (or dropped) the message.
    pub(crate) _waiting: OwnedSemaphorePermit,
}

/// An accepted visitor and its place among the waiting ones.
type Accepted = io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)>;

/// Stops listening (service unregistered).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopListener;

/// The listener actor.
pub(crate) struct ServiceListener {
    service_id: Uuid,
    port: u16,
    channel: Recipient<VisitorArrived>,
    cancel: CancellationToken,
}

impl Actor for ServiceListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(port = self.port, "public port listening");
        let cancel = self.cancel.clone();
        ctx.spawn(
            async move { cancel.cancelled_owned().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(port = self.port, "public port closed");
    }
}

impl Handler<StopListener> for ServiceListener {
    type Result = ();

    fn handle(&mut self, _: StopListener, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl StreamHandler<Accepted> for ServiceListener {
    fn handle(&mut self, item: Accepted, _: &mut Self::Context) {
        match item {
            Ok((socket, peer, waiting)) => self.channel.do_send(VisitorArrived {
                service_id: self.service_id,
                socket,
                peer,
                _waiting: waiting,
            }),
            Err(e) => tracing::warn!(port = self.port, error = %e, "accept failed"),
        }
    }
}

impl ServiceListener {
    /// Binds `host:port` with `SO_REUSEADDR` (and, on Linux, the options that
    /// accepted sockets inherit: see [`ACCEPTED_SOCKETS_TUNED`]).
    pub(crate) fn bind(host: &str, port: u16) -> io::Result<TcpListener> {
        let addr = Self::resolve(host, port)?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if ACCEPTED_SOCKETS_TUNED {
            socket.set_nodelay(true)?;
            limit_unsent(&socket)?;
        }
        socket.bind(addr)?;
        socket.listen(1024)
    }

    /// `host:port` as a socket address (an IPv6 host with or without brackets).
    pub(crate) fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
        format!("{host}:{port}")
            .parse()
            .or_else(|_| format!("[{host}]:{port}").parse())
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad bind host {host:?}"),
                )
            })
    }

    /// Starts accepting on `listener` for the service.
    pub(crate) fn start(
        listener: TcpListener,
        service_id: Uuid,
        port: u16,
        channel: Recipient<VisitorArrived>,
        cancel: CancellationToken,
        guards: Arc<GuardCounters>,
    ) -> Addr<Self> {
        let waiting = Arc::new(Semaphore::new(MAX_WAITING_VISITORS));
        Self::create(|ctx| {
            ctx.add_stream(futures::stream::unfold(listener, move |l| {
                let (waiting, guards) = (waiting.clone(), guards.clone());
                async move {
                    let next = accept(&l, waiting, port, &guards).await;
                    if next.is_err() {
                        // out of descriptors or similar: do not spin
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    Some((next, l))
                }
            }));
            Self {
                service_id,
                port,
                channel,
                cancel,
            }
        })
    }
}

/// Accepts the next visitor once fewer than [`MAX_WAITING_VISITORS`] wait for
/// the channel.
async fn accept(
    listener: &TcpListener,
    waiting: Arc<Semaphore>,
    port: u16,
    guards: &GuardCounters,
) -> Accepted {
    let place = take_place(waiting, port, guards)
        .await
        .map_err(|_| io::Error::other("visitor limit closed"))?;
    let (socket, peer) = listener.accept().await?;
    Ok((socket, peer, place))
}

/// A place among the visitors waiting for the channel, as soon as one is
/// free. A wait that lasts (the channel is stuck, not just busy with a
/// registration for a moment) is logged and counted.
async fn take_place(
    waiting: Arc<Semaphore>,
    port: u16,
    guards: &GuardCounters,
) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
    if let Ok(place) = waiting.clone().try_acquire_owned() {
        return Ok(place);
    }
    let next = waiting.clone().acquire_owned();
    if let Ok(place) = tokio::time::timeout(PAUSE_WORTH_A_LINE, next).await {
        return place;
    }
    guards.accept_paused();
    tracing::warn!(
        port,
        waiting = MAX_WAITING_VISITORS,
        "the tunnel is not taking its visitors; accepting paused"
    );
    let place = waiting.acquire_owned().await;
    tracing::info!(port, "the tunnel takes visitors again; accepting");
    place
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Visitors' sockets get no options of their own on Linux: they must
    /// inherit them from the listener, or small writes would wait for Nagle
    /// and stalled visitors would hold megabytes in the kernel.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_the_unsent_limit() {
        if !ACCEPTED_SOCKETS_TUNED {
            return;
        }
        let listener = ServiceListener::bind("127.0.0.1", 0).expect("bind");
        let addr = listener.local_addr().expect("address");
        let _visitor = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let options = socket2::SockRef::from(&accepted);
        assert!(options.tcp_nodelay().expect("TCP_NODELAY"));
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(
            options.tcp_notsent_lowat().expect("TCP_NOTSENT_LOWAT"),
            128 * 1024
        );
    }
}
