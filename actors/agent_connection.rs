//! `AgentConnection`: the agent's link to its server, one WebSocket at a time
//! (awc; the only file that knows the agent's WebSocket crate).
//!
//! Owns the link: auth, registrations (answered first-in-first-out), heartbeats
//! both ways, and its streams (a `StreamHub` of `ForwardedConnection`s to the
//! local services). Runs under an actix `Supervisor`: any fault stops it, and
//! `restarting` + `started` reconnect after a backoff delay. What must survive
//! a reconnect lives in the struct (client id, backoff, ports assigned); what
//! belongs to one link lives in `Link` and is dropped with it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use awc::ws;
use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::agent_view::{PublishedService, public_addr};
use super::flow_hub::FlowHub;
use super::forwarded_connection::{ForwardedConnection, StreamEvent, StreamWiring};
use super::local_dial::{self, Dialing};
use super::read_gate::ReadGate;
use super::stream_hub::StreamHub;
use super::tunnel_agent::{AgentShared, AgentStopped};
use super::udp_flow::{FlowEvent, FlowWiring, UdpFlow};
use crate::accounting::{CounterSet, Direction};
use crate::backoff::Backoff;
use crate::config::ServiceConfig;
use crate::fair::FairQueue;
use crate::liveness::Liveness;
use crate::protocol::{
    Capabilities, CloseKind, DEFAULT_INITIAL_WINDOW, Features, MAX_MESSAGE_SIZE, Message,
    ServiceProtocol, frame_feature,
};
use crate::status::TunnelState;
use crate::streams::StreamSettings;

mod access;
mod services;
mod udp;
mod writer;

pub(crate) use access::OpenStream;

type WsSink = SplitSink<actix_codec::Framed<awc::BoxedSocket, ws::Codec>, ws::Message>;

/// Data bytes per write batch, so that a control frame waits for at most this much.
const MAX_BATCH: usize = 256 * 1024;

/// Features this agent offers.
const OFFERED: Features = Features::from_bits(
    Features::STREAMS.bits() | Features::DATAGRAMS.bits() | Features::ACCESS.bits(),
);

/// Stops the agent for good (`TunnelAgent::stop`).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopAgent;

/// One WebSocket session's state.
struct Link {
    generation: u64,
    sink: Option<WsSink>,
    /// Control frames (heartbeats, credit, answers) go before stream frames
    /// (`Data`, `Close`, kept in order), so they never wait behind windows of data.
    control: VecDeque<Bytes>,
    /// `ConnectAck`s: they leave with the next write, never on their own
    /// (the server forwards without waiting for them), so that a new
    /// stream's acknowledgment and its first reply share one write.
    acks: Vec<Bytes>,
    /// A `WriteOut` is on its way: frames queued until then leave together.
    write_scheduled: bool,
    /// Stream frames (`Data`, `Close`), round-robin across streams.
    data: FairQueue,
    /// Local sockets' bytes read and not yet encoded for the server (bounded;
    /// each read frame holds its ticket).
    gate: Arc<ReadGate>,
    features: Features,
    server_window: u32,
    authenticated: bool,
    streams: StreamHub,
    flows: FlowHub,
    services: HashMap<Uuid, ServiceConfig>,
    awaiting: VecDeque<ServiceConfig>,
    liveness: Liveness,
    cancel: CancellationToken,
    since: Instant,
}

/// The agent's connection actor.
pub(crate) struct AgentConnection {
    shared: Arc<AgentShared>,
    backoff: Backoff,
    starts: u64,
    finished: bool,
    assigned: HashMap<String, u16>,
    /// Retry delays of services whose registration the server refused.
    refused: HashMap<String, Backoff>,
    link: Option<Link>,
    outbox: Vec<Bytes>,
}

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.finished {
            return;
        }
        self.starts += 1;
        let delay = if self.starts == 1 {
            std::time::Duration::ZERO
        } else {
            self.backoff.next_delay(Uuid::new_v4().as_u64_pair().0)
        };
        if self.starts > 1 {
            self.shared.view.reconnecting(delay);
        }
        if !delay.is_zero() {
            tracing::info!(delay = %humantime::format_duration(delay), attempt = self.backoff.attempt(), "reconnecting after a delay");
        }
        // spawned, not awaited with `ctx.wait`: a StopAgent must not wait out
        // the backoff delay or the dial
        ctx.spawn(
            tokio::time::sleep(delay)
                .into_actor(self)
                .map(|(), act, ctx| act.connect(ctx)),
        );
        ctx.run_interval(self.shared.config.heartbeat_interval, |act, ctx| {
            act.tick(ctx)
        });
    }
}

