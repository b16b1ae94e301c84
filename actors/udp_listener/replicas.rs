//! The UDP listener's replicas: the agents' registrations of its service,
//! joining and leaving.

use super::*;
use crate::actors::service_listener::ReplicaHealth;

/// One agent's registration of the service: where its flows go.
pub(crate) struct UdpReplica {
    pub(crate) tunnel_id: Uuid,
    /// The service's id in that agent's tunnel.
    pub(crate) service_id: Uuid,
    pub(crate) channel: Recipient<UdpEvent>,
    /// Bytes of datagrams on their way between this listener and the
    /// replica's control channel (both on one thread), against the server's
    /// `udp_in_flight`. Over it, datagrams are dropped: a control channel
    /// frozen by a slow agent WebSocket cannot make them pile up. Shared with
    /// the channel, which gives back what it wrote.
    pub(crate) budget: Budget,
    /// The registration's counters: its open flows are its load.
    pub(crate) counters: Arc<Counters>,
    /// Where its flows' traffic is published for status pages.
    pub(crate) view: FlowView,
    /// False while its agent's health checks fail: no new flow.
    pub(crate) healthy: bool,
    /// Who may send to it (its token's and its registration's lists).
    pub(crate) visitors: crate::visitor_rules::ServiceRules,
    /// New flows a second one visitor address may open.
    pub(crate) visitor_rate: Option<u32>,
}

/// A replica joins the service (the first one starts the listener).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct JoinUdpReplica {
    pub(crate) replica: UdpReplica,
    /// Cancelled when the replica's tunnel ends: it leaves.
    pub(crate) cancel: CancellationToken,
}

/// A replica leaves (its service was unregistered).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct LeaveUdpReplica {
    pub(crate) tunnel_id: Uuid,
}

impl Handler<JoinUdpReplica> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: JoinUdpReplica, ctx: &mut Self::Context) {
        self.join(msg, ctx);
    }
}

impl Handler<ReplicaHealth> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: ReplicaHealth, _: &mut Self::Context) {
        if let Some(replica) = self.replicas.get_mut(&msg.tunnel_id) {
            replica.healthy = msg.healthy;
        }
    }
}

impl Handler<LeaveUdpReplica> for UdpServiceListener {
    type Result = ();

    fn handle(&mut self, msg: LeaveUdpReplica, ctx: &mut Self::Context) {
        self.leave(msg.tunnel_id, ctx);
    }
}

impl UdpServiceListener {
    /// The replica takes new flows until it leaves.
    pub(super) fn join(&mut self, msg: JoinUdpReplica, ctx: &mut Context<Self>) {
        let tunnel_id = msg.replica.tunnel_id;
        if msg.cancel.is_cancelled() {
            return self.leave(tunnel_id, ctx);
        }
        if self.rate.is_none() {
            self.rate = msg
                .replica
                .visitor_rate
                .map(crate::visitor_rate::VisitorRate::new);
        }
        self.replicas.add(tunnel_id, msg.replica);
        if self.replicas.len() > 1 {
            tracing::info!(port = self.settings.port, %tunnel_id, replicas = self.replicas.len(), "replica joined");
        }
        ctx.spawn(
            async move { msg.cancel.cancelled_owned().await }
                .into_actor(self)
                .map(move |(), act, ctx| act.leave(tunnel_id, ctx)),
        );
    }

    /// Replica `tunnel_id` leaves: its flows are forgotten; the last one
    /// stops the listener.
    fn leave(&mut self, tunnel_id: Uuid, ctx: &mut Context<Self>) {
        let Some(replica) = self.replicas.remove(&tunnel_id) else {
            return;
        };
        let flows: Vec<Uuid> = (self.owners.iter())
            .filter(|(_, owner)| **owner == tunnel_id)
            .map(|(flow, _)| *flow)
            .collect();
        for flow in flows {
            self.owners.remove(&flow);
            if self.flows.remove(flow).is_some() {
                replica.counters.connection_closed();
            }
        }
        if self.replicas.is_empty() {
            return ctx.stop();
        }
        tracing::info!(port = self.settings.port, %tunnel_id, replicas = self.replicas.len(), "replica left");
    }
}
