//! The agent session's registrations: asked in order (UDP only over
//! `DATAGRAMS`, visitor lists only over `VISITOR_RULES`), answers paired first-in-first-out (an answer with nothing
//! waiting is a violation), `Ready` once every one is answered.

use super::*;

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
        if !rules.is_empty() && !self.features().contains(Features::VISITOR_RULES) {
            // a service that relies on its lists is not published unguarded
            let reason = "the server does not enforce visitor allow/deny lists (no VISITOR_RULES capability): upgrade it, or remove the service's allow and deny";
            self.actions
                .push_back(AgentAction::NotRegistered { service, reason });
            return;
        }
        let ports = (service.local_port, port);
        let register = if rules.is_empty() {
            Message::register(&service.name, service.protocol, ports.0, ports.1)
        } else {
            Message::register_with_visitors(&service.name, service.protocol, ports, rules.to_wire())
        };
        self.awaiting.push_back(service);
        self.send_built(register);
    }

    pub(super) fn on_register_ok(&mut self, service_id: Uuid, port: Option<u16>) {
        let Some(service) = self.awaiting.pop_front() else {
            return self.close(ProtocolViolation::UnpairedReply(MessageType::RegisterOk).into());
        };
        if let Phase::Open(open) = &mut self.phase {
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

    pub(super) fn on_register_fail(&mut self, reason: String) {
        let Some(service) = self.awaiting.pop_front() else {
            return self.close(ProtocolViolation::UnpairedReply(MessageType::RegisterFail).into());
        };
        self.actions
            .push_back(AgentAction::RegistrationRefused { service, reason });
        if self.awaiting.is_empty() {
            self.actions.push_back(AgentAction::Ready);
        }
    }
}
