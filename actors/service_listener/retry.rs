//! A visitor's second chance: one replica's agent refused it (its local
//! dial failed), and it is offered once to a replica of another agent.

use super::*;

impl Handler<RetryVisitor> for ServiceListener {
    type Result = ();

    fn handle(&mut self, msg: RetryVisitor, _: &mut Self::Context) {
        let open_streams = |r: &Replica| r.counters.open_connections();
        let ip = msg.peer.ip();
        // the refusing agent's other links dial the same local service
        let refusing = (self.replicas.iter())
            .find(|r| r.service_id == msg.refused_by)
            .map(|r| r.agent);
        let other = |r: &Replica| {
            let same_agent = r.service_id == msg.refused_by || Some(r.agent) == refusing;
            r.healthy && !same_agent && r.visitors.check(ip).is_ok()
        };
        let place = self.waiting.clone().try_acquire_owned().ok();
        let replica = place
            .is_some()
            .then(|| self.replicas.pick(self.policy, other, open_streams))
            .flatten();
        let (Some(replica), Some(place)) = (replica, place) else {
            // no other replica (or the channels are not taking visitors):
            // refused, as it would have been without a second chance
            return reset(&msg.socket);
        };
        tracing::debug!(port = self.port, visitor = %msg.peer, "visitor refused by one replica; offered to another");
        replica.channel.do_send(VisitorArrived {
            service_id: replica.service_id,
            socket: msg.socket,
            peer: msg.peer,
            _waiting: place,
            second_chance: None,
            sent: msg.sent,
        });
    }
}
