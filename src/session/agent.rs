//! `AgentSession`: the control link as the agent holds it, one WebSocket's
//! life.
//!
//! Rules (docs/PROTOCOL.md §3-4): `Auth` first, with the features offered;
//! an answer within the connect timeout; the services registered in order and
//! their answers paired first-in-first-out; UDP services only when the server
//! carries datagrams; heartbeats both ways, and anything heard from the server
//! counts as its life; a frame of the wrong direction or of a feature not
//! negotiated ends the link. How the link ends is a [`LinkError`], which says
//! whether reconnecting can help.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::data::{DataPlane, Emit};
use super::{End, ProtocolViolation, check_inbound, check_outbound};
use crate::auth::Secret;
use crate::config::ServiceConfig;
use crate::connections::StreamSettings;
use crate::liveness::Liveness;
use crate::protocol::{
    AuthRefusal, BuildError, Capabilities, DEFAULT_INITIAL_WINDOW, Features, Message, MessageType,
    ServiceProtocol,
};

mod actions;

pub use actions::{AgentAction, LinkError};
mod connections;
mod registrations;

/// The settings an agent session runs with.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The token sent in `Auth`.
    pub token: Secret,
    /// The agent's stable id (the same across reconnects).
    pub client_id: Uuid,
    /// Features offered (`None`: behave as an original agent, no extension block).
    pub offer: Option<Features>,
    /// The per-stream window this agent announces.
    pub stream_window: u32,
    /// Time allowed for the server's answer to `Auth`.
    pub auth_timeout: Duration,
    /// Time between our heartbeats.
    pub heartbeat_interval: Duration,
    /// The link is dropped when nothing arrives from the server for this long.
    pub heartbeat_timeout: Duration,
    /// The link's stream table (`send_initial` becomes the window the server announces).
    pub streams: StreamSettings,
    /// Addresses an access client may ask this agent to dial instead of a
    /// service's own (an allow-list; empty: none).
    pub access_targets: Vec<String>,
    /// UDP flows open at once, whatever the server asks (each is a socket).
    pub max_flows: usize,
}

#[derive(Debug)]
struct Open {
    features: Features,
    services: HashMap<Uuid, ServiceConfig>,
    /// The service of each visitor's stream or flow (to end them when the
    /// service is withdrawn); pruned of ended ones as it grows.
    service_of: HashMap<Uuid, Uuid>,
    /// Services withdrawn while their `Register` awaited its answer: a
    /// `RegisterOk` for one is undone at once.
    withdrawn: Vec<String>,
    next_heartbeat: Instant,
    /// What a socket may send on a new visitor stream before a `Window`.
    server_window: u32,
    /// Probes awaiting the server's answer (at most [`MAX_PROBES`]).
    probes: std::collections::HashSet<Uuid>,
}

/// Probes one session keeps awaiting their answers at once.
pub const MAX_PROBES: usize = 64;

#[derive(Debug)]
enum Phase {
    Authenticating { deadline: Instant },
    Open(Open),
    Closed,
}

/// One link to the server, agent side.
#[derive(Debug)]
pub struct AgentSession {
    settings: AgentSettings,
    phase: Phase,
    /// Registrations sent and not answered yet, in order.
    awaiting: VecDeque<ServiceConfig>,
    liveness: Liveness,
    /// When the write in flight started, if one is.
    writing_since: Option<Instant>,
    authenticated: bool,
    /// The link's streams and flows, once authenticated.
    data: DataPlane,
    actions: VecDeque<AgentAction>,
    /// Frames not sent: not buildable, or of a type the peer did not
    /// announce (a bug either way: logged and counted, never silent).
    unsent: u64,
}

impl AgentSession {
    /// A session for a WebSocket that connected at `now`: `Auth` goes out.
    pub fn new(settings: AgentSettings, now: Instant) -> Self {
        let capabilities = settings.offer.map(|features| Capabilities {
            features,
            initial_window: settings.stream_window,
        });
        let mut session = Self {
            phase: Phase::Authenticating {
                deadline: now + settings.auth_timeout,
            },
            liveness: Liveness::new(now, settings.heartbeat_timeout),
            awaiting: VecDeque::new(),
            writing_since: None,
            authenticated: false,
            data: DataPlane::default(),
            actions: VecDeque::new(),
            unsent: 0,
            settings,
        };
        let auth = Message::auth(
            session.settings.token.clone(),
            session.settings.client_id,
            capabilities,
        );
        session.send_built(auth);
        session
    }

