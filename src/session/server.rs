//! `ServerSession`: one agent's control link as the server holds it.
//!
//! Rules (docs/PROTOCOL.md §3-4): `Auth` first, within `auth_timeout`; the
//! token checked (with its lockouts, [`check_token`]) and the tunnel opened by
//! the caller, which answers [`ServerSession::authenticated`] or
//! [`ServerSession::refused`]; features negotiated; every `Register` answered
//! exactly once and in order; a `Heartbeat` at once after `AuthOk` and every
//! interval; only `HeartbeatAck` counts as the agent's life; a frame of the
//! wrong direction or of a feature not negotiated closes the session.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

use bytes::Bytes;

use super::data::{DataPlane, Emit};
use super::{End, ProtocolViolation, check_inbound, check_outbound};
use crate::auth::TokenScope;
use crate::connections::{ConnectionAction, StreamSettings};
use crate::liveness::Liveness;
use crate::outbound::Outbound;
use crate::protocol::{
    AuthRefusal, Capabilities, CloseKind, DEFAULT_INITIAL_WINDOW, Features, Message, MessageType,
    ServiceProtocol,
};

mod actions;

pub use actions::{CloseReason, Registration, ServerAction};
mod connections;
mod registrations;
mod tokens;

pub use tokens::{TokenRefusal, check_token};

/// The settings a server session runs with.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Time allowed between the connection and `Auth`.
    pub auth_timeout: Duration,
    /// Time between our heartbeats.
    pub heartbeat_interval: Duration,
    /// An agent silent (no `HeartbeatAck`) for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// Features this server accepts.
    pub supported: Features,
    /// The per-stream window this server announces.
    pub stream_window: u32,
    /// Most services one tunnel may register.
    pub max_services: usize,
    /// Most connections open at once to one service.
    pub max_connections_per_service: usize,
    /// Streams kept for each other service of the tunnel (see
    /// `TunnelServerConfig::stream_reserve_per_service`).
    pub stream_reserve_per_service: usize,
    /// The tunnel's stream table (`send_initial` becomes the window the agent announces).
    pub streams: StreamSettings,
}

/// A `Register` waiting for its answer; answers leave in order.
#[derive(Debug)]
struct Pending {
    seq: u64,
    /// The service's name (a second registration of it is refused meanwhile).
    name: String,
    answer: Option<Message>,
}

/// A registered service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Service {
    name: String,
    port: u16,
}

/// What the session knows once the agent is authenticated.
#[derive(Debug)]
struct Open {
    tunnel_id: Uuid,
    features: Features,
    agent_window: u32,
    scope: TokenScope,
    services: HashMap<Uuid, Service>,
    pending: VecDeque<Pending>,
    next_seq: u64,
    liveness: Liveness,
    next_heartbeat: Instant,
}

#[derive(Debug)]
enum Phase {
    AwaitingAuth { deadline: Instant },
    Authenticating { offer: Option<Capabilities> },
    Open(Box<Open>),
    Closed,
}

/// One agent's control link, server side.
#[derive(Debug)]
pub struct ServerSession {
    settings: ServerSettings,
    phase: Phase,
    /// The tunnel's streams, flows and relayed streams, once authenticated.
    data: DataPlane,
    actions: VecDeque<ServerAction>,
    /// Frames not sent: not buildable, or of a type the peer did not
    /// announce (a bug either way: logged and counted, never silent).
    unsent: u64,
}

impl ServerSession {
    /// A session for a connection accepted at `now`.
    pub fn new(settings: ServerSettings, now: Instant) -> Self {
        let deadline = now + settings.auth_timeout;
        Self {
            settings,
            phase: Phase::AwaitingAuth { deadline },
            data: DataPlane::default(),
            actions: VecDeque::new(),
            unsent: 0,
        }
    }

