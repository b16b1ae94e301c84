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

use super::control_handler::ServerShared;
use super::forwarded_connection::{ForwardedConnection, StreamEvent, StreamWiring};
use super::registry::{
    AllocatePort, CloseTunnel, FindService, FlowView, OpenTunnel, ReleasePort, ReportAlive,
    ServiceEntry, ServiceRegistered, TunnelClosed,
};
use super::relay::{Relay, Relays};
use super::service_listener::{ServiceListener, StopListener, VisitorArrived};
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
use crate::streams::StreamSettings;
use crate::throttle::Admission;

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
            Ok(id) => {
                let connect = Message::connect(msg.service_id, id, msg.peer.to_string());
                self.send(ctx, connect.ok());
            }
            Err(reason) => self
                .span
                .in_scope(|| tracing::info!(visitor = %msg.peer, reason, "visitor refused")),
        }
    }
}

impl Handler<UdpEvent> for ControlChannel {
    type Result = ();

    fn handle(&mut self, event: UdpEvent, ctx: &mut Self::Context) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match event {
            UdpEvent::Opened {
                service_id,
                id,
                visitor,
                listener,
            } => {
                let Some(budget) = session.udp_budget(service_id) else {
                    return;
                };
                let Some(service) = session.services.get(&service_id) else {
                    return;
                };
                let counters = service.counters.clone();
                let flow = Flow {
                    listener,
                    budget,
                    counters,
                };
                session.flows.insert(id, flow);
                self.send(
                    ctx,
                    Message::connect(service_id, id, visitor.to_string()).ok(),
                );
            }
            UdpEvent::Datagram {
                service_id,
                id,
                frame,
            } => {
                if let Some(budget) = session.udp_budget(service_id) {
                    budget.give(frame.len());
                }
                if session.flows.contains_key(&id) {
                    ctx.binary(frame);
                }
            }
            UdpEvent::Closed { id } => {
                if session.flows.remove(&id).is_some() {
                    let close = Message::Close {
                        connection_id: id,
                        kind: CloseKind::Abort,
                    };
                    self.send(ctx, Some(close));
                }
            }
        }
    }
}

impl Handler<Relay> for ControlChannel {
    type Result = ();