impl Supervised for AgentConnection {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.shared.view.disconnected();
        if let Some(mut link) = self.link.take() {
            link.streams.close_all();
            link.cancel.cancel();
            if link.authenticated {
                self.backoff.connection_ended(link.since.elapsed());
            }
        }
    }
}

impl Handler<StopAgent> for AgentConnection {
    type Result = ();

    fn handle(&mut self, _: StopAgent, ctx: &mut Self::Context) {
        tracing::info!("agent stopping");
        self.finished = true;
        let Some(mut sink) = self.link.as_mut().and_then(|l| l.sink.take()) else {
            return self.finish(Ok(()), ctx);
        };
        // a polite WebSocket close, bounded so that stopping stays prompt
        let close = async move {
            let bye = ws::Message::Close(Some(ws::CloseCode::Normal.into()));
            let polite = async { sink.send(bye).await.and(sink.close().await) };
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), polite).await;
        };
        ctx.wait(
            close
                .into_actor(self)
                .map(|(), act, ctx| act.finish(Ok(()), ctx)),
        );
    }
}

impl Handler<StreamEvent> for AgentConnection {
    type Result = ();

    fn handle(&mut self, event: StreamEvent, ctx: &mut Self::Context) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let mut outbox = std::mem::take(&mut self.outbox);
        link.streams.on_event(event, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }
}