    /// Frames not sent because they could not be built or the peer did not
    /// announce their type (0 unless there is a bug).
    pub fn frames_unsent(&self) -> u64 {
        self.unsent
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<ServerAction> {
        self.actions.pop_front()
    }

    /// True once `AuthOk` is sent and until the session ends.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The tunnel's id, once authenticated.
    pub fn tunnel_id(&self) -> Option<Uuid> {
        self.open().map(|o| o.tunnel_id)
    }

    /// The features this session has, or will have once authenticated:
    /// those both ends announce (none without an offer, or once closed).
    pub fn offered(&self) -> Features {
        let s = &self.settings;
        match &self.phase {
            Phase::Authenticating { offer: Some(offer) } => {
                Capabilities::accept(*offer, s.supported, s.stream_window).features
            }
            Phase::Open(open) => open.features,
            _ => Features::NONE,
        }
    }

    /// Features negotiated (none before authentication or with a legacy agent).
    pub fn features(&self) -> Features {
        self.open().map_or(Features::NONE, |o| o.features)
    }

    /// The window the agent announced: what we may send on a new stream.
    pub fn agent_window(&self) -> u32 {
        self.open()
            .map_or(DEFAULT_INITIAL_WINDOW, |o| o.agent_window)
    }

    /// What the agent's token may register and access.
    pub fn scope(&self) -> Option<&TokenScope> {
        self.open().map(|o| &o.scope)
    }

    /// Services registered.
    pub fn services(&self) -> usize {
        self.open().map_or(0, |o| o.services.len())
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AwaitingAuth { deadline } => Some(*deadline),
            Phase::Open(o) => Some(o.next_heartbeat.min(o.liveness.deadline())),
            Phase::Authenticating { .. } | Phase::Closed => None,
        }
    }

    /// A WebSocket message from the agent: one encoded frame.
    pub fn handle_bytes(&mut self, frame: Bytes, now: Instant) {
        match Message::decode_bytes(&frame) {
            Ok((message, _)) => self.handle(message, Some(frame), now),
            Err(e) => self.violation(ProtocolViolation::Malformed(e)),
        }
    }

    /// A frame from the agent, decoded.
    pub fn handle_frame(&mut self, message: Message, now: Instant) {
        self.handle(message, None, now);
    }

    fn handle(&mut self, message: Message, frame: Option<Bytes>, now: Instant) {
        match &self.phase {
            Phase::AwaitingAuth { .. } => self.on_first(message),
            // the caller holds later frames until the tunnel opens (`ctx.wait`);
            // anything else here is a frame the agent sent without waiting
            Phase::Authenticating { .. } => {
                self.violation(ProtocolViolation::BeforeAuth(message.message_type()));
            }
            Phase::Open(open) => {
                if let Err(v) = check_inbound(End::Server, open.features, &message) {
                    return self.violation(v);
                }
                self.on_message(message, frame, now);
            }
            Phase::Closed => {}
        }
    }

    /// The token checked and the tunnel opened: `AuthOk` (with the features
    /// both support) and a first `Heartbeat` go out.
    pub fn authenticated(
        &mut self,
        tunnel_id: Uuid,
        scope: TokenScope,
        now: Instant,
        unix_ms: u64,
    ) {
        let Phase::Authenticating { offer } = self.phase else {
            return;
        };
        let s = &self.settings;
        let answer = offer.map(|o| Capabilities::accept(o, s.supported, s.stream_window));
        let agent_window = offer.map_or(DEFAULT_INITIAL_WINDOW, |o| o.initial_window);
        self.data.start(StreamSettings {
            send_initial: agent_window,
            ..s.streams
        });
        self.phase = Phase::Open(Box::new(Open {
            tunnel_id,
            features: answer.map_or(Features::NONE, |c| c.features),
            agent_window,
            scope,
            services: HashMap::new(),
            pending: VecDeque::new(),
            next_seq: 0,
            liveness: Liveness::new(now, s.heartbeat_timeout),
            next_heartbeat: now + s.heartbeat_interval,
        }));
        self.send(Message::AuthOk {
            tunnel_id,
            capabilities: answer,
        });
        self.send(Message::Heartbeat { timestamp: unix_ms });
    }

    /// The token or the tunnel was refused: `AuthFail` (saying whether
    /// retrying can help, to an agent that understands it), then close.
    pub fn refused(&mut self, reason: &str, refusal: AuthRefusal) {
        let Phase::Authenticating { offer } = self.phase else {
            return;
        };
        let fail = match offer {
            Some(_) => Message::auth_refused(reason, refusal),
            None => Message::auth_fail(reason),
        };
        self.send_built(fail);
        self.close(CloseReason::AuthRefused);
    }