    fn handle(&mut self, relay: Relay, ctx: &mut Self::Context) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match relay {
            Relay::Open {
                id,
                service,
                target,
                from,
            } => {
                if !session.features.contains(Features::ACCESS) {
                    let reason = "the agent of this service does not take access streams";
                    if let Ok(refusal) = Message::connect_fail(id, reason) {
                        from.do_send(Relay::Frame {
                            id,
                            frame: refusal.to_bytes(),
                        });
                    }
                    return;
                }
                session.relays.insert(id, from);
                self.send(ctx, Message::open(id, service, target).ok());
            }
            Relay::Frame { id, frame } => {
                if session.relays.accept_from_other(id, &frame) {
                    ctx.binary(frame);
                }
            }
            Relay::Gone { id } => {
                if session.relays.remove(id) {
                    let close = Message::Close {
                        connection_id: id,
                        kind: CloseKind::Abort,
                    };
                    self.send(ctx, Some(close));
                }
            }
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

impl Session {
    /// The datagram budget of UDP service `service_id`.
    fn udp_budget(&self, service_id: Uuid) -> Option<Budget> {
        match self.services.get(&service_id).map(|s| &s.listener) {
            Some(Listener::Udp(_, budget)) => Some(budget.clone()),
            _ => None,
        }
    }

    /// A datagram from the agent for flow `id`: to its listener, if within budget.
    fn relay_to_visitor(&mut self, id: Uuid, data: Bytes) {
        let Some(flow) = self.flows.get(&id) else {
            return; // a race after the flow ended
        };
        if flow.budget.take(data.len()) {
            flow.listener.do_send(SendToVisitor { id, data });
        } else {
            flow.counters.add_drop();
        }
    }

    /// Forgets flow `id` on both sides of the server; false if it is not a flow.
    fn forget_flow(&mut self, id: Uuid) -> bool {
        let Some(flow) = self.flows.remove(&id) else {
            return false;
        };
        flow.listener.do_send(ForgetFlow(id));
        true
    }
}

impl ControlChannel {
    pub(crate) fn new(shared: Arc<ServerShared>, peer: SocketAddr) -> Self {
        let timeout = shared.config.heartbeat_timeout;
        Self {
            shared,
            peer,
            session: None,
            liveness: Liveness::new(Instant::now(), timeout),
            outbox: Vec::new(),
            counters: Arc::new(Counters::new()),
            scope: TokenScope::default(),
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

    /// An access client's `Open`: relayed to the channel of the agent that
    /// registered `service`. Later frames wait for the lookup (`wait`), so the
    /// client's first `Window` finds the relay in place.
    fn open_relay(
        &mut self,
        id: Uuid,
        service: String,
        target: String,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        if !session.features.contains(Features::ACCESS) {
            return self.protocol_error(ctx, "Open without the ACCESS feature");
        }
        if let Err(e) = self.scope.check_access(&service) {
            self.span
                .in_scope(|| tracing::warn!(stream = %id, reason = %e, "access stream refused"));
            return self.send(ctx, Message::connect_fail(id, e.to_string()).ok());
        }
        let find = FindService {
            name: service.clone(),
        };
        self.shared
            .registry
            .addr()
            .send(find)
            .into_actor(self)
            .map(move |found, act, ctx| {
                let Some(session) = act.session.as_mut() else {
                    return;
                };
                let Ok(Some(agent)) = found else {
                    let reason = format!("no service named {service:?} on this server");
                    act.span.in_scope(
                        || tracing::info!(stream = %id, %reason, "access stream refused"),
                    );
                    return act.send(ctx, Message::connect_fail(id, reason).ok());
                };
                session.relays.insert(id, agent.clone());
                agent.do_send(Relay::Open {
                    id,
                    service,
                    target,
                    from: ctx.address().recipient(),
                });
            })
            .wait(ctx);
    }

    fn on_datagram(&mut self, id: Uuid, data: Bytes, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if !session.features.contains(Features::DATAGRAMS) {
            return self.protocol_error(ctx, "datagram without the DATAGRAMS feature");
        }
        session.relay_to_visitor(id, data);
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
                    Err(e) => act.refuse_auth(&e.to_string(), ctx),
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
        self.span
            .record("tunnel_id", tracing::field::display(tunnel_id));
        let config = &self.shared.config;
        let answer = offer.map(|o| Capabilities::accept(o, SUPPORTED, config.stream_window));
        let features = answer.map_or(Features::NONE, |c| c.features);
        let agent_window = offer.map_or(DEFAULT_INITIAL_WINDOW, |o| o.initial_window);
        let settings = StreamSettings {
            max_streams: config.max_streams_per_tunnel,
            recv_initial: config.stream_window,
            recv_max: config.max_stream_window,
            send_initial: agent_window,
            budget: config.tunnel_window_budget,
        };
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

    fn register(
        &mut self,
        name: String,
        protocol: ServiceProtocol,
        remote_port: u16,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Some(session) = &self.session else { return };
        let limit = self.shared.config.max_services_per_tunnel;
        let refusal = if let Err(e) = self.scope.check_register(&name) {
            Some(e.to_string())
        } else if session.services.len() >= limit {
            Some(format!("tunnel is at its limit of {limit} services"))
        } else if protocol == ServiceProtocol::Udp
            && !session.features.contains(Features::DATAGRAMS)
        {
            Some(
                "udp services need the DATAGRAMS capability, which this agent did not offer"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.span
                .in_scope(|| tracing::warn!(service = %name, %reason, "registration refused"));
            return self.send(ctx, Message::register_fail(reason).ok());
        }
        let tunnel_id = session.tunnel_id;
        let registry = self.shared.registry.addr().clone();
        let host = self.shared.config.bind_host.clone();
        // `wait` holds later frames until this answer is sent: replies stay in order
        async move {
            let alloc = AllocatePort {
                tunnel_id,
                requested: remote_port,
            };
            let port = match registry.send(alloc).await.map_err(super::Error::from) {
                Ok(Ok(port)) => port,
                Ok(Err(e)) | Err(e) => return Err(e.to_string()),
            };
            let bound = match protocol {
                ServiceProtocol::Tcp => bind_with_retry(&host, port).await.map(Bound::Tcp),
                ServiceProtocol::Udp => UdpServiceListener::bind(&host, port).map(Bound::Udp),
            };
            match bound {
                Ok(bound) => Ok((port, bound)),
                Err(e) => {
                    registry.do_send(ReleasePort { tunnel_id, port });
                    Err(format!("cannot listen on {host}:{port}: {e}"))
                }
            }
        }
        .into_actor(self)
        .map(move |result: Result<_, String>, act, ctx| act.registered(name, result, ctx))
        .wait(ctx);
    }

    fn registered(
        &mut self,
        name: String,
        result: Result<(u16, Bound), String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let _span = self.span.enter();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let (port, bound) = match result {
            Ok(ok) => ok,
            Err(reason) => {
                tracing::warn!(service = %name, %reason, "registration refused");
                return self.send(ctx, Message::register_fail(reason).ok());
            }
        };
        let service_id = Uuid::new_v4();
        let counters = Arc::new(Counters::new());
        let cancel = session.cancel.child_token();
        let mut flows = None;
        let (listener, protocol) = match bound {
            Bound::Tcp(socket) => {
                let recipient = ctx.address().recipient();
                let addr = ServiceListener::start(socket, service_id, port, recipient, cancel);
                (Listener::Tcp(addr), ServiceProtocol::Tcp)
            }
            Bound::Udp(socket) => {
                let budget = Budget::default();
                let view = FlowView::default();
                flows = Some(view.clone());
                let wiring = UdpWiring {
                    service_id,
                    port,
                    limits: self.shared.config.flow_limits(),
                    channel: ctx.address().recipient(),
                    budget: budget.clone(),
                    counters: counters.clone(),
                    view,
                    cancel,
                };
                let addr = UdpServiceListener::start(socket, wiring);
                (Listener::Udp(addr, budget), ServiceProtocol::Udp)
            }
        };
        tracing::info!(service = %name, port, %protocol, "service registered");
        self.shared.registry.addr().do_send(ServiceRegistered {
            tunnel_id: session.tunnel_id,
            service: ServiceEntry {
                id: service_id,
                name: name.clone(),
                protocol,
                port,
            },
            counters: counters.clone(),
            flows,
        });
        session.services.insert(
            service_id,
            Service {
                name,
                port,
                listener,
                counters,
            },
        );
        self.send(
            ctx,
            Some(Message::RegisterOk {
                service_id,
                port: Some(port),
            }),
        );
    }

    fn unregister(&mut self, service_id: Uuid) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let Some(service) = session.services.remove(&service_id) else {
            return;
        };
        self.span.in_scope(
            || tracing::info!(service = %service.name, port = service.port, "service unregistered"),
        );
        service.listener.stop();
        let release = ReleasePort {
            tunnel_id: session.tunnel_id,
            port: service.port,
        };
        self.shared.registry.addr().do_send(release);
    }

    /// Opens a stream for a visitor: its connection actor starts reading up to the agent's window.
    fn open_stream(
        &mut self,
        service_id: Uuid,
        socket: tokio::net::TcpStream,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<Uuid, &'static str> {
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
            cancel: session.cancel.child_token(),
        };
        session
            .streams
            .attach(id, ForwardedConnection::start(socket, wiring));
        Ok(id)
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

/// Binds a public port, retrying briefly while a closing listener (takeover) still holds it.
async fn bind_with_retry(host: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let mut attempts = 0;
    loop {
        match ServiceListener::bind(host, port) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

fn now_millis() -> u64 {
    heartbeat_timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}
