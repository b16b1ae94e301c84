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
use super::handles::control_handler::{AuthPlace, EVICTED, ServerShared};
use super::io::read_gate::ReadGate;
use super::io::stream_hub::StreamHub;
use super::now_ms;
use super::registry::{
    AllocatePort, CloseTunnel, FindService, FlowView, OpenTunnel, PortGrant, PublicListener,
    ReleasePort, ReportAlive, ServiceEntry, ServiceHealthChanged, ServiceRegistered, TunnelClosed,
};
use super::service_listener::{
    ACCEPTED_SOCKETS_TUNED, JoinReplica, LeaveReplica, Replica, ReplicaHealth, ServiceListener,
    VisitorArrived,
};
use super::udp_listener::{
    ForgetFlow, JoinUdpReplica, LeaveUdpReplica, SendToVisitor, UdpEvent, UdpReplica,
    UdpServiceListener, UdpSettings,
};
use crate::accounting::{CounterSet, Counters, Direction, DropKind};
use crate::auth::{TokenScope, hash_token};
use crate::budget::Budget;
use crate::connections::ConnectionAction;
use crate::log_limit::RemoteEvent;
use crate::outbound::Outbound;
use crate::protocol::{
    AuthRefusal, Features, Message, MessageType, RegisterRefusal, ServiceProtocol,
};
use crate::session::{
    CloseReason, ProtocolViolation, Registration, ServerAction, ServerSession, TokenRefusal,
    check_token,
};

mod access;
mod auth;
mod cluster;
mod relay;
mod services;
mod streams;
mod udp;
mod writer;

use relay::Relays;
pub(crate) use relay::{Relay, RelayEnd};

/// A registered service of this tunnel.
struct Service {
    name: String,
    port: u16,
    listener: Listener,
    counters: Arc<Counters>,
    /// Its bandwidth limit: visitors' sockets read no faster.
    bandwidth: Option<crate::actors::forwarded_connection::SharedBandwidth>,
}

/// The public side of a service.
enum Listener {
    Tcp(Addr<ServiceListener>),
    Udp(Addr<UdpServiceListener>, Budget),
}

/// The public side of a service being registered: a socket of its own, or
/// the listener of the service it joins as a replica.
enum Bound {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
    TcpReplica(Addr<ServiceListener>),
    UdpReplica(Addr<UdpServiceListener>),
}

/// A UDP flow of this tunnel: where the agent's datagrams for it go.
struct Flow {
    listener: Addr<UdpServiceListener>,
    budget: Budget,
    /// The service's counters (a datagram over the budget is a counted drop).
    counters: Arc<Counters>,
}

/// What the server's end of an authenticated link holds beside its session
/// (the agent's end has its own `Link`): the tunnel's listeners, stream
/// sockets, flows' listeners and relay recipients.
struct Link {
    tunnel_id: Uuid,
    /// The agent whose link this is (`replicas::agent_of` its client id).
    agent: Uuid,
    cancel: CancellationToken,
    services: HashMap<Uuid, Service>,
    streams: StreamHub,
    flows: HashMap<Uuid, Flow>,
    relays: Relays,
    counters: Arc<Counters>,
    /// Visitors' bytes read and not yet handed to the WebSocket (bounded).
    gate: Arc<ReadGate>,
}

/// The control channel actor.
pub(crate) struct ControlChannel {
    shared: Arc<ServerShared>,
    /// The server's settings when the channel started (a reload applies to
    /// the channels that start after it).
    config: Arc<crate::config::TunnelServerConfig>,
    peer: SocketAddr,
    /// The link's rules: auth, negotiation, registrations, heartbeats.
    core: ServerSession,
    /// Set once the agent is authenticated.
    link: Option<Link>,
    /// The armed timer of the core's next deadline.
    timer: Option<(Instant, SpawnHandle)>,
    counters: Arc<Counters>,
    /// Its place among the connections awaiting authentication, until it
    /// authenticates.
    place: Option<AuthPlace>,
    /// Bytes of relayed datagrams on their way to this channel (bounded).
    relay_inbox: Budget,
    span: tracing::Span,
}

