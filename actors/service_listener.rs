//! `ServiceListener`: one per registered TCP service, on its public port.
//!
//! Owns the listening socket (bound with `SO_REUSEADDR`, so a port comes back
//! at once after a restart or takeover) and the service's replicas: the
//! control channels of the agents that registered its name (`JoinReplica`).
//! Sends each accepted visitor to one replica's channel as `VisitorArrived`
//! (the replica with the fewest open streams, or each in turn: the server's
//! `load_balance`), at most [`MAX_WAITING_VISITORS`] at a time not yet taken
//! by the channels: a channel that is not taking them (its WebSocket actor
//! frozen by an agent that reads nothing) pauses accepting, and further
//! visitors wait in the kernel's listen backlog instead of as the server's
//! sockets. A replica leaves when its tunnel ends (its cancellation token) or
//! its service is unregistered (`LeaveReplica`); it gets no visitor from that
//! moment. A visitor whose replica's agent refuses it (its local dial
//! failed) comes back once (`RetryVisitor`, with what it had sent) and goes
//! to a healthy replica of another agent, if there is one. The listener stops when the
//! last replica leaves.

use std::io;
use std::net::SocketAddr;

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::accounting::{Counters, GuardCounters};
use crate::log_limit::{LogLimiter, RemoteEvent};
use crate::replicas::{LoadBalance, ReplicaSet};
use crate::visitor_rate::VisitorRate;
use crate::visitor_rules::{Refusal, ServiceRules};
use socket::{accept, reset};

mod retry;
mod socket;

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
    /// Where it goes if this replica's agent refuses it (there is another
    /// healthy replica); `None` for a visitor already retried.
    pub(crate) second_chance: Option<SecondChance>,
    /// What it sent before another replica refused it: sent first.
    pub(crate) sent: Bytes,
}

/// A visitor's way back to its listener if the replica it was given
/// refuses it.
#[derive(Clone)]
pub(crate) struct SecondChance {
    /// (An `Addr`, not a `Recipient`: cloned per visitor without allocating.)
    pub(crate) listener: Addr<ServiceListener>,
    /// The replica it was given (its service id).
    pub(crate) replica: Uuid,
}

/// A visitor a replica's agent refused (its local dial failed), back for
/// another replica; it is not offered a third.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RetryVisitor {
    pub(crate) socket: TcpStream,
    pub(crate) peer: SocketAddr,
    /// What it had sent, which the refusing agent dropped.
    pub(crate) sent: Bytes,
    /// The replica that refused it (its service id).
    pub(crate) refused_by: Uuid,
}

/// An accepted visitor and its place among the waiting ones.
type Accepted = io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)>;

/// One agent's registration of the service: where its visitors go.
pub(crate) struct Replica {
    /// The service's id in that agent's tunnel.
    pub(crate) service_id: Uuid,
    /// The agent (`replicas::agent_of` its link's client id): a visitor one
    /// link refuses is not offered to another link of the same agent.
    pub(crate) agent: Uuid,
    pub(crate) channel: Recipient<VisitorArrived>,
    /// The registration's counters: its open streams are its load.
    pub(crate) counters: Arc<Counters>,
    /// False while its agent's health checks fail.
    pub(crate) healthy: bool,
    /// Who may visit it (its token's and its registration's lists).
    pub(crate) visitors: ServiceRules,
    /// New connections a second one visitor address may open.
    pub(crate) visitor_rate: Option<u32>,
}

/// A replica joins the service (the first one starts the listener).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct JoinReplica {
    pub(crate) tunnel_id: Uuid,
    pub(crate) replica: Replica,
    /// Cancelled when the replica's tunnel ends: it leaves.
    pub(crate) cancel: CancellationToken,
}

/// A replica's agent says whether its local service passes its health
/// checks: an unhealthy replica gets no new visitor until they pass again.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub(crate) struct ReplicaHealth {
    pub(crate) tunnel_id: Uuid,
    pub(crate) healthy: bool,
}

/// A replica leaves (its service was unregistered).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct LeaveReplica {
    pub(crate) tunnel_id: Uuid,
}

/// The listener actor.
pub(crate) struct ServiceListener {
    port: u16,
    replicas: ReplicaSet<Uuid, Replica>,
    policy: LoadBalance,
    /// The places of visitors handed to channels and not yet taken.
    waiting: Arc<Semaphore>,
    /// Visitors refused by address lists are logged at most once a second.
    logs: LogLimiter,
    /// New connections per visitor address (the first replica's `visitor_rate`).
    rate: Option<VisitorRate>,
}

impl Actor for ServiceListener {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::info!(port = self.port, "public port listening");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(port = self.port, "public port closed");
    }
}

impl Handler<JoinReplica> for ServiceListener {
    type Result = ();

    fn handle(&mut self, msg: JoinReplica, ctx: &mut Self::Context) {
        self.join(msg, ctx);
    }
}