impl StreamHandler<Result<ws::Frame, actix_http::ws::ProtocolError>> for AgentConnection {
    fn handle(
        &mut self,
        item: Result<ws::Frame, actix_http::ws::ProtocolError>,
        ctx: &mut Self::Context,
    ) {
        if let Some(link) = self.link.as_mut() {
            link.liveness.seen(Instant::now());
        }
        match item {
            Ok(ws::Frame::Binary(frame)) => self.on_frame(frame, ctx),
            Ok(ws::Frame::Ping(p)) => self.queue_raw(ws::Message::Pong(p), ctx),
            Ok(ws::Frame::Close(reason)) => {
                tracing::info!(?reason, "server closed the connection");
                self.drop_link(format!("server closed the connection ({reason:?})"), ctx);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "websocket error; reconnecting");
                self.drop_link(format!("websocket error: {e}"), ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if !self.finished {
            tracing::info!("connection to the server lost; reconnecting");
        }
        self.drop_link("connection to the server lost", ctx);
    }
}

impl AgentConnection {
    pub(crate) fn new(shared: Arc<AgentShared>) -> Self {
        let c = &shared.config;
        let backoff = Backoff::new(
            c.reconnect_interval,
            c.max_reconnect_interval,
            c.stable_after,
        );
        Self {
            shared,
            backoff,
            starts: 0,
            finished: false,
            assigned: HashMap::new(),
            refused: HashMap::new(),
            link: None,
            outbox: Vec::new(),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let config = &self.shared.config;
        let (url, timeout) = (config.server_url.clone(), config.connect_timeout);
        let client = self.shared.client();
        let dial = async move {
            let request = client.ws(url).max_frame_size(MAX_MESSAGE_SIZE);
            match tokio::time::timeout(timeout, request.connect()).await {
                Ok(Ok((_, framed))) => Ok(framed),
                Ok(Err(e)) => Err(describe_refusal(&e)),
                Err(_) => Err("timed out".to_owned()),
            }
        };
        ctx.spawn(dial.into_actor(self).map(|result, act, ctx| match result {
            _ if act.finished => {}
            Ok(framed) => act.linked(framed, ctx),
            Err(error) if error.contains("certificate") => {
                let hint = "give ca_cert (--ca-cert): the CA that signed it, or the server's own certificate";
                tracing::error!(server = %act.shared.config.server_url, %error, hint, "the server's certificate is not trusted; not connecting");
                act.drop_link(format!("the server's certificate is not trusted: {error}"), ctx);
            }
            Err(error) => {
                tracing::warn!(server = %act.shared.config.server_url, %error, "cannot reach the server");
                act.drop_link(format!("cannot reach the server: {error}"), ctx);
            }
        }));
    }

    fn linked(
        &mut self,
        framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
        ctx: &mut Context<Self>,
    ) {
        let (sink, stream) = framed.split();
        ctx.add_stream(stream);
        let config = &self.shared.config;
        self.link = Some(Link {
            generation: self.starts,
            sink: Some(sink),
            control: VecDeque::new(),
            acks: Vec::new(),
            write_scheduled: false,
            data: FairQueue::default(),
            features: Features::NONE,
            server_window: DEFAULT_INITIAL_WINDOW,
            authenticated: false,
            streams: StreamHub::new(self.settings(DEFAULT_INITIAL_WINDOW)),
            flows: FlowHub::new(config.udp_waiting),
            services: HashMap::new(),
            awaiting: VecDeque::new(),
            liveness: Liveness::new(Instant::now(), config.heartbeat_timeout),
            cancel: CancellationToken::new(),
            since: Instant::now(),
            gate: ReadGate::new(config.read_ahead),
        });
        let caps = Capabilities {
            features: OFFERED,
            initial_window: config.stream_window,
        };
        let auth = Message::auth(config.token.clone(), self.shared.client_id, Some(caps));
        let deadline = config.connect_timeout;
        self.send(auth.ok(), ctx);
        ctx.run_later(deadline, |act, ctx| {
            if act.link.as_ref().is_some_and(|l| !l.authenticated) {
                tracing::warn!("no answer to Auth in time; reconnecting");
                act.drop_link("no answer to Auth in time", ctx);
            }
        });
    }

    fn settings(&self, server_window: u32) -> StreamSettings {
        self.shared.config.stream_settings(server_window)
    }

    fn on_frame(&mut self, frame: Bytes, ctx: &mut Context<Self>) {
        let message = match Message::decode_bytes(&frame) {
            Ok((message, _)) => message,
            Err(e) => {
                tracing::warn!(error = %e, "bad frame from the server; reconnecting");
                return self.drop_link(format!("bad frame from the server: {e}"), ctx);
            }
        };
        match message {
            Message::AuthOk {
                tunnel_id,
                capabilities,
            } => self.authenticated(tunnel_id, capabilities, ctx),
            Message::AuthFail { reason, .. } => self.auth_failed(reason, ctx),
            Message::RegisterOk { port, .. } => {
                self.registered(message_service(&message), port, ctx)
            }
            Message::RegisterFail { reason, .. } => self.register_failed(reason, ctx),
            Message::Heartbeat { timestamp } => {
                self.send(Some(Message::HeartbeatAck { timestamp }), ctx)
            }
            Message::HeartbeatAck { .. } => {}
            Message::Connect {
                service_id,
                connection_id,
                client_addr,
                ..
            } => {
                self.on_connect(service_id, connection_id, client_addr, ctx);
            }
            Message::Open {
                connection_id,
                service,
                target,
            } => self.on_open(connection_id, &service, &target, ctx),
            Message::ConnectFail {
                connection_id,
                reason,
                ..
            } => {
                tracing::warn!(stream = %connection_id, %reason, "access stream refused");
                if let Some(link) = self.link.as_mut() {
                    link.streams.refuse(connection_id);
                }
            }
            Message::ConnectAck { .. } => {}
            Message::Disconnect { reason, .. } => {
                tracing::info!(%reason, "server disconnected the agent");
                self.drop_link(format!("server disconnected the agent: {reason}"), ctx);
            }
            Message::Datagram {
                connection_id,
                data,
            } => {
                if let Some(link) = self.link.as_ref()
                    && !link.flows.deliver(connection_id, data)
                {
                    self.shared.counters.add_drop(); // a race after the flow ended
                }
            }
            m @ (Message::Data { .. } | Message::Window { .. } | Message::Close { .. }) => {
                self.on_stream_frame(m, ctx)
            }
            other => tracing::debug!(kind = ?other.message_type(), "ignored"),
        }
    }

    fn authenticated(
        &mut self,
        tunnel_id: Uuid,
        caps: Option<Capabilities>,
        ctx: &mut Context<Self>,
    ) {
        let features = caps.map_or(Features::NONE, |c| c.features);
        let server_window = caps.map_or(DEFAULT_INITIAL_WINDOW, |c| c.initial_window);
        let settings = self.settings(server_window);
        let Some(link) = self.link.as_mut() else {
            return;
        };
        link.authenticated = true;
        link.features = features;
        link.server_window = server_window;
        link.streams = StreamHub::new(settings);
        self.shared.view.connected(tunnel_id);
        tracing::info!(%tunnel_id, ?features, "authenticated");
        if !features.contains(Features::STREAMS) {
            tracing::warn!("the server has no data plane (legacy): visitors cannot be forwarded");
        }
        if self.shared.config.services.is_empty() {
            self.connected();
        }
        for service in self.shared.config.services.clone() {
            if service.protocol == ServiceProtocol::Udp && !features.contains(Features::DATAGRAMS) {
                tracing::error!(service = %service.name, "the server does not carry UDP (no DATAGRAMS capability); not registered");
                continue;
            }
            self.register(service, ctx);
        }
    }

    fn auth_failed(&mut self, reason: String, ctx: &mut Context<Self>) {
        if reason.to_ascii_lowercase().contains("token") {
            tracing::error!(%reason, "the server refused the token; stopping");
            return self.finish(Err(crate::TunnelError::auth(reason)), ctx);
        }
        tracing::warn!(%reason, "authentication refused; retrying");
        self.drop_link(format!("authentication refused: {reason}"), ctx);
    }

    fn on_connect(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        client_addr: String,
        ctx: &mut Context<Self>,
    ) {
        let udp = self.link.as_ref().and_then(|l| l.services.get(&service_id));
        if udp.is_some_and(|s| s.protocol == ServiceProtocol::Udp) {
            return self.open_flow(service_id, id, &client_addr, ctx);
        }
        match self.accept_stream(service_id, id, &client_addr) {
            Ok((local, name)) => {
                let credit = self.link.as_ref().map_or(0, |l| l.server_window);
                self.dial(id, local, name, credit, ctx)
            }
            Err(reason) => {
                tracing::info!(stream = %id, visitor = %client_addr, reason, "connection refused");
                self.send(Message::connect_fail(id, reason).ok(), ctx);
            }
        }
    }

    fn accept_stream(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        client_addr: &str,
    ) -> Result<(String, String), &'static str> {
        let link = self.link.as_mut().ok_or("no link")?;
        let service = link.services.get(&service_id).ok_or("unknown service")?;
        if !link.features.contains(Features::STREAMS) {
            return Err("the server has no data plane");
        }
        if !self.shared.admits(service_id, id, client_addr) {
            return Err("connection rejected by client");
        }
        let (local, name) = (service.local_addr(), service.name.clone());
        link.streams
            .open(id)
            .map_err(|_| "agent is at its stream limit")?;
        Ok((local, name))
    }

    /// Dials `local` for stream `id`; `credit` is what the stream may send before a `Window`.
    fn dial(
        &mut self,
        id: Uuid,
        local: String,
        service: String,
        credit: u32,
        ctx: &mut Context<Self>,
    ) {
        let timeout = self.shared.config.local_connect_timeout;
        let generation = self.link.as_ref().map_or(0, |l| l.generation);
        let unreachable = |local: &str, e| format!("local service {local} unreachable: {e}");
        let connecting = match local_dial::dial(&local) {
            Dialing::Done(result) => {
                let result = result.map_err(|e| unreachable(&local, e));
                return self.dialed(id, &service, (generation, credit), result, ctx);
            }
            Dialing::Later(connecting) => connecting,
        };
        let dial = async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(|e| unreachable(&local, e)),
                Err(_) => Err(format!("local service {local} did not answer in time")),
            }
        };
        ctx.spawn(dial.into_actor(self).map(move |result, act, ctx| {
            act.dialed(id, &service, (generation, credit), result, ctx)
        }));
    }

