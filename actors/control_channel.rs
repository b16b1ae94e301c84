//! `ControlChannel`: one per agent WebSocket (actix-web-actors; the only file
//! that knows the server's WebSocket crate).
//!
//! Owns the session's auth state, heartbeat timer, registered services (their
//! `ServiceListener`s) and its streams (a `StreamHub` of `ForwardedConnection`s).
//! Receives WebSocket frames, `VisitorArrived`, `StreamEvent` and
//! `CloseTunnel`; sends `OpenTunnel`, `AllocatePort`, `ReleasePort`,
//! `ReportAlive` and `TunnelClosed` to the registry. Lifecycle: closed at
//! `auth_timeout` if the agent has not authenticated; after `AuthOk` a
//! `Heartbeat` at once and every interval; stopped when the agent is silent
//! for `heartbeat_timeout`, when the socket ends, or when the registry closes
//! it. Stopping cancels the tunnel's token: its listeners and connections stop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::forwarded_connection::{ForwardedConnection, StreamEvent, StreamWiring};
use super::handles::control_handler::{AuthPlace, ServerShared};
use super::io::read_gate::ReadGate;
use super::now_ms;
use super::registry::{
    AllocatePort, CloseTunnel, FindService, FlowView, OpenTunnel, ReleasePort, ReportAlive,
    ServiceEntry, ServiceRegistered, TunnelClosed,
};
use super::relay::{Relay, Relays};
use super::service_listener::{
    ACCEPTED_SOCKETS_TUNED, ServiceListener, StopListener, VisitorArrived,
};
use super::stream_hub::StreamHub;
use super::udp_listener::{ForgetFlow, SendToVisitor, UdpEvent, UdpServiceListener, UdpWiring};
use crate::accounting::{CounterSet, Counters, Direction};
use crate::auth::{TokenScope, hash_token};
use crate::budget::Budget;
use crate::protocol::{AuthRefusal, CloseKind, Features, Message, ServiceProtocol, frame_feature};
use crate::session::{
    CloseReason, ProtocolViolation, Registration, ServerAction, ServerSession, TokenRefusal,
    check_token,
};

mod access;
mod services;
mod udp;

/// A registered service of this tunnel.
struct Service {
    name: String,
    port: u16,
    listener: Listener,
    counters: Arc<Counters>,
}

/// The public side of a service.
enum Listener {
    Tcp(Addr<ServiceListener>),
    Udp(Addr<UdpServiceListener>, Budget),
}

impl Listener {
    fn stop(&self) {
        match self {
            Self::Tcp(addr) => addr.do_send(StopListener),
            Self::Udp(addr, _) => addr.do_send(StopListener),
        }
    }
}

/// A socket bound for a service being registered.
enum Bound {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

/// A UDP flow of this tunnel: where the agent's datagrams for it go.
struct Flow {
    listener: Addr<UdpServiceListener>,
    budget: Budget,
    /// The service's counters (a datagram over the budget is a counted drop).
    counters: Arc<Counters>,
}

/// What an authenticated tunnel holds on the server: its listeners, streams,
/// flows and relays (the rules live in the channel's `ServerSession`).
struct Tunnel {
    tunnel_id: Uuid,
    features: Features,
    cancel: CancellationToken,
    services: HashMap<Uuid, Service>,
    streams: StreamHub,
    flows: HashMap<Uuid, Flow>,
    relays: Relays,
    agent_window: u32,
    counters: Arc<Counters>,
    /// Visitors' bytes read and not yet handed to the WebSocket (bounded).
    gate: Arc<ReadGate>,
}

/// The control channel actor.
pub(crate) struct ControlChannel {
    shared: Arc<ServerShared>,
    peer: SocketAddr,
    /// The link's rules: auth, negotiation, registrations, heartbeats.
    core: ServerSession,
    /// Set once the agent is authenticated.
    tunnel: Option<Tunnel>,
    /// The armed timer of the core's next deadline.
    timer: Option<(Instant, SpawnHandle)>,
    outbox: Vec<Bytes>,
    counters: Arc<Counters>,
    /// Its place among the connections awaiting authentication, until it
    /// authenticates.
    place: Option<AuthPlace>,
    span: tracing::Span,
}

impl Actor for ControlChannel {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.arm_timer(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.place = None;
        let Some(mut tunnel) = self.tunnel.take() else {
            return;
        };
        let _span = self.span.enter();
        tracing::info!(
            services = tunnel.services.len(),
            streams = tunnel.streams.len(),
            "agent disconnected"
        );
        tunnel.streams.close_all();
        tunnel.relays.end_all();
        tunnel.cancel.cancel();
        let registry = self.shared.registry.addr();
        registry.do_send(TunnelClosed {
            tunnel_id: tunnel.tunnel_id,
        });
    }
}

impl Handler<CloseTunnel> for ControlChannel {
    type Result = ();