impl ServiceListener {
    /// Replica `msg.tunnel_id` takes visitors until it leaves.
    fn join(&mut self, msg: JoinReplica, ctx: &mut Context<Self>) {
        let tunnel_id = msg.tunnel_id;
        if msg.cancel.is_cancelled() {
            return self.leave(tunnel_id, ctx);
        }
        if self.rate.is_none() {
            self.rate = msg.replica.visitor_rate.map(VisitorRate::new);
        }
        self.replicas.add(tunnel_id, msg.replica);
        if self.replicas.len() > 1 {
            tracing::info!(port = self.port, %tunnel_id, replicas = self.replicas.len(), "replica joined");
        }
        ctx.spawn(
            async move { msg.cancel.cancelled_owned().await }
                .into_actor(self)
                .map(move |(), act, ctx| act.leave(tunnel_id, ctx)),
        );
    }
}

impl Handler<ReplicaHealth> for ServiceListener {
    type Result = ();

    fn handle(&mut self, msg: ReplicaHealth, _: &mut Self::Context) {
        if let Some(replica) = self.replicas.get_mut(&msg.tunnel_id) {
            replica.healthy = msg.healthy;
        }
    }
}

impl Handler<LeaveReplica> for ServiceListener {
    type Result = ();

    fn handle(&mut self, msg: LeaveReplica, ctx: &mut Self::Context) {
        self.leave(msg.tunnel_id, ctx);
    }
}

impl StreamHandler<Accepted> for ServiceListener {
    fn handle(&mut self, item: Accepted, ctx: &mut Self::Context) {
        match item {
            Ok((socket, peer, waiting)) => {
                let open_streams = |r: &Replica| r.counters.open_connections();
                // never empty while listening: the last replica stops it
                let ip = peer.ip();
                let admits = |r: &Replica| r.healthy && r.visitors.check(ip).is_ok();
                let others = self.replicas.iter().filter(|r| admits(r)).count() > 1;
                let Some(replica) = self.replicas.pick(self.policy, admits, open_streams) else {
                    // no healthy replica, or none admits the visitor: closed
                    return self.refuse(&socket, peer, None);
                };
                if let Some(rate) = self.rate.as_mut()
                    && !rate.admit(ip, Instant::now())
                {
                    return self.refuse(&socket, peer, Some(Refusal::RateLimited));
                }
                let second_chance = others.then(|| SecondChance {
                    listener: ctx.address(),
                    replica: replica.service_id,
                });
                replica.channel.do_send(VisitorArrived {
                    service_id: replica.service_id,
                    socket,
                    peer,
                    _waiting: waiting,
                    second_chance,
                    sent: Bytes::new(),
                });
            }
            Err(e) => tracing::warn!(port = self.port, error = %e, "accept failed"),
        }
    }
}

impl ServiceListener {
    /// A visitor no replica takes (`why`: over the rate; none: find which
    /// replica's lists refuse it): reset at once, counted by why, and logged
    /// at most once a second with the count held back (a visitor decides
    /// how often).
    fn refuse(&mut self, socket: &TcpStream, peer: SocketAddr, why: Option<Refusal>) {
        reset(socket);
        let mut healthy = self.replicas.iter().filter(|r| r.healthy);
        let refused = match why {
            Some(why) => healthy.next().map(|r| (r, why)),
            None => healthy
                .map(|r| (r, r.visitors.check(peer.ip())))
                .find_map(|(r, verdict)| verdict.err().map(|why| (r, why))),
        };
        let Some((replica, why)) = refused else {
            return; // no healthy replica: the agent's checks say why
        };
        replica.counters.add_refused(why);
        if let Some(held_back) = self.logs.admit(RemoteEvent::VisitorRefused, Instant::now()) {
            tracing::info!(port = self.port, visitor = %peer, reason = why.name(), held_back, "visitor refused by the service's rules");
        }
    }

    /// Replica `tunnel_id` leaves; the last one stops the listener.
    fn leave(&mut self, tunnel_id: Uuid, ctx: &mut Context<Self>) {
        if self.replicas.remove(&tunnel_id).is_some() && !self.replicas.is_empty() {
            tracing::info!(port = self.port, %tunnel_id, replicas = self.replicas.len(), "replica left");
        }
        if self.replicas.is_empty() {
            ctx.stop();
        }
    }

    /// Starts accepting on `listener` for the service, whose first replica
    /// is `first`.
    pub(crate) fn start(
        listener: TcpListener,
        port: u16,
        first: JoinReplica,
        policy: LoadBalance,
        guards: Arc<GuardCounters>,
    ) -> Addr<Self> {
        let waiting = Arc::new(Semaphore::new(MAX_WAITING_VISITORS));
        let places = waiting.clone();
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
            let mut listener = Self {
                port,
                replicas: ReplicaSet::default(),
                policy,
                waiting: places,
                logs: LogLimiter::new(),
                rate: None,
            };
            listener.join(first, ctx);
            listener
        })
    }
}