    fn dialed(
        &mut self,
        id: Uuid,
        service: &str,
        (generation, credit): (u64, u32),
        result: Result<tokio::net::TcpStream, String>,
        ctx: &mut Context<Self>,
    ) {
        let Some(link) = self.link.as_mut().filter(|l| l.generation == generation) else {
            return;
        };
        let socket = match result {
            Ok(socket) => socket,
            Err(reason) => {
                tracing::info!(stream = %id, %reason, "connection refused");
                link.streams.refuse(id);
                return self.send(Message::connect_fail(id, reason).ok(), ctx);
            }
        };
        let wiring = StreamWiring {
            id,
            channel: ctx.address().recipient(),
            initial_credit: credit,
            counters: CounterSet::new(
                std::iter::once(self.shared.counters.clone())
                    .chain(self.shared.view.counters(service))
                    .collect(),
            ),
            read_direction: Direction::Out,
            cancel: None,
            gate: link.gate.clone(),
            tuned: false,
        };
        if link
            .streams
            .attach(id, ForwardedConnection::start(socket, wiring))
        {
            link.acks
                .push(Message::ConnectAck { connection_id: id }.to_bytes());
        }
    }

    fn on_stream_frame(&mut self, message: Message, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Message::Close { connection_id, .. } = &message
            && link.flows.close(*connection_id)
        {
            return;
        }
        let mut outbox = std::mem::take(&mut self.outbox);
        link.streams.on_frame(message, &mut |m| outbox.push(m));
        self.flush(outbox, ctx);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_ref().filter(|l| l.authenticated) else {
            return;
        };
        if link.liveness.is_expired(Instant::now()) {
            tracing::warn!(
                "nothing heard from the server within the heartbeat timeout; reconnecting"
            );
            return self.drop_link(
                "nothing heard from the server within the heartbeat timeout",
                ctx,
            );
        }
        let timestamp = crate::liveness::heartbeat_timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.send(Some(Message::Heartbeat { timestamp }), ctx);
    }