    fn handle(&mut self, msg: CloseTunnel, ctx: &mut Self::Context) {
        self.span
            .in_scope(|| tracing::info!(reason = %msg.reason, "closing session"));
        self.core.disconnect(&msg.reason);
        self.execute(ctx);
    }
}

impl Handler<VisitorArrived> for ControlChannel {
    type Result = ();

    fn handle(&mut self, msg: VisitorArrived, ctx: &mut Self::Context) {
        match self.open_stream(msg.service_id, msg.socket, ctx) {
            Ok((id, first)) => {
                let connect = Message::connect(msg.service_id, id, msg.peer.to_string());
                self.send(ctx, connect.ok());
                // the visitor's first bytes ride in the same write as `Connect`
                if let Some(first) = first {
                    <Self as Handler<StreamEvent>>::handle(self, first, ctx);
                }
            }
            Err(reason) => self
                .span
                .in_scope(|| tracing::info!(visitor = %msg.peer, reason, "visitor refused")),
        }
    }
}

impl Handler<StreamEvent> for ControlChannel {
    type Result = ();

    fn handle(&mut self, event: StreamEvent, ctx: &mut Self::Context) {
        let Some(tunnel) = self.tunnel.as_mut() else {
            return;
        };
        let mut outbox = std::mem::take(&mut self.outbox);
        tunnel.streams.on_event(event, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for ControlChannel {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match item {
            Ok(ws::Message::Binary(frame)) => self.on_frame(frame, ctx),
            Ok(ws::Message::Ping(p)) => ctx.pong(&p),
            Ok(ws::Message::Close(_)) => ctx.stop(),
            Ok(ws::Message::Text(_) | ws::Message::Continuation(_)) => {
                self.core.violation(ProtocolViolation::NotBinary);
                self.execute(ctx);
            }
            Ok(ws::Message::Pong(_) | ws::Message::Nop) => {}
            Err(e) => {
                self.span
                    .in_scope(|| tracing::info!(error = %e, "agent connection lost"));
                ctx.stop();
            }
        }
    }
}

impl ControlChannel {
    pub(crate) fn new(shared: Arc<ServerShared>, peer: SocketAddr, place: AuthPlace) -> Self {
        let core = ServerSession::new(shared.config.session_settings(), Instant::now());
        Self {
            shared,
            peer,
            core,
            tunnel: None,
            timer: None,
            outbox: Vec::new(),
            counters: Arc::new(Counters::new()),
            place: Some(place),
            span: tracing::info_span!("control", %peer, tunnel_id = tracing::field::Empty),
        }
    }

    fn on_frame(&mut self, frame: Bytes, ctx: &mut ws::WebsocketContext<Self>) {
        let routed = match Message::decode_bytes(&frame) {
            Ok((message, _)) => self.core.handle_frame(message, Instant::now()),
            Err(e) => {
                self.core.violation(ProtocolViolation::Malformed(e));
                None
            }
        };
        if let Some(message) = routed {
            let relayed =
                (self.tunnel.as_mut()).is_some_and(|t| t.relays.relay_from_peer(&message, &frame));
            if !relayed {
                self.route(message, ctx);
            }
        }
        self.execute(ctx);
    }

    /// A data-plane frame the session passed: to its stream, flow or relay.
    fn route(&mut self, message: Message, ctx: &mut ws::WebsocketContext<Self>) {
        match message {
            Message::ConnectFail {
                connection_id,
                reason,
                ..
            } => {
                self.span.in_scope(|| tracing::info!(stream = %connection_id, %reason, "agent refused the visitor"));
                if let Some(tunnel) = self.tunnel.as_mut()
                    && !tunnel.forget_flow(connection_id)
                {
                    tunnel.streams.refuse(connection_id);
                }
            }
            Message::Datagram {
                connection_id,
                data,
            } => {
                if let Some(tunnel) = self.tunnel.as_mut() {
                    tunnel.relay_to_visitor(connection_id, data);
                }
            }
            Message::Open {
                connection_id,
                service,
                target,
            } => self.open_relay(connection_id, service, target, ctx),
            m @ (Message::Data { .. } | Message::Window { .. } | Message::Close { .. }) => {
                self.on_stream_frame(m, ctx)
            }
            _ => {} // ConnectAck: the server forwards without waiting for it
        }
    }

    fn on_stream_frame(&mut self, message: Message, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(tunnel) = self.tunnel.as_mut() else {
            return;
        };
        if let Message::Close { connection_id, .. } = &message
            && tunnel.forget_flow(*connection_id)
        {
            return;
        }
        let mut outbox = std::mem::take(&mut self.outbox);
        tunnel.streams.on_frame(message, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }

    /// Carries out what the session decided, in order.
    fn execute(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        while let Some(action) = self.core.poll_action() {
            match action {
                ServerAction::Send(message) => self.send_frame(ctx, message.to_bytes()),
                ServerAction::Authenticate { token, client_id } => {
                    self.authenticate(token.expose(), client_id, ctx)
                }
                ServerAction::Allocate(registration) => self.register(registration, ctx),
                ServerAction::Unregister { service_id, .. } => self.unregister(service_id),
                ServerAction::ReportAlive => {
                    if let Some(tunnel_id) = self.core.tunnel_id() {
                        self.shared
                            .registry
                            .addr()
                            .do_send(ReportAlive { tunnel_id });
                    }
                }
                ServerAction::Close(reason) => return self.close(&reason, ctx),
            }
        }
        self.arm_timer(ctx);
    }

    /// Ends the session: the WebSocket's close code says why.
    fn close(&mut self, reason: &CloseReason, ctx: &mut ws::WebsocketContext<Self>) {
        let code = match reason {
            CloseReason::AuthTimeout | CloseReason::AuthRefused => ws::CloseCode::Policy,
            CloseReason::HeartbeatTimeout => ws::CloseCode::Away,
            CloseReason::Protocol(_) => ws::CloseCode::Protocol,
            CloseReason::Closed(_) => ws::CloseCode::Normal,
        };
        let _span = self.span.enter();
        match reason {
            CloseReason::AuthTimeout => {
                tracing::warn!("no authentication before the deadline; closing")
            }
            CloseReason::HeartbeatTimeout => {
                tracing::warn!("heartbeat timeout; dropping the agent")
            }
            CloseReason::Protocol(violation) => {
                tracing::warn!(reason = %violation, "protocol error; closing the session")
            }
            CloseReason::AuthRefused | CloseReason::Closed(_) => {}
        }
        ctx.close(Some(code.into()));
        ctx.stop();
    }

    /// Arms a timer for the session's next deadline, unless one as early is armed.
    fn arm_timer(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(deadline) = self.core.next_deadline() else {
            return;
        };
        if self.timer.as_ref().is_some_and(|(at, _)| *at <= deadline) {
            return;
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        let delay = deadline.saturating_duration_since(Instant::now());
        let handle = ctx.run_later(delay, |act, ctx| {
            act.timer = None;
            act.core.handle_timeout(Instant::now(), now_ms());
            act.execute(ctx);
        });
        self.timer = Some((deadline, handle));
    }

    fn authenticate(&mut self, token: &str, client_id: Uuid, ctx: &mut ws::WebsocketContext<Self>) {
        if let Err(refusal) = self.check_token(token) {
            self.core.refused(&refusal.to_string(), refusal.refusal());
            return;
        }
        let scope = self.shared.scope(token);
        let config = &self.shared.config;
        let open = OpenTunnel {
            token_hash: hash_token(token),
            client_id,
            peer: self.peer,
            channel: ctx.address().recipient(),
            relay: ctx.address().recipient(),
            timeout: config.heartbeat_timeout + config.heartbeat_interval,
            max_tunnels: config.max_tunnels,
            counters: self.counters.clone(),
        };
        self.shared
            .registry
            .addr()
            .send(open)
            .into_actor(self)
            .map(
                move |result, act, ctx| match result.map_err(super::Error::from).and_then(|r| r) {
                    Ok((tunnel_id, cancel)) => act.accepted(tunnel_id, cancel, scope, ctx),
                    Err(e) => {
                        act.span.in_scope(|| {
                            tracing::warn!(reason = %e, "authentication refused by the registry")
                        });
                        act.core.refused(&e.to_string(), AuthRefusal::Later);
                        act.execute(ctx);
                    }
                },
            )
            .wait(ctx);
    }

    /// Checks a token (with the lockouts of failed attempts), logging a refusal.
    fn check_token(&self, token: &str) -> Result<(), TokenRefusal> {
        let Ok(mut throttle) = self.shared.throttle.lock() else {
            return Err(TokenRefusal::LockedOut { retry_in_s: 1 });
        };
        let verdict = check_token(&mut throttle, self.peer.ip(), Instant::now(), || {
            (self.shared.validator)(token)
        });
        let _span = self.span.enter();
        match &verdict {
            Ok(()) => {}
            Err(TokenRefusal::LockedOut { retry_in_s }) => tracing::warn!(
                retry_in_s,
                "authentication during a lockout refused unchecked"
            ),
            Err(TokenRefusal::Refused {
                reason,
                failures,
                lockout: Some(lockout),
            }) => {
                tracing::warn!(%reason, failures, lockout = %humantime::format_duration(*lockout), "authentication refused; address locked out")
            }
            Err(TokenRefusal::Refused {
                reason, failures, ..
            }) => tracing::warn!(%reason, failures, "authentication refused"),
        }
        verdict
    }

    fn accepted(
        &mut self,
        tunnel_id: Uuid,
        cancel: CancellationToken,
        scope: TokenScope,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.place = None;
        self.span
            .record("tunnel_id", tracing::field::display(tunnel_id));
        self.core
            .authenticated(tunnel_id, scope, Instant::now(), now_ms());
        let (features, agent_window) = (self.core.features(), self.core.agent_window());
        let settings = self.shared.config.stream_settings(agent_window);
        self.span
            .in_scope(|| tracing::info!(?features, "agent authenticated"));
        self.tunnel = Some(Tunnel {
            tunnel_id,
            features,
            cancel,
            services: HashMap::new(),
            streams: StreamHub::new(settings),
            flows: HashMap::new(),
            relays: Relays::default(),
            agent_window,
            counters: self.counters.clone(),
            gate: ReadGate::new(self.shared.config.read_ahead),
        });
        self.execute(ctx);
    }

    /// Opens a stream for a visitor: its connection actor starts reading up
    /// to the agent's window. The stream's id, and what the visitor had
    /// already sent, if anything (to send right after `Connect`).
    fn open_stream(
        &mut self,
        service_id: Uuid,
        socket: tokio::net::TcpStream,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<(Uuid, Option<StreamEvent>), &'static str> {
        let max = self.shared.config.max_connections_per_service as u64;
        let tunnel = self.tunnel.as_mut().ok_or("session not authenticated")?;
        if !tunnel.features.contains(Features::STREAMS) {
            return Err("legacy agent: no data plane");
        }
        let service = tunnel
            .services
            .get(&service_id)
            .ok_or("service unregistered")?;
        if service.counters.snapshot().connections_active >= max {
            return Err("service is at its connection limit");
        }
        let id = Uuid::new_v4();
        tunnel
            .streams
            .open(id)
            .map_err(|_| "tunnel is at its stream limit")?;
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: tunnel.agent_window,
            counters: CounterSet::new(vec![service.counters.clone(), tunnel.counters.clone()]),
            read_direction: Direction::In,
            cancel: Some(tunnel.cancel.child_token()),
            gate: tunnel.gate.clone(),
            tuned: ACCEPTED_SOCKETS_TUNED,
        };
        let (addr, first) = ForwardedConnection::start_reading(socket, wiring);
        tunnel.streams.attach(id, addr);
        Ok((id, first))
    }

    fn flush(&mut self, mut outbox: Vec<Bytes>, ctx: &mut ws::WebsocketContext<Self>) {
        for frame in outbox.drain(..) {
            self.send_frame(ctx, frame);
        }
        self.outbox = outbox;
    }

    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, message: Option<Message>) {
        if let Some(message) = message {
            self.send_frame(ctx, message.to_bytes());
        }
    }

    /// Sends one frame per WebSocket message; never a type the peer did not announce.
    fn send_frame(&self, ctx: &mut ws::WebsocketContext<Self>, frame: Bytes) {
        if !self.core.features().contains(frame_feature(&frame)) {
            tracing::debug!(
                kind = frame.first(),
                "not sent: the peer did not announce it"
            );
            return;
        }
        ctx.binary(frame);
    }
}
