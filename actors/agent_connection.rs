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

use super::flow_hub::FlowHub;
use super::forwarded_connection::{ForwardedConnection, StreamEvent, StreamWiring};
use super::handles::agent_view::{PublishedService, public_addr};
use super::handles::tunnel_agent::{AgentShared, AgentStopped};
use super::io::local_dial::{self, Dialing};
use super::io::read_gate::ReadGate;
use super::stream_hub::StreamHub;
use super::udp_flow::{FlowEvent, FlowWiring, UdpFlow};
use crate::accounting::{CounterSet, Direction};
use crate::backoff::Backoff;
use crate::config::ServiceConfig;
use crate::fair::FairQueue;
use crate::protocol::{
    CloseKind, DEFAULT_INITIAL_WINDOW, Features, MAX_MESSAGE_SIZE, Message, ServiceProtocol,
    frame_feature,
};
use crate::session::{AgentAction, AgentSession, LinkError};
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

/// Stops the agent for good (`TunnelAgent::stop`).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopAgent;

/// One WebSocket's state.
struct Link {
    generation: u64,
    sink: Option<WsSink>,
    /// The link's rules: auth, registrations, heartbeats.
    session: AgentSession,
    /// The armed timer of the session's next deadline.
    timer: Option<(Instant, SpawnHandle)>,
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
    server_window: u32,
    streams: StreamHub,
    flows: FlowHub,
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
    }
}

impl Supervised for AgentConnection {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.shared.view.disconnected();
        if let Some(mut link) = self.link.take() {
            link.streams.close_all();
            link.cancel.cancel();
            if link.session.was_authenticated() {
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
        let settings = config.session_settings(self.shared.client_id);
        self.link = Some(Link {
            generation: self.starts,
            sink: Some(sink),
            session: AgentSession::new(settings, Instant::now()),
            timer: None,
            control: VecDeque::new(),
            acks: Vec::new(),
            write_scheduled: false,
            data: FairQueue::default(),
            server_window: DEFAULT_INITIAL_WINDOW,
            streams: StreamHub::new(self.settings(DEFAULT_INITIAL_WINDOW)),
            flows: FlowHub::new(config.udp_waiting),
            cancel: CancellationToken::new(),
            since: Instant::now(),
            gate: ReadGate::new(config.read_ahead),
        });
        self.execute(ctx);
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
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Some(routed) = link.session.handle_frame(message, Instant::now()) {
            self.route(routed, ctx);
        }
        self.execute(ctx);
    }

    /// A data-plane frame the session passed: to its stream, flow or access stream.
    fn route(&mut self, message: Message, ctx: &mut Context<Self>) {
        match message {
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
            _ => {} // ConnectAck of an access stream: it is open both ways
        }
    }

    /// Carries out what the session decided, in order.
    fn execute(&mut self, ctx: &mut Context<Self>) {
        loop {
            let Some(action) = self.link.as_mut().and_then(|l| l.session.poll_action()) else {
                break;
            };
            match action {
                AgentAction::Send(message) => self.send(Some(message), ctx),
                AgentAction::Authenticated {
                    tunnel_id,
                    features,
                    server_window,
                } => self.authenticated(tunnel_id, features, server_window),
                AgentAction::NotRegistered { service, reason } => {
                    tracing::error!(service = %service.name, reason, "not registered")
                }
                AgentAction::Registered {
                    service_id,
                    service,
                    port,
                } => self.registered(service_id, &service, port),
                AgentAction::RegistrationRefused { service, reason } => {
                    self.register_failed(service, &reason, ctx)
                }
                AgentAction::Ready => self.connected(),
                AgentAction::OpenStream {
                    connection_id,
                    service_id,
                    service,
                    client_addr,
                } => self.on_connect(service_id, connection_id, &service, &client_addr, ctx),
                AgentAction::OpenFlow {
                    connection_id,
                    service_id,
                    service,
                    client_addr,
                } => self.open_flow(service_id, connection_id, &service, &client_addr, ctx),
                AgentAction::Close(error) => return self.link_ended(error, ctx),
            }
        }
        self.arm_timer(ctx);
    }

    /// Arms a timer for the session's next deadline, unless one as early is armed.
    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let Some(deadline) = link.session.next_deadline() else {
            return;
        };
        if link.timer.as_ref().is_some_and(|(at, _)| *at <= deadline) {
            return;
        }
        if let Some((_, handle)) = link.timer.take() {
            ctx.cancel_future(handle);
        }
        let generation = link.generation;
        let delay = deadline.saturating_duration_since(Instant::now());
        let handle = ctx.run_later(delay, move |act, ctx| {
            let Some(link) = act.link.as_mut().filter(|l| l.generation == generation) else {
                return;
            };
            link.timer = None;
            link.session.handle_timeout(Instant::now(), super::now_ms());
            act.execute(ctx);
        });
        link.timer = Some((deadline, handle));
    }

    fn authenticated(&mut self, tunnel_id: Uuid, features: Features, server_window: u32) {
        let settings = self.settings(server_window);
        let Some(link) = self.link.as_mut() else {
            return;
        };
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
            self.register(service);
        }
    }

    /// How the session ended: for good (a refused token), or to reconnect.
    fn link_ended(&mut self, error: LinkError, ctx: &mut Context<Self>) {
        match &error {
            LinkError::TokenRefused { reason } => {
                tracing::error!(%reason, "the server refused the token; stopping");
                return self.finish(Err(crate::TunnelError::auth(reason.clone())), ctx);
            }
            LinkError::AuthRefused { reason } => {
                tracing::warn!(%reason, "authentication refused; retrying")
            }
            LinkError::Disconnected { reason } => {
                tracing::info!(%reason, "server disconnected the agent")
            }
            LinkError::AuthTimeout => tracing::warn!("no answer to Auth in time; reconnecting"),
            LinkError::HeartbeatTimeout => tracing::warn!(
                "nothing heard from the server within the heartbeat timeout; reconnecting"
            ),
            LinkError::Protocol(violation) => {
                tracing::warn!(%violation, "protocol error by the server; reconnecting")
            }
        }
        self.drop_link(error.to_string(), ctx);
    }

    fn on_connect(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        service: &ServiceConfig,
        client_addr: &str,
        ctx: &mut Context<Self>,
    ) {
        match self.accept_stream(service_id, id, client_addr) {
            Ok(()) => {
                let credit = self.link.as_ref().map_or(0, |l| l.server_window);
                let (local, name) = (service.local_addr(), service.name.clone());
                self.dial(id, local, name, credit, ctx)
            }
            Err(reason) => {
                tracing::info!(stream = %id, visitor = %client_addr, reason, "connection refused");
                if let Some(link) = self.link.as_mut() {
                    link.session.refuse(id, reason);
                }
            }
        }
    }

    fn accept_stream(
        &mut self,
        service_id: Uuid,
        id: Uuid,
        client_addr: &str,
    ) -> Result<(), &'static str> {
        let link = self.link.as_mut().ok_or("no link")?;
        if !self.shared.admits(service_id, id, client_addr) {
            return Err("connection rejected by client");
        }
        link.streams
            .open(id)
            .map_err(|_| "agent is at its stream limit")
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
                link.session.refuse(id, &reason);
                return self.execute(ctx);
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
