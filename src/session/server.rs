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
use std::net::IpAddr;
use std::time::{Duration, Instant};

use uuid::Uuid;

use bytes::Bytes;

use super::data::{DataPlane, Emit};
use super::{End, ProtocolViolation, check_inbound, check_outbound};
use crate::auth::{Secret, TokenScope};
use crate::connections::{ConnectionAction, StreamSettings};
use crate::liveness::Liveness;
use crate::outbound::Outbound;
use crate::protocol::{
    AuthRefusal, Capabilities, CloseKind, DEFAULT_INITIAL_WINDOW, Features, Message, MessageType,
    ServiceProtocol,
};

mod connections;
use crate::throttle::{Admission, AuthThrottle};

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
    /// The tunnel's stream table (`send_initial` becomes the window the agent announces).
    pub streams: StreamSettings,
}

/// Why a session ends (the caller maps it to a WebSocket close code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// No `Auth` within `auth_timeout`.
    AuthTimeout,
    /// `Auth` refused (`AuthFail` sent).
    AuthRefused,
    /// No `HeartbeatAck` within `heartbeat_timeout` (`Disconnect` sent).
    HeartbeatTimeout,
    /// The peer broke the protocol (`Disconnect` sent once authenticated).
    Protocol(ProtocolViolation),
    /// The server ends it (takeover, shutdown, a revoked token): `Disconnect` sent.
    Closed(String),
}

/// What the owner of a server session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// Write this frame to the agent.
    Send(Message),
    /// Check `token` ([`check_token`]) and open the tunnel, then answer with
    /// [`ServerSession::authenticated`] or [`ServerSession::refused`].
    Authenticate {
        /// The raw token (hash it; never log it).
        token: Secret,
        /// The agent's stable id.
        client_id: Uuid,
    },
    /// Allocate the public port of a registration and listen on it, then
    /// answer with [`ServerSession::allocated`].
    Allocate(Registration),
    /// The agent unregistered a service: stop its listener, free its port.
    Unregister {
        /// The service.
        service_id: Uuid,
        /// Its public port.
        port: u16,
    },
    /// Tell the registry the tunnel is alive.
    ReportAlive,
    /// Write this frame, encoded by a socket's reader, to the agent.
    Write(Outbound),
    /// Carry this out on a connection's socket (deliver, credit, shut,
    /// reset, a datagram for a visitor, a flow forgotten).
    Socket(ConnectionAction),
    /// Pass a frame of relayed access stream `id` to the other end's channel.
    Relay {
        /// The stream.
        id: Uuid,
        /// The frame's type.
        kind: MessageType,
        /// The kind of a `Close`.
        close: Option<CloseKind>,
        /// The frame, as it came.
        frame: Bytes,
        /// The relay is over with it: forget the other end after passing it.
        last: bool,
    },
    /// An access client's `Open` to `service`, within its token's scope:
    /// find the channel of the agent that registered it, then answer
    /// [`ServerSession::relay_found`] or [`ServerSession::relay_not_found`].
    FindService {
        /// The new stream.
        id: Uuid,
        /// The service's name.
        service: String,
        /// What the client asks the agent to dial instead, if allowed.
        target: String,
    },
    /// End the session: close the WebSocket, free what it holds.
    Close(CloseReason),
}

/// A registration that passed the session's checks and waits for its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Its place in the order of `Register`s (answers go out in this order).
    pub seq: u64,
    /// The service name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: ServiceProtocol,
    /// The public port asked for, 0 for any.
    pub remote_port: u16,
    /// Public ports the token may take (`None`: the server's whole range).
    pub allowed_ports: Option<Vec<(u16, u16)>>,
}

/// A `Register` waiting for its answer; answers leave in order.
#[derive(Debug)]
struct Pending {
    seq: u64,
    answer: Option<Message>,
}