    /// A timer fired: the auth deadline, the heartbeat watchdog, the next
    /// heartbeat. `unix_ms` stamps the heartbeat.
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) {
        match &mut self.phase {
            Phase::AwaitingAuth { deadline } if now >= *deadline => {
                self.close(CloseReason::AuthTimeout);
            }
            Phase::Open(open) if open.liveness.is_expired(now) => {
                self.send_built(Message::disconnect("heartbeat timeout"));
                self.close(CloseReason::HeartbeatTimeout);
            }
            Phase::Open(open) if now >= open.next_heartbeat => {
                let interval = self.settings.heartbeat_interval;
                while open.next_heartbeat <= now {
                    open.next_heartbeat += interval;
                }
                self.actions.push_back(ServerAction::ReportAlive);
                self.send(Message::Heartbeat { timestamp: unix_ms });
            }
            _ => {}
        }
    }

    /// The server ends the session for `reason` (takeover, shutdown, a
    /// revoked token): `Disconnect`, then close.
    pub fn disconnect(&mut self, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.send_built(Message::disconnect(reason));
        self.close(CloseReason::Closed(reason.to_owned()));
    }

    /// The peer broke the protocol (also for what the caller finds: a text
    /// message, a frame that does not decode): `Disconnect` once
    /// authenticated, then close.
    pub fn violation(&mut self, violation: ProtocolViolation) {
        if self.is_closed() {
            return;
        }
        if self.is_open() {
            self.send_built(Message::disconnect(format!("protocol error: {violation}")));
        }
        self.close(CloseReason::Protocol(violation));
    }

    fn on_first(&mut self, message: Message) {
        match message {
            Message::Auth {
                token,
                client_id,
                capabilities,
            } => {
                self.phase = Phase::Authenticating {
                    offer: capabilities,
                };
                self.actions
                    .push_back(ServerAction::Authenticate { token, client_id });
            }
            other => self.violation(ProtocolViolation::BeforeAuth(other.message_type())),
        }
    }

    fn on_message(&mut self, message: Message, frame: Option<Bytes>, now: Instant) {
        match message {
            Message::HeartbeatAck { .. } => {
                if let Some(open) = self.open_mut() {
                    open.liveness.seen(now);
                }
            }
            Message::Heartbeat { timestamp } => self.send(Message::HeartbeatAck { timestamp }),
            Message::Register {
                name,
                protocol,
                remote_port,
                visitors,
                visitor_rate,
                bandwidth,
                ..
            } => self.on_register(
                name,
                protocol,
                remote_port,
                (&visitors, visitor_rate, bandwidth),
            ),
            Message::Unregister { service_id } => self.on_unregister(service_id),
            Message::Health {
                service_id,
                healthy,
            } => self.on_health(service_id, healthy),
            Message::Open {
                connection_id,
                service,
                target,
                protocol,
                visitor,
                probe,
            } => self.on_open(connection_id, service, (target, visitor), (protocol, probe)),
            data_plane => self.on_data_plane(data_plane, frame),
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.phase = Phase::Closed;
        // the link is over: a socket's late event sends nothing (the owner
        // resets every socket as it stops)
        self.data = DataPlane::default();
        self.actions.push_back(ServerAction::Close(reason));
    }

    /// Queues a frame, unless the agent did not announce its type.
    fn send(&mut self, message: Message) {
        match check_outbound(self.features(), &message) {
            Ok(()) => self.actions.push_back(ServerAction::Send(message)),
            Err(kind) => {
                self.unsent += 1;
                tracing::error!(?kind, "not sent: the agent did not announce it");
            }
        }
    }

    fn send_built(&mut self, message: Result<Message, crate::protocol::BuildError>) {
        match message {
            Ok(message) => self.send(message),
            // only reasons over 64 KiB fail, and ours are short: a failure
            // here is a bug, said loudly rather than dropped
            Err(error) => {
                self.unsent += 1;
                tracing::error!(%error, "control frame not built; not sent");
            }
        }
    }

    fn open(&self) -> Option<&Open> {
        match &self.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    fn open_mut(&mut self) -> Option<&mut Open> {
        match &mut self.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }
}
