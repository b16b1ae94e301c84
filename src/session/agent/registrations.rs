//! The agent session's registrations: asked in order (UDP only over
//! `DATAGRAMS`, visitor lists only over `VISITOR_RULES`), answers paired first-in-first-out (an answer with nothing
//! waiting is a violation), `Ready` once every one is answered.

use super::*;
use crate::connections::{ConnectionAction, ConnectionKind};
use crate::protocol::RegisterRefusal;

impl AgentSession {
    /// Asks the server for `service`, on public port `port` (0: any).
    /// Answers pair with `Register`s first-in-first-out.
    pub fn register(&mut self, service: ServiceConfig, port: u16) {
        if !self.is_open() {
            return;
        }
        if service.protocol == ServiceProtocol::Udp
            && !self.features().contains(Features::DATAGRAMS)
        {
            let reason = "the server does not carry UDP (no DATAGRAMS capability)";
            self.actions
                .push_back(AgentAction::NotRegistered { service, reason });
            return;
        }
        let rules = service.visitor_rules();
        let rate = service.visitor_rate.unwrap_or(0);
        let bandwidth = service.bandwidth.unwrap_or(0);
        let guarded = !rules.is_empty() || rate != 0 || bandwidth != 0;
        if guarded && !self.features().contains(Features::VISITOR_RULES) {
            // a service that relies on its lists is not published unguarded
            let reason = "the server does not enforce visitor allow/deny lists or rates (no VISITOR_RULES capability): upgrade it, or remove the service's allow, deny, visitor_rate and bandwidth";
            self.actions
                .push_back(AgentAction::NotRegistered { service, reason });
            return;
        }
        let ports = (service.local_port, port);
        let register = if guarded {
            let visitors = (rules.to_wire(), rate, bandwidth);
            Message::register_with_visitors(&service.name, service.protocol, ports, visitors)
        } else {
            Message::register(&service.name, service.protocol, ports.0, ports.1)
        };
        self.awaiting.push_back(service);
        self.send_built(register);
    }

    /// Withdraws every registration of service `name` (the host removed
    /// it): `Unregister` for each, and its visitors' streams and flows end
    /// (reset; the server is told). One still awaiting its answer is undone
    /// when the answer comes. How many registrations were withdrawn.
    pub fn unregister(&mut self, name: &str) -> usize {
        let Phase::Open(open) = &mut self.phase else {
            return 0;
        };
        let ids: Vec<Uuid> = (open.services.iter())
            .filter(|(_, s)| s.name == name)
            .map(|(id, _)| *id)
            .collect();
        if self.awaiting.iter().any(|s| s.name == name) {
            open.withdrawn.push(name.to_owned());
        }
        let ending: Vec<Uuid> = (open.service_of.iter())
            .filter(|(_, s)| ids.contains(s))
            .map(|(c, _)| *c)
            .collect();
        for id in &ids {
            open.services.remove(id);
        }
        open.service_of.retain(|_, s| !ids.contains(s));
        for service_id in &ids {
            self.send(Message::Unregister {
                service_id: *service_id,
            });
        }
        for id in ending {
            let kind = self.data.get().and_then(|t| t.kind(id));
            let Some(abort) = self.data.table().and_then(|t| t.local_reset(id)) else {
                continue; // ended already
            };
            self.send(abort);
            let action = match kind {
                Some(ConnectionKind::Flow) => ConnectionAction::ForgetFlow { id },
                _ => ConnectionAction::Reset {
                    id,
                    reason: "the service was withdrawn",
                },
            };
            self.actions.push_back(AgentAction::Socket(action));
        }
        ids.len()
    }

    pub(super) fn on_register_ok(&mut self, service_id: Uuid, port: Option<u16>) {
        let Some(service) = self.awaiting.pop_front() else {
            return self.close(ProtocolViolation::UnpairedReply(MessageType::RegisterOk).into());
        };
        if let Phase::Open(open) = &mut self.phase {
            if let Some(i) = open.withdrawn.iter().position(|n| *n == service.name) {
                // withdrawn while it was asked: undone at once
                open.withdrawn.swap_remove(i);
                self.send(Message::Unregister { service_id });
                if self.awaiting.is_empty() {
                    self.actions.push_back(AgentAction::Ready);
                }
                return;
            }
            open.services.insert(service_id, service.clone());
        }
        self.actions.push_back(AgentAction::Registered {
            service_id,
            service,
            port,
        });
        if self.awaiting.is_empty() {
            self.actions.push_back(AgentAction::Ready);
        }
    }

    pub(super) fn on_register_fail(&mut self, reason: String, refusal: Option<RegisterRefusal>) {
        let Some(service) = self.awaiting.pop_front() else {
            return self.close(ProtocolViolation::UnpairedReply(MessageType::RegisterFail).into());
        };
        self.actions.push_back(AgentAction::RegistrationRefused {
            service,
            reason,
            // an original server says nothing: retried as before
            lasting: refusal == Some(RegisterRefusal::Lasting),
        });
        if self.awaiting.is_empty() {
            self.actions.push_back(AgentAction::Ready);
        }
    }
}