/// A registered service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Service {
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
        }
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

    /// The port of registration `seq` was allocated and listened on
    /// (`Ok((service_id, port))`), or not (`Err(reason)`). Answers go out
    /// in the order of the `Register`s.
    pub fn allocated(&mut self, seq: u64, result: Result<(Uuid, u16), String>) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        let answer = match result {
            Ok((service_id, port)) => {
                open.services.insert(service_id, Service { port });
                Message::RegisterOk {
                    service_id,
                    port: Some(port),
                }
            }
            Err(reason) => register_fail(reason),
        };
        if let Some(p) = open.pending.iter_mut().find(|p| p.seq == seq) {
            p.answer = Some(answer);
        }
        self.answer_in_order();
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
                ..
            } => self.on_register(name, protocol, remote_port),
            Message::Unregister { service_id } => self.on_unregister(service_id),
            Message::Open {
                connection_id,
                service,
                target,
            } => self.on_open(connection_id, service, target),
            data_plane => self.on_data_plane(data_plane, frame),
        }
    }

    fn on_register(&mut self, name: String, protocol: ServiceProtocol, remote_port: u16) {
        let max_services = self.settings.max_services;
        let Some(open) = self.open_mut() else { return };
        let seq = open.next_seq;
        open.next_seq += 1;
        let refusal = registration_refusal(open, max_services, &name, protocol, remote_port);
        open.pending.push_back(Pending {
            seq,
            answer: refusal.map(register_fail),
        });
        if open.pending.back().is_some_and(|p| p.answer.is_none()) {
            let allowed_ports = open.scope.ports.clone();
            self.actions.push_back(ServerAction::Allocate(Registration {
                seq,
                name,
                protocol,
                remote_port,
                allowed_ports,
            }));
        }
        self.answer_in_order();
    }

    fn on_unregister(&mut self, service_id: Uuid) {
        let Some(open) = self.open_mut() else { return };
        if let Some(service) = open.services.remove(&service_id) {
            let port = service.port;
            self.actions
                .push_back(ServerAction::Unregister { service_id, port });
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

    fn close(&mut self, reason: CloseReason) {
        self.phase = Phase::Closed;
        self.actions.push_back(ServerAction::Close(reason));
    }

    /// Queues a frame, unless the agent did not announce its type.
    fn send(&mut self, message: Message) {
        match check_outbound(self.features(), &message) {
            Ok(()) => self.actions.push_back(ServerAction::Send(message)),
            Err(kind) => tracing::error!(?kind, "not sent: the agent did not announce it"),
        }
    }

    fn send_built(&mut self, message: Result<Message, crate::protocol::BuildError>) {
        match message {
            Ok(message) => self.send(message),
            // only reasons over 64 KiB fail, and ours are short: a failure
            // here is a bug, said loudly rather than dropped
            Err(error) => tracing::error!(%error, "control frame not built; not sent"),
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
    let registering = open.services.len() + allocating;
    if registering >= max_services {
        return Some(format!("tunnel is at its limit of {max_services} services"));
    }
    if protocol == ServiceProtocol::Udp && !open.features.contains(Features::DATAGRAMS) {
        return Some(
            "udp services need the DATAGRAMS capability, which this agent did not offer".to_owned(),
        );
    }
    None
}

fn register_fail(reason: String) -> Message {
    // a reason too long for a frame is cut rather than lost
    Message::register_fail(reason.clone()).unwrap_or_else(|_| Message::RegisterFail {
        reason: reason.chars().take(1024).collect(),
    })
}

/// Why [`check_token`] refused a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// The address is locked out after failed attempts; the token was not looked at.
    #[error("too many failed authentications from this address; retry in {retry_in_s}s")]
    LockedOut {
        /// Seconds until the lockout ends (rounded up).
        retry_in_s: u64,
    },
    /// The token was checked and refused.
    #[error("{reason}")]
    Refused {
        /// The validator's reason.
        reason: String,
        /// Failures from this address so far.
        failures: u32,
        /// The lockout this failure started, if any.
        lockout: Option<Duration>,
    },
}

impl TokenRefusal {
    /// Whether retrying can help: after a lockout, yes; a refused token, no.
    pub fn refusal(&self) -> AuthRefusal {
        match self {
            Self::LockedOut { .. } => AuthRefusal::Later,
            Self::Refused { .. } => AuthRefusal::Token,
        }
    }
}

/// Checks a token from `addr`, unless the address is locked out after failed
/// attempts (then the token is not looked at); a failure counts toward a
/// lockout, a success forgets the address.
pub fn check_token<E: std::fmt::Display>(
    throttle: &mut AuthThrottle,
    addr: IpAddr,
    now: Instant,
    verify: impl FnOnce() -> Result<(), E>,
) -> Result<(), TokenRefusal> {
    if let Admission::LockedOut(left) = throttle.admit(addr, now) {
        return Err(TokenRefusal::LockedOut {
            retry_in_s: left.as_secs() + 1,
        });
    }
    match verify() {
        Ok(()) => {
            throttle.succeeded(addr);
            Ok(())
        }
        Err(e) => {
            let (lockout, failures) = throttle.failed(addr, now);
            Err(TokenRefusal::Refused {
                reason: e.to_string(),
                failures,
                lockout,
            })
        }
    }
}