impl Actor for ControlChannel {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.arm_timer(ctx);
        if let Some(place) = &self.place {
            ctx.spawn(place.evicted().into_actor(self).map(|(), act, ctx| {
                act.on_evicted(ctx);
            }));
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.place = None;
        let Some(mut tunnel) = self.link.take() else {
            return;
        };
        let _span = self.span.enter();
        tracing::info!(
            services = tunnel.services.len(),
            streams = self.core.streams(),
            "agent disconnected"
        );
        self.core.close_connections(); // flows end with the tunnel's listeners
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
        let config = shared.config.current();
        let core = ServerSession::new(config.session_settings(), Instant::now());
        let relay_inbox = Budget::new(config.udp_in_flight);
        Self {
            shared,
            config,
            peer,
            core,
            link: None,
            timer: None,
            counters: Arc::new(Counters::new()),
            place: Some(place),
            relay_inbox,
            span: tracing::info_span!("control", %peer, tunnel_id = tracing::field::Empty),
        }
    }

    fn on_frame(&mut self, frame: Bytes, ctx: &mut ws::WebsocketContext<Self>) {
        self.core.handle_bytes(frame, Instant::now());
        self.execute(ctx);
    }

    /// Carries out what the session decided, in order.
    fn execute(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        while let Some(action) = self.core.poll_action() {
            match action {
                ServerAction::Send(message) => self.write(message, ctx),
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
                ServerAction::Write(frame) => self.write(frame, ctx),
                ServerAction::VisitorRefused { id, reason } => self.visitor_refused(id, &reason),
                ServerAction::ServiceHealth {
                    service_id,
                    healthy,
                } => self.service_health(service_id, healthy),
                ServerAction::Socket(action) => self.on_socket_action(action),
                ServerAction::Relay {
                    id,
                    kind,
                    close,
                    frame,
                    last,
                } => {
                    if let Some(tunnel) = self.link.as_mut()
                        && !tunnel.relays.pass(id, kind, close, frame, last)
                    {
                        tunnel.counters.add_drop(DropKind::OverBudget);
                    }
                }
                ServerAction::FindService {
                    id,
                    service,
                    target,
                    protocol,
                    visitor,
                    probe,
                } => self.find_service(id, (service, target, visitor), (protocol, probe), ctx),
                ServerAction::Close(reason) => return self.close(&reason, ctx),
            }
        }
        self.arm_timer(ctx);
    }

    /// Its place was taken for a newer connection: unless it authenticated
    /// meanwhile, it ends, told to try again.
    fn on_evicted(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.place.is_none() {
            return;
        }
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::Again,
            description: Some(EVICTED.to_owned()),
        }));
        ctx.stop();
    }

    /// Ends the session: the WebSocket's close code says why.
    fn close(&mut self, reason: &CloseReason, ctx: &mut ws::WebsocketContext<Self>) {
        let code = match reason {
            CloseReason::AuthTimeout | CloseReason::AuthRefused => ws::CloseCode::Policy,
            CloseReason::HeartbeatTimeout => ws::CloseCode::Away,
            CloseReason::Protocol(_) => ws::CloseCode::Protocol,
            CloseReason::Closed(_) => ws::CloseCode::Normal,
        };
        let remote = match reason {
            CloseReason::AuthTimeout => Some(RemoteEvent::AuthTimeout),
            CloseReason::Protocol(_) => Some(RemoteEvent::ProtocolError),
            _ => None,
        };
        // what any connection can cause is logged once a second, counted
        let held_back = match remote {
            Some(event) => self.shared.remote_event(event),
            None => Some(0),
        };
        let _span = self.span.enter();
        match (reason, held_back) {
            (_, None) | (CloseReason::AuthRefused | CloseReason::Closed(_), _) => {}
            (CloseReason::AuthTimeout, Some(held_back)) => {
                tracing::warn!(held_back, "no authentication before the deadline; closing")
            }
            (CloseReason::HeartbeatTimeout, _) => {
                tracing::warn!("heartbeat timeout; dropping the agent")
            }
            (CloseReason::Protocol(violation), Some(held_back)) => {
                tracing::warn!(reason = %violation, held_back, "protocol error; closing the session")
            }
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
}