    /// Frames not sent because they could not be built or the peer did not
    /// announce their type (0 unless there is a bug).
    pub fn frames_unsent(&self) -> u64 {
        self.unsent
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }

    /// True once `AuthOk` arrived and until the link ends.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// True once the link has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Features negotiated (none before `AuthOk` or with an original server).
    pub fn features(&self) -> Features {
        match &self.phase {
            Phase::Open(open) => open.features,
            _ => Features::NONE,
        }
    }

    /// The registered service `service_id`, if any.
    pub fn service(&self, service_id: Uuid) -> Option<&ServiceConfig> {
        match &self.phase {
            Phase::Open(open) => open.services.get(&service_id),
            _ => None,
        }
    }

    /// The registered service named `name` of `protocol`, if any.
    pub fn service_named(&self, name: &str, protocol: ServiceProtocol) -> Option<&ServiceConfig> {
        match &self.phase {
            Phase::Open(open) => {
                (open.services.values()).find(|s| s.name == name && s.protocol == protocol)
            }
            _ => None,
        }
    }

    /// True once `AuthOk` arrived on this link (also after it ended).
    pub fn was_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Registrations waiting for their answer.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Authenticating { deadline } => Some(*deadline),
            Phase::Open(open) => {
                let deadline = open.next_heartbeat.min(self.liveness.deadline());
                Some(self.write_deadline().map_or(deadline, |w| w.min(deadline)))
            }
            Phase::Closed => None,
        }
    }

    /// A write to the server started at `now` (the owner's writer keeps one
    /// in flight): if it is still waiting a heartbeat timeout later, the
    /// server is not reading.
    pub fn write_started(&mut self, now: Instant) {
        self.writing_since = Some(now);
    }

    /// The write in flight completed.
    pub fn write_done(&mut self) {
        self.writing_since = None;
    }

    /// The answers owed to the server passed their bound (`bytes` waiting):
    /// it is not reading; the link ends.
    pub fn backlog_exceeded(&mut self, bytes: usize) {
        if self.is_closed() {
            return;
        }
        let detail = format!("{bytes} bytes of answers wait for it");
        self.close(LinkError::NotReading { detail });
    }

    fn write_deadline(&self) -> Option<Instant> {
        self.writing_since
            .map(|t| t + self.settings.heartbeat_timeout)
    }

    /// A WebSocket message from the server: one encoded frame.
    pub fn handle_bytes(&mut self, frame: &[u8], now: Instant) {
        match Message::decode(frame) {
            Ok((message, _)) => self.handle_frame(message, now),
            Err(e) => self.close(LinkError::Protocol(ProtocolViolation::Malformed(e))),
        }
    }

    /// A frame from the server, decoded.
    pub fn handle_frame(&mut self, message: Message, now: Instant) {
        if self.is_closed() {
            return;
        }
        self.liveness.seen(now);
        let kind = message.message_type();
        let checked = match &self.phase {
            Phase::Authenticating { .. } => match kind {
                MessageType::AuthOk | MessageType::AuthFail | MessageType::Disconnect => Ok(()),
                other => Err(ProtocolViolation::BeforeAuth(other)),
            },
            Phase::Open(_) if matches!(kind, MessageType::AuthOk | MessageType::AuthFail) => {
                Err(ProtocolViolation::Unexpected(kind))
            }
            Phase::Open(open) => check_inbound(End::Agent, open.features, &message),
            Phase::Closed => return,
        };
        if let Err(violation) = checked {
            return self.close(LinkError::Protocol(violation));
        }
        self.on_message(message, now);
    }

    /// A timer fired: the answer to `Auth` overdue, the server silent, or
    /// our next heartbeat due (stamped `unix_ms`).
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) {
        let interval = self.settings.heartbeat_interval;
        match &mut self.phase {
            Phase::Authenticating { deadline } if now >= *deadline => {
                self.close(LinkError::AuthTimeout);
            }
            Phase::Open(_) if self.liveness.is_expired(now) => {
                self.close(LinkError::HeartbeatTimeout);
            }
            Phase::Open(_)
                if (self.writing_since)
                    .is_some_and(|t| now >= t + self.settings.heartbeat_timeout) =>
            {
                let waited = self.settings.heartbeat_timeout.as_secs();
                let detail = format!("a write to it has waited {waited}s or more");
                self.close(LinkError::NotReading { detail });
            }
            Phase::Open(open) if now >= open.next_heartbeat => {
                while open.next_heartbeat <= now {
                    open.next_heartbeat += interval;
                }
                self.send(Message::Heartbeat { timestamp: unix_ms });
            }
            _ => {}
        }
    }

    fn on_message(&mut self, message: Message, now: Instant) {
        match message {
            Message::AuthOk {
                tunnel_id,
                capabilities,
            } => self.on_auth_ok(tunnel_id, capabilities, now),
            Message::AuthFail {
                reason, refusal, ..
            } => self.close(auth_failure(reason, refusal)),
            Message::Disconnect { reason, .. } => self.close(LinkError::Disconnected { reason }),
            Message::RegisterOk { service_id, port } => self.on_register_ok(service_id, port),
            Message::RegisterFail {
                reason, refusal, ..
            } => self.on_register_fail(reason, refusal),
            Message::Heartbeat { timestamp } => self.send(Message::HeartbeatAck { timestamp }),
            Message::HeartbeatAck { .. } => {}
            Message::Connect {
                service_id,
                connection_id,
                client_addr,
                public_addr,
                ..
            } => self.on_connect(service_id, connection_id, client_addr, &public_addr),
            Message::Open {
                connection_id,
                service,
                target,
                protocol: ServiceProtocol::Tcp,
                visitor,
                ..
            } => self.on_open(connection_id, &service, &target, &visitor),
            Message::Open { connection_id, .. } => {
                self.refuse(connection_id, "an agent takes no UDP flows by Open");
            }
            data_plane => self.on_data_plane(data_plane),
        }
    }

    fn on_auth_ok(&mut self, tunnel_id: Uuid, caps: Option<Capabilities>, now: Instant) {
        let features = caps.map_or(Features::NONE, |c| c.features);
        let server_window = caps.map_or(DEFAULT_INITIAL_WINDOW, |c| c.initial_window);
        self.authenticated = true;
        self.phase = Phase::Open(Open {
            features,
            services: HashMap::new(),
            service_of: HashMap::new(),
            withdrawn: Vec::new(),
            next_heartbeat: now + self.settings.heartbeat_interval,
            server_window,
            probes: std::collections::HashSet::new(),
        });
        self.data.start(StreamSettings {
            send_initial: server_window,
            ..self.settings.streams
        });
        self.actions.push_back(AgentAction::Authenticated {
            tunnel_id,
            features,
            server_window,
        });
    }

    fn close(&mut self, error: LinkError) {
        self.phase = Phase::Closed;
        self.awaiting.clear();
        // the link is over: a socket's late event sends nothing
        self.data = DataPlane::default();
        self.actions.push_back(AgentAction::Close(error));
    }

    fn send(&mut self, message: Message) {
        match check_outbound(self.features(), &message) {
            Ok(()) => self.actions.push_back(AgentAction::Send(message)),
            Err(kind) => {
                self.unsent += 1;
                tracing::error!(?kind, "not sent: the server did not announce it");
            }
        }
    }

    fn send_built(&mut self, message: Result<Message, BuildError>) {
        match message {
            Ok(message) => self.send(message),
            // names are validated with the configuration and reasons are ours:
            // a failure here is a bug, said loudly rather than dropped
            Err(error) => {
                self.unsent += 1;
                tracing::error!(%error, "control frame not built; not sent");
            }
        }
    }
}

/// What an `AuthFail` means for the link: a refused token is fatal; an
/// original server sends no refusal field, and the original only refuses
/// tokens; our servers say when retrying can help.
fn auth_failure(reason: String, refusal: Option<AuthRefusal>) -> LinkError {
    match refusal {
        Some(AuthRefusal::Later) => LinkError::AuthRefused { reason },
        Some(AuthRefusal::Token) | None => LinkError::TokenRefused { reason },
    }
}
