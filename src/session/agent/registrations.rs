//! The agent session's registrations: asked in order (UDP only over
//! `DATAGRAMS`), answers paired first-in-first-out (an answer with nothing
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
        let register = Message::register(&service.name, service.protocol, service.local_port, port);
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