    /// Ends this link for `error` (the status reports it); the supervisor
    /// reconnects after a backoff delay.
    fn drop_link(&mut self, error: impl Into<String>, ctx: &mut Context<Self>) {
        self.shared.view.link_failed(error);
        ctx.stop();
    }

    fn finish(&mut self, result: crate::Result<()>, ctx: &mut Context<Self>) {
        self.finished = true;
        self.shared.view.disconnected();
        self.shared.view.set_state(match &result {
            Ok(()) => TunnelState::Stopped,
            Err(e) => TunnelState::Failed {
                error: e.to_string(),
            },
        });
        self.shared.done(AgentStopped(result));
        ctx.stop();
    }
}

fn message_service(message: &Message) -> Uuid {
    match message {
        Message::RegisterOk { service_id, .. } => *service_id,
        _ => Uuid::nil(),
    }
}

/// What went wrong with a WebSocket upgrade, for the log and the status: a
/// refusal says what the server's status means (awc's own text leaves the
/// status out).
fn describe_refusal(error: &awc::error::WsClientError) -> String {
    use awc::error::WsClientError;
    use awc::http::StatusCode;
    match error {
        WsClientError::InvalidResponseStatus(StatusCode::SERVICE_UNAVAILABLE) => {
            "the server answered 503 Service Unavailable (busy: a zlayer-tunnel server says so \
             when too many connections await authentication); retrying"
                .to_owned()
        }
        WsClientError::InvalidResponseStatus(StatusCode::NOT_FOUND) => {
            "the server has no tunnel endpoint at this URL's path (404)".to_owned()
        }
        WsClientError::InvalidResponseStatus(status) => {
            format!("the server answered {status} instead of a WebSocket upgrade")
        }
        other => other.to_string(),
    }
}
