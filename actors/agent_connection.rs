//! `AgentConnection`: the agent's link to its server, one WebSocket at a time
//! (awc; the only file that knows the agent's WebSocket crate).
//!
//! Owns the link: auth, registrations (answered first-in-first-out), heartbeats
//! both ways, and its streams (a `StreamHub` of `ForwardedConnection`s to the
//! local services). Runs under an actix `Supervisor`: any fault stops it, and
//! `restarting` + `started` reconnect after a backoff delay. What must survive
//! a reconnect lives in the struct (client id, backoff, ports assigned); what
//! belongs to one link lives in `Link` and is dropped with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use awc::ws;
use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::forwarded_connection::{ForwardedConnection, StreamEvent, StreamWiring};
use super::handles::agent_shared::{AgentShared, AgentStopped};
use super::handles::agent_view::{PublishedService, public_addr};
use super::io::local_dial::{self, Dialing};
use super::io::read_gate::ReadGate;
use super::io::stream_hub::StreamHub;
use super::udp_flow::{FlowEvent, FlowWiring, UdpFlow};
use crate::accounting::{CounterSet, Direction, DropKind};
use crate::backoff::Backoff;
use crate::config::ServiceConfig;
use crate::connections::ConnectionAction;
use crate::outbound::{FrameQueue, Outbound, PushError};
use crate::protocol::{Features, MAX_MESSAGE_SIZE};
use crate::session::{AgentAction, AgentSession, LinkError};
use crate::status::TunnelState;

mod access;
mod flow_hub;
mod health;
mod link;
mod services;
mod streams;
mod udp;
mod writer;

use flow_hub::{FlowEnd, FlowHub};

pub(crate) use access::{OpenStream, ProbeService};
pub(crate) use services::{AddService, RemoveService};
pub(crate) use udp::OpenFlow;

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
    /// What waits for the WebSocket: control frames first, deferred
    /// `ConnectAck`s, then stream frames round-robin across streams.
    queue: FrameQueue,
    /// A `WriteOut` is on its way: frames queued until then leave together.
    write_scheduled: bool,
    /// Local sockets' bytes read and not yet encoded for the server (bounded;
    /// each read frame holds its ticket).
    gate: Arc<ReadGate>,
    streams: StreamHub,
    flows: FlowHub,
    cancel: CancellationToken,
    since: Instant,
    /// The health checks of its services, by service id.
    health: HashMap<Uuid, (String, crate::health::HealthState)>,
    /// Who awaits each probe's answer (as many as the session keeps).
    probes: HashMap<Uuid, tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// The agent's connection actor.
pub(crate) struct AgentConnection {
    shared: Arc<AgentShared>,
    backoff: Backoff,
    starts: u64,
    finished: bool,
    /// Retry delays of services whose registration the server refused,
    /// and the lasting reason last said for each.
    refused: HashMap<String, (Backoff, Option<String>)>,
    link: Option<Link>,
    /// The lasting fault last said (at ERROR), not said again until it changes.
    told: Option<String>,
    /// The log of datagrams dropped on their way to the server.
    drop_log: crate::log_limit::LogGate,
    /// The log of access connections closed before their stream opened.
    access_log: crate::log_limit::LogGate,
}

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.finished {
            // stopped for good: a restart (the link failed just as a
            // StopAgent began its polite close, whose future the restart
            // dropped) must still let `run()` return
            return self.report_end(Ok(()));
        }
        self.starts += 1;
        let jitter = Uuid::new_v4().as_u64_pair().0;
        let permanent = self.shared.view.permanent_failure();
        let delay = match (self.starts, &permanent) {
            (1, _) => std::time::Duration::ZERO,
            (_, Some(_)) => self.backoff.next_delay_at_max(jitter),
            (_, None) => self.backoff.next_delay(jitter),
        };
        if self.starts > 1 {
            self.shared.view.reconnecting(delay);
        }
        let retry_in = humantime::format_duration(delay);
        match permanent {
            // said once: each later attempt fails the same way until it is fixed
            Some(error) if self.told.as_ref() != Some(&error) => {
                tracing::error!(%error, %retry_in, "retrying soon cannot fix this: retrying at the longest delay until it is fixed");
                self.told = Some(error);
            }
            Some(_) => tracing::debug!(%retry_in, "retrying after a lasting fault"),
            None if !delay.is_zero() => {
                self.told = None;
                tracing::info!(%retry_in, attempt = self.backoff.attempt(), "reconnecting after a delay");
            }
            None => {}
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
            link.flows.close_all();
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
                let reason = closed_because(reason.as_ref());
                tracing::info!(%reason, "server closed the connection");
                self.drop_link(format!("server closed the connection ({reason})"), ctx);
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
            refused: HashMap::new(),
            drop_log: Default::default(),
            access_log: Default::default(),
            link: None,
            told: None,
        }
    }

    fn on_frame(&mut self, frame: Bytes, ctx: &mut Context<Self>) {
        if let Some(link) = self.link.as_mut() {
            link.session.handle_bytes(&frame, Instant::now());
        }
        self.execute(ctx);
    }

    /// Carries out what the session decided, in order.
    fn execute(&mut self, ctx: &mut Context<Self>) {
        loop {
            let Some(action) = self.link.as_mut().and_then(|l| l.session.poll_action()) else {
                break;
            };
            match action {
                AgentAction::Send(message) => self.write(message, ctx),
                AgentAction::Authenticated {
                    tunnel_id,
                    features,
                    ..
                } => self.authenticated(tunnel_id, features, ctx),
                AgentAction::NotRegistered { service, reason } => {
                    tracing::error!(service = %service.name, reason, "not registered")
                }
                AgentAction::Registered {
                    service_id,
                    service,
                    port,
                } => {
                    self.registered(service_id, &service, port);
                    self.watch_health(service_id, &service, ctx);
                }
                AgentAction::RegistrationRefused {
                    service,
                    reason,
                    lasting,
                } => self.register_failed(service, (&reason, lasting), ctx),
                AgentAction::Ready => self.connected(),
                AgentAction::ProbeAnswered { id, answer } => self.probe_answered(id, answer),
                AgentAction::Dial {
                    connection_id,
                    address,
                    service,
                    credit,
                    visitor,
                    proxy_header,
                } => {
                    let opening = (credit, proxy_header);
                    self.on_dial(connection_id, address, service, opening, visitor, ctx);
                }
                AgentAction::OpenFlow {
                    connection_id,
                    service_id,
                    service,
                    client_addr,
                    proxy_header,
                } => {
                    let visitor = (client_addr.as_str(), proxy_header);
                    self.open_flow((service_id, connection_id), &service, visitor, ctx);
                }
                AgentAction::Write(frame) => self.write(frame, ctx),
                AgentAction::Socket(action) => self.on_socket_action(action),
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
}

/// A WebSocket close as a person reads it: its code and description.
fn closed_because(reason: Option<&ws::CloseReason>) -> String {
    match reason {
        None => "no reason given".to_owned(),
        Some(r) => {
            let code = u16::from(r.code);
            match &r.description {
                Some(text) => format!("code {code}: {text}"),
                None => format!("code {code}"),
            }
        }
    }
}
