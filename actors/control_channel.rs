//! `ControlChannel`: one per agent WebSocket (actix-web-actors; the only file
//! that knows the server's WebSocket crate).
//!
//! Owns the session's auth state, heartbeat timer and registered services.
//! Receives WebSocket frames and `CloseTunnel`; sends `OpenTunnel`,
//! `AllocatePort`, `ReleasePort`, `ReportAlive` and `TunnelClosed` to the
//! registry. Lifecycle: closed at `auth_timeout` if the agent has not
//! authenticated; after `AuthOk` a `Heartbeat` at once and every interval;
//! stopped when the agent is silent for `heartbeat_timeout`, when the socket
//! ends, or when the registry closes it. Stopping releases everything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use actix_web_actors::ws;
use bytes::Bytes;
use uuid::Uuid;

use super::control_handler::ServerShared;
use super::registry::{
    AllocatePort, CloseTunnel, OpenTunnel, ReleasePort, ReportAlive, TunnelClosed,
};
use crate::auth::hash_token;
use crate::liveness::{Liveness, heartbeat_timestamp};
use crate::protocol::{Capabilities, Features, Message, ServiceProtocol};

/// Features this server accepts (the data plane lands them one by one).
const SUPPORTED: Features = Features::NONE;

/// A registered service of this tunnel.
struct Service {
    name: String,
    port: u16,
}

/// The authenticated part of a session.
struct Session {
    tunnel_id: Uuid,
    features: Features,
    services: HashMap<Uuid, Service>,
}

/// The control channel actor.
pub(crate) struct ControlChannel {
    shared: Arc<ServerShared>,
    peer: SocketAddr,
    session: Option<Session>,
    liveness: Liveness,
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
        if let Some(session) = &self.session {
            let _span = self.span.enter();
            tracing::info!(services = session.services.len(), "agent disconnected");
            self.shared.registry.addr().do_send(TunnelClosed {
                tunnel_id: session.tunnel_id,
            });
        }
    }
}

impl Handler<CloseTunnel> for ControlChannel {
    type Result = ();

    fn handle(&mut self, msg: CloseTunnel, ctx: &mut Self::Context) {
        let _span = self.span.enter();
        tracing::info!(reason = %msg.reason, "closing session");
        self.session = None; // the registry already forgot it
        self.send(ctx, Message::disconnect(msg.reason).ok());
        ctx.close(Some(ws::CloseCode::Normal.into()));
        ctx.stop();
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
                    .in_scope(|| tracing::warn!(error = %e, "websocket error; closing"));
                ctx.stop();
            }
        }
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
            (true, message) => self.on_session_message(message, ctx),
        }
    }

    fn on_session_message(&mut self, message: Message, ctx: &mut ws::WebsocketContext<Self>) {
        match message {
            Message::HeartbeatAck { .. } => self.liveness.seen(Instant::now()),
            Message::Heartbeat { timestamp } => {
                self.send(ctx, Some(Message::HeartbeatAck { timestamp }));
            }
            Message::Register {
                name,
                protocol,
                local_port: _,
                remote_port,
                ..
            } => {
                self.register(name, protocol, remote_port, ctx);
            }
            Message::Unregister { service_id } => self.unregister(service_id),
            other => self.protocol_error(ctx, &format!("unexpected {:?}", other.message_type())),
        }
    }

    fn authenticate(
        &mut self,
        token: &str,
        client_id: Uuid,
        offer: Option<Capabilities>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if let Err(e) = (self.shared.validator)(token) {
            self.span
                .in_scope(|| tracing::warn!(reason = %e, "authentication refused"));
            return self.refuse_auth(&e.to_string(), ctx);
        }
        let open = OpenTunnel {
            token_hash: hash_token(token),
            client_id,
            peer: self.peer,
            channel: ctx.address().recipient(),
            timeout: self.shared.config.heartbeat_timeout + self.shared.config.heartbeat_interval,
            max_tunnels: self.shared.config.max_tunnels,
        };
        let answer =
            offer.map(|o| Capabilities::accept(o, SUPPORTED, self.shared.config.stream_window));
        self.shared
            .registry
            .addr()
            .send(open)
            .into_actor(self)
            .map(
                move |result, act, ctx| match result.map_err(super::Error::from).and_then(|r| r) {
                    Ok(tunnel_id) => act.accepted(tunnel_id, answer, ctx),
                    Err(e) => act.refuse_auth(&e.to_string(), ctx),
                },
            )
            .wait(ctx);
    }

    fn accepted(
        &mut self,
        tunnel_id: Uuid,
        caps: Option<Capabilities>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.span
            .record("tunnel_id", tracing::field::display(tunnel_id));
        let features = caps.map_or(Features::NONE, |c| c.features);
        self.span
            .in_scope(|| tracing::info!(?features, "agent authenticated"));
        self.session = Some(Session {
            tunnel_id,
            features,
            services: HashMap::new(),
        });
        self.liveness.seen(Instant::now());
        self.send(
            ctx,
            Some(Message::AuthOk {
                tunnel_id,
                capabilities: caps,
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
        if session.services.len() >= self.shared.config.max_services_per_tunnel {
            let reason = format!(
                "tunnel is at its limit of {} services",
                self.shared.config.max_services_per_tunnel
            );
            self.span
                .in_scope(|| tracing::warn!(service = %name, %reason, "registration refused"));
            return self.send(ctx, Message::register_fail(reason).ok());
        }
        let alloc = AllocatePort {
            tunnel_id: session.tunnel_id,
            requested: remote_port,
        };
        // `wait` holds later frames until this answer is sent: replies stay in order
        self.shared
            .registry
            .addr()
            .send(alloc)
            .into_actor(self)
            .map(move |result, act, ctx| {
                let result = result.map_err(super::Error::from).and_then(|r| r);
                act.registered(name, protocol, result, ctx);
            })
            .wait(ctx);
    }

    fn registered(
        &mut self,
        name: String,
        protocol: ServiceProtocol,
        result: Result<u16, super::Error>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let _span = self.span.enter();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match result {
            Ok(port) => {
                let service_id = Uuid::new_v4();
                tracing::info!(service = %name, %protocol, port, "service registered");
                session.services.insert(service_id, Service { name, port });
                self.send(
                    ctx,
                    Some(Message::RegisterOk {
                        service_id,
                        port: Some(port),
                    }),
                );
            }
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "registration refused");
                self.send(ctx, Message::register_fail(e.to_string()).ok());
            }
        }
    }

    fn unregister(&mut self, service_id: Uuid) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if let Some(service) = session.services.remove(&service_id) {
            self.span.in_scope(|| tracing::info!(service = %service.name, port = service.port, "service unregistered"));
            self.shared.registry.addr().do_send(ReleasePort {
                tunnel_id: session.tunnel_id,
                port: service.port,
            });
        }
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

    /// Sends one frame per WebSocket message; never a type the peer did not announce.
    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, message: Option<Message>) {
        let Some(message) = message else { return };
        let features = self.session.as_ref().map_or(Features::NONE, |s| s.features);
        if !features.contains(message.message_type().required_feature()) {
            tracing::debug!(kind = ?message.message_type(), "not sent: the peer did not announce it");
            return;
        }
        ctx.binary(message.to_bytes());
    }
}

fn now_millis() -> u64 {
    heartbeat_timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}
