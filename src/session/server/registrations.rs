//! The server session's registrations: every `Register` checked (scope,
//! ports, the service limit, UDP over `DATAGRAMS`), its port allocated by the
//! caller, and every one answered exactly once, in the order asked.

use super::*;
use crate::protocol::RegisterRefusal;
use crate::visitor_rules::VisitorRules;

impl ServerSession {
    /// The port of registration `seq` was allocated and listened on
    /// (`Ok((service_id, port))`), or not (`Err((reason, refusal))`: why,
    /// and whether asking again soon can help). Answers go out in the order
    /// of the `Register`s.
    pub fn allocated(&mut self, seq: u64, result: Result<(Uuid, u16), (String, RegisterRefusal)>) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        let answer = match result {
            Ok((service_id, port)) => {
                let name = (open.pending.iter().find(|p| p.seq == seq))
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                open.services.insert(service_id, Service { name, port });
                Message::RegisterOk {
                    service_id,
                    port: Some(port),
                }
            }
            Err((reason, refusal)) => register_fail(reason, refusal),
        };
        if let Some(p) = open.pending.iter_mut().find(|p| p.seq == seq) {
            p.answer = Some(answer);
        }
        self.answer_in_order();
    }

    pub(super) fn on_register(
        &mut self,
        name: String,
        protocol: ServiceProtocol,
        remote_port: u16,
        ((allow, deny), visitor_rate, bandwidth): (&(String, String), u32, u64),
    ) {
        let max_services = self.settings.max_services;
        let Some(open) = self.open_mut() else { return };
        let seq = open.next_seq;
        open.next_seq += 1;
        // the token's lists and the registration's (read only under
        // VISITOR_RULES: an original agent's trailing bytes mean nothing)
        let (allow, deny, visitor_rate, bandwidth) =
            match open.features.contains(Features::VISITOR_RULES) {
                true => (allow.as_str(), deny.as_str(), visitor_rate, bandwidth),
                false => ("", "", 0, 0),
            };
        let visitors = VisitorRules::from_wire(allow, deny)
            .map(|own| open.scope.visitors.and(&own))
            .map_err(|e| format!("visitor lists: {e}"));
        let refusal = registration_refusal(open, max_services, &name, protocol, remote_port)
            .or_else(|| visitors.as_ref().err().cloned());
        open.pending.push_back(Pending {
            seq,
            name: name.clone(),
            // what the request itself asks is refused again if asked again
            answer: refusal.map(|reason| register_fail(reason, RegisterRefusal::Lasting)),
        });
        if open.pending.back().is_some_and(|p| p.answer.is_none()) {
            let allowed_ports = open.scope.ports.clone();
            let named_in_scope = open.scope.names_service(&name);
            self.actions.push_back(ServerAction::Allocate(Registration {
                seq,
                name,
                protocol,
                remote_port,
                allowed_ports,
                named_in_scope,
                visitors: visitors.unwrap_or_default(),
                visitor_rate: (visitor_rate > 0).then_some(visitor_rate),
                bandwidth: (bandwidth > 0).then_some(bandwidth),
            }));
        }
        self.answer_in_order();
    }

    pub(super) fn on_unregister(&mut self, service_id: Uuid) {
        let Some(open) = self.open_mut() else { return };
        if let Some(service) = open.services.remove(&service_id) {
            let port = service.port;
            self.actions
                .push_back(ServerAction::Unregister { service_id, port });
        }
    }

    /// The agent's checks of a registered service changed their verdict;
    /// a service it did not register (or no longer has) is ignored.
    pub(super) fn on_health(&mut self, service_id: Uuid, healthy: bool) {
        let Some(open) = self.open_mut() else { return };
        if open.services.contains_key(&service_id) {
            (self.actions).push_back(ServerAction::ServiceHealth {
                service_id,
                healthy,
            });
        }
    }

    /// Sends the answers at the head of the queue that are ready.
    fn answer_in_order(&mut self) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        while open.pending.front().is_some_and(|p| p.answer.is_some()) {
            if let Some(answer) = open.pending.pop_front().and_then(|p| p.answer) {
                self.actions.push_back(ServerAction::Send(answer));
            }
        }
    }
}

/// Why a `Register` is refused before any port is looked at, if it is.
fn registration_refusal(
    open: &Open,
    max_services: usize,
    name: &str,
    protocol: ServiceProtocol,
    remote_port: u16,
) -> Option<String> {
    if let Err(e) = open.scope.check_register(name) {
        return Some(e.to_string());
    }
    if let Err(e) = open.scope.check_port(remote_port) {
        return Some(e.to_string());
    }
    let allocating = open.pending.iter().filter(|p| p.answer.is_none()).count();
    if open.services.len() + allocating >= max_services {
        return Some(format!("tunnel is at its limit of {max_services} services"));
    }
    let registered = open.services.values().any(|s| s.name == name);
    let registering = (open.pending.iter()).any(|p| p.answer.is_none() && p.name == name);
    if registered || registering {
        return Some(format!(
            "service {name:?} is already registered by this agent; give each service its own name"
        ));
    }
    if protocol == ServiceProtocol::Udp && !open.features.contains(Features::DATAGRAMS) {
        return Some(
            "udp services need the DATAGRAMS capability, which this agent did not offer".to_owned(),
        );
    }
    None
}

fn register_fail(reason: String, refusal: RegisterRefusal) -> Message {
    // a reason too long for a frame is cut rather than lost
    Message::register_refused(reason.clone(), refusal).unwrap_or_else(|_| Message::RegisterFail {
        reason: reason.chars().take(1024).collect(),
        refusal: Some(refusal),
    })
}
