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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use actix_web_actors::ws;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::control_handler::{AuthPlace, ServerShared};
use super::forwarded_connection::{ForwardedConnection, StreamEvent, StreamWiring};
use super::read_gate::ReadGate;
use super::registry::{
    AllocatePort, CloseTunnel, FindService, FlowView, OpenTunnel, ReleasePort, ReportAlive,
    ServiceEntry, ServiceRegistered, TunnelClosed,
};
use super::relay::{Relay, Relays};
use super::service_listener::{
    ACCEPTED_SOCKETS_TUNED, ServiceListener, StopListener, VisitorArrived,
};
use super::stream_hub::StreamHub;
use super::udp_listener::{
    Budget, ForgetFlow, SendToVisitor, UdpEvent, UdpServiceListener, UdpWiring,
};
use crate::accounting::{CounterSet, Counters, Direction};
use crate::auth::{TokenScope, hash_token};
use crate::liveness::{Liveness, heartbeat_timestamp};
use crate::protocol::{
    Capabilities, CloseKind, DEFAULT_INITIAL_WINDOW, Features, Message, ServiceProtocol,
    frame_feature,
};
use crate::throttle::Admission;

mod access;
mod services;
mod udp;

/// Features this server accepts.
const SUPPORTED: Features = Features::from_bits(
    Features::STREAMS.bits() | Features::DATAGRAMS.bits() | Features::ACCESS.bits(),
);

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

/// The authenticated part of a session.
struct Session {
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
    session: Option<Session>,
    liveness: Liveness,
    outbox: Vec<Bytes>,
    counters: Arc<Counters>,
    /// What this session's token may register and access.
    scope: TokenScope,
    /// Its place among the connections awaiting authentication, until it
    /// authenticates.
    place: Option<AuthPlace>,
    span: tracing::Span,
}

impl Actor for ControlChannel {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let config = &self.shared.config;
        ctx.run_later(config.auth_timeout, |act, ctx| {
            if act.session.is_none() {
                act.span
                    .in_scope(|| tracing::warn!("no authentication before the deadline; closing"));
                ctx.stop();
            }
        });
        ctx.run_interval(config.heartbeat_interval, |act, ctx| act.tick(ctx));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.place = None;
        let Some(mut session) = self.session.take() else {
            return;
        };
        let _span = self.span.enter();
        tracing::info!(
            services = session.services.len(),
            streams = session.streams.len(),
            "agent disconnected"
        );
        session.streams.close_all();
        session.relays.end_all();
        session.cancel.cancel();
        let registry = self.shared.registry.addr();
        registry.do_send(TunnelClosed {
            tunnel_id: session.tunnel_id,
        });
    }
}

impl Handler<CloseTunnel> for ControlChannel {
    type Result = ();

    fn handle(&mut self, msg: CloseTunnel, ctx: &mut Self::Context) {
        self.span
            .in_scope(|| tracing::info!(reason = %msg.reason, "closing session"));
        self.send(ctx, Message::disconnect(msg.reason).ok());
        ctx.close(Some(ws::CloseCode::Normal.into()));
        ctx.stop();
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
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let mut outbox = std::mem::take(&mut self.outbox);
        session.streams.on_event(event, &mut |m| outbox.push(m));
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
                self.protocol_error(
                    ctx,
                    "text and fragmented messages are not part of the protocol",
                );
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
        let timeout = shared.config.heartbeat_timeout;
        Self {
            shared,
            peer,
            session: None,
            liveness: Liveness::new(Instant::now(), timeout),
            outbox: Vec::new(),
            counters: Arc::new(Counters::new()),
            scope: TokenScope::default(),
            place: Some(place),
            span: tracing::info_span!("control", %peer, tunnel_id = tracing::field::Empty),
        }
    }

    fn on_frame(&mut self, frame: Bytes, ctx: &mut ws::WebsocketContext<Self>) {
        let message = match Message::decode_bytes(&frame) {
            Ok((message, _)) => message,
            Err(e) => return self.protocol_error(ctx, &e.to_string()),
        };
        match (self.session.is_some(), message) {
            (
                false,
                Message::Auth {
                    token,
                    client_id,
                    capabilities,
                },
            ) => {
                self.authenticate(token.expose(), client_id, capabilities, ctx);
            }
            (false, other) => {
                self.protocol_error(ctx, &format!("{:?} before Auth", other.message_type()))
            }
            (true, message) => {
                let relayed = (self.session.as_mut())
                    .is_some_and(|s| s.relays.relay_from_peer(&message, &frame));
                if !relayed {
                    self.on_session_message(message, ctx);
                }
            }
        }
    }

    fn on_session_message(&mut self, message: Message, ctx: &mut ws::WebsocketContext<Self>) {
        match message {
            Message::HeartbeatAck { .. } => self.liveness.seen(Instant::now()),
            Message::Heartbeat { timestamp } => {
                self.send(ctx, Some(Message::HeartbeatAck { timestamp }))
            }
            Message::Register {
                name,
                protocol,
                remote_port,
                ..
            } => self.register(name, protocol, remote_port, ctx),
            Message::Unregister { service_id } => self.unregister(service_id),
            Message::ConnectAck { .. } => {}
            Message::ConnectFail {
                connection_id,
                reason,
                ..
            } => {
                self.span.in_scope(|| tracing::info!(stream = %connection_id, %reason, "agent refused the visitor"));
                if let Some(session) = self.session.as_mut()
                    && !session.forget_flow(connection_id)
                {
                    session.streams.refuse(connection_id);
                }
            }
            Message::Datagram {
                connection_id,
                data,
            } => self.on_datagram(connection_id, data, ctx),
            Message::Open {
                connection_id,
                service,
                target,
            } => self.open_relay(connection_id, service, target, ctx),
            m @ (Message::Data { .. } | Message::Window { .. } | Message::Close { .. }) => {
                self.on_stream_frame(m, ctx)
            }
            other => self.protocol_error(ctx, &format!("unexpected {:?}", other.message_type())),
        }
    }

    fn on_stream_frame(&mut self, message: Message, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if let Message::Close { connection_id, .. } = &message
            && session.forget_flow(*connection_id)
        {
            return;
        }
        if !session.features.contains(Features::STREAMS) {
            return self.protocol_error(ctx, "stream frame without the STREAMS feature");
        }
        let mut outbox = std::mem::take(&mut self.outbox);
        session.streams.on_frame(message, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }

    fn authenticate(
        &mut self,
        token: &str,
        client_id: Uuid,
        offer: Option<Capabilities>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if let Err(reason) = self.check_token(token) {
            return self.refuse_auth(&reason, ctx);
        }
        self.scope = self.shared.scope(token);
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
                    Ok((tunnel_id, cancel)) => act.accepted(tunnel_id, cancel, offer, ctx),
                    Err(e) => {
                        act.span.in_scope(|| {
                            tracing::warn!(reason = %e, "authentication refused by the registry")
                        });
                        act.refuse_auth(&e.to_string(), ctx)
                    }
                },
            )
            .wait(ctx);
    }

    /// Checks a token, unless the peer's address is locked out after failed
    /// attempts; failures count toward a lockout. The refusal's reason.
    fn check_token(&self, token: &str) -> Result<(), String> {
        let (ip, now) = (self.peer.ip(), Instant::now());
        let Ok(mut throttle) = self.shared.throttle.lock() else {
            return Err("server error".to_owned());
        };
        if let Admission::LockedOut(left) = throttle.admit(ip, now) {
            let retry = left.as_secs() + 1;
            self.span.in_scope(|| {
                tracing::warn!(
                    retry_in_s = retry,
                    "authentication during a lockout refused unchecked"
                )
            });
            return Err(format!(
                "too many failed authentications from this address; retry in {retry}s"
            ));
        }
        let Err(e) = (self.shared.validator)(token) else {
            throttle.succeeded(ip);
            return Ok(());
        };
        match throttle.failed(ip, now) {
            (Some(lockout), failures) => self.span.in_scope(|| {
                tracing::warn!(reason = %e, failures, lockout = %humantime::format_duration(lockout), "authentication refused; address locked out");
            }),
            (None, failures) => self.span.in_scope(|| {
                tracing::warn!(reason = %e, failures, "authentication refused");
            }),
        }
        Err(e.to_string())
    }

    fn accepted(
        &mut self,
        tunnel_id: Uuid,
        cancel: CancellationToken,
        offer: Option<Capabilities>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.place = None;
        self.span
            .record("tunnel_id", tracing::field::display(tunnel_id));
        let config = &self.shared.config;
        let answer = offer.map(|o| Capabilities::accept(o, SUPPORTED, config.stream_window));
        let features = answer.map_or(Features::NONE, |c| c.features);
        let agent_window = offer.map_or(DEFAULT_INITIAL_WINDOW, |o| o.initial_window);
        let settings = config.stream_settings(agent_window);
        self.span
            .in_scope(|| tracing::info!(?features, "agent authenticated"));
        self.session = Some(Session {
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
        self.liveness.seen(Instant::now());
        self.send(
            ctx,
            Some(Message::AuthOk {
                tunnel_id,
                capabilities: answer,
            }),
        );
        self.send(
            ctx,
            Some(Message::Heartbeat {
                timestamp: now_millis(),
            }),
        );
    }

    fn refuse_auth(&mut self, reason: &str, ctx: &mut ws::WebsocketContext<Self>) {
        self.send(ctx, Message::auth_fail(reason).ok());
        ctx.close(Some(ws::CloseCode::Policy.into()));
        ctx.stop();
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
        let session = self.session.as_mut().ok_or("session not authenticated")?;
        if !session.features.contains(Features::STREAMS) {
            return Err("legacy agent: no data plane");
        }
        let service = session
            .services
            .get(&service_id)
            .ok_or("service unregistered")?;
        if service.counters.snapshot().connections_active >= max {
            return Err("service is at its connection limit");
        }
        let id = Uuid::new_v4();
        session
            .streams
            .open(id)
            .map_err(|_| "tunnel is at its stream limit")?;
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: session.agent_window,
            counters: CounterSet::new(vec![service.counters.clone(), session.counters.clone()]),
            read_direction: Direction::In,
            cancel: Some(session.cancel.child_token()),
            gate: session.gate.clone(),
            tuned: ACCEPTED_SOCKETS_TUNED,
        };
        let (addr, first) = ForwardedConnection::start_reading(socket, wiring);
        session.streams.attach(id, addr);
        Ok((id, first))
    }

    fn tick(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(session) = &self.session else { return };
        let tunnel_id = session.tunnel_id;
        if self.liveness.is_expired(Instant::now()) {
            self.span
                .in_scope(|| tracing::warn!("heartbeat timeout; dropping the agent"));
            self.send(ctx, Message::disconnect("heartbeat timeout").ok());
            ctx.close(Some(ws::CloseCode::Away.into()));
            return ctx.stop();
        }
        self.shared
            .registry
            .addr()
            .do_send(ReportAlive { tunnel_id });
        self.send(
            ctx,
            Some(Message::Heartbeat {
                timestamp: now_millis(),
            }),
        );
    }

    fn protocol_error(&mut self, ctx: &mut ws::WebsocketContext<Self>, reason: &str) {
        self.span
            .in_scope(|| tracing::warn!(%reason, "protocol error; closing the session"));
        if self.session.is_some() {
            self.send(
                ctx,
                Message::disconnect(format!("protocol error: {reason}")).ok(),
            );
        }
        ctx.close(Some(ws::CloseCode::Protocol.into()));
        ctx.stop();
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
        let features = self.session.as_ref().map_or(Features::NONE, |s| s.features);
        if !features.contains(frame_feature(&frame)) {
            tracing::debug!(
                kind = frame.first(),
                "not sent: the peer did not announce it"
            );
            return;
        }
        ctx.binary(frame);
    }
}

fn now_millis() -> u64 {
    heartbeat_timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}
