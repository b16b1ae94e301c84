//! The life of a link: the WebSocket dialed (a refusal described by what the
//! server's status means), a session started on it, and its end: for good (a
//! refused token, a stop) or to reconnect after a backoff delay.

use super::*;
use crate::actors::io::turns::Turns;

/// The bytes a frame from the server carries, as its thread's turns count them.
fn frame_len(frame: &Result<ws::Frame, actix_http::ws::ProtocolError>) -> usize {
    match frame {
        Ok(ws::Frame::Binary(b) | ws::Frame::Text(b)) => b.len(),
        _ => 0,
    }
}

impl AgentConnection {
    pub(super) fn connect(&mut self, ctx: &mut Context<Self>) {
        let config = &self.shared.config;
        let (url, timeout) = (config.server_url.clone(), config.connect_timeout);
        let client = self.shared.client();
        let dial = async move {
            let request = client.ws(url).max_frame_size(MAX_MESSAGE_SIZE);
            match tokio::time::timeout(timeout, request.connect()).await {
                Ok(Ok((_, framed))) => Ok(framed),
                Ok(Err(e)) => Err(DialFailure::of(&e)),
                Err(_) => Err(DialFailure::Unreachable("timed out".to_owned())),
            }
        };
        ctx.spawn(dial.into_actor(self).map(|result, act, ctx| match result {
            _ if act.finished => {}
            Ok(framed) => act.linked(framed, ctx),
            Err(DialFailure::Untrusted(error)) => {
                let hint = "give ca_cert (--ca-cert): the CA that signed it, or the server's own certificate";
                tracing::warn!(server = %act.shared.config.server_url, %error, hint, "the server's certificate is not trusted");
                act.drop_link_for_good(format!("the server's certificate is not trusted ({error}): {hint}"), ctx);
            }
            Err(DialFailure::NotTls(error)) => {
                let hint = "use ws:// for it, or the address of its TLS listener";
                tracing::warn!(server = %act.shared.config.server_url, %error, hint, "the server does not speak TLS at this address");
                act.drop_link_for_good(format!("the server does not speak TLS at this address ({error}): {hint}"), ctx);
            }
            Err(DialFailure::Unreachable(error)) => {
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
        ctx.add_stream(Turns::new(stream, frame_len));
        let config = &self.shared.config;
        let settings = config.session_settings(self.shared.client_id);
        self.link = Some(Link {
            generation: self.starts,
            sink: Some(sink),
            session: AgentSession::new(settings, Instant::now()),
            timer: None,
            queue: FrameQueue::new(Features::NONE),
            write_scheduled: false,
            streams: StreamHub::default(),
            flows: FlowHub::new(config.udp_waiting),
            cancel: CancellationToken::new(),
            since: Instant::now(),
            gate: ReadGate::new(config.read_ahead),
            health: HashMap::new(),
            probes: HashMap::new(),
        });
        self.execute(ctx);
    }

    /// How the session ended: for good (a refused token), or to reconnect.
    pub(super) fn link_ended(&mut self, error: LinkError, ctx: &mut Context<Self>) {
        match &error {
            LinkError::TokenRefused { reason } => {
                tracing::error!(%reason, "the server refused the token; stopping");
                return self.finish(Err(crate::TunnelError::auth_refused(reason)), ctx);
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
            LinkError::NotReading { detail } => {
                tracing::warn!(%detail, "the server does not read what it is sent; reconnecting")
            }
            LinkError::Protocol(violation) => {
                tracing::warn!(%violation, "protocol error by the server; reconnecting")
            }
        }
        self.drop_link(error.to_string(), ctx);
    }

    /// Ends this link for `error` (the status reports it); the supervisor
    /// reconnects after a backoff delay.
    pub(super) fn drop_link(&mut self, error: impl Into<String>, ctx: &mut Context<Self>) {
        self.shared.view.link_failed(error);
        ctx.stop();
    }

    /// Ends this link for `error`, a fault retrying soon cannot fix: the
    /// supervisor tries again at the longest delay, and says so once.
    fn drop_link_for_good(&mut self, error: String, ctx: &mut Context<Self>) {
        self.shared.view.link_failed_for_good(error);
        ctx.stop();
    }

    pub(super) fn finish(&mut self, result: crate::Result<()>, ctx: &mut Context<Self>) {
        self.report_end(result);
        ctx.stop();
    }

    /// Says the agent has ended (its status, and `run()`'s answer); said
    /// once, later calls change nothing.
    pub(super) fn report_end(&mut self, result: crate::Result<()>) {
        if self.shared.is_done() {
            return;
        }
        self.finished = true;
        self.shared.view.disconnected();
        self.shared.view.set_state(match &result {
            Ok(()) => TunnelState::Stopped,
            Err(e) => TunnelState::Failed {
                error: e.to_string(),
            },
        });
        self.shared.done(AgentStopped(result));
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

/// Why the server's WebSocket could not be dialed, as far as the agent acts on it.
enum DialFailure {
    /// The TLS handshake refused the server's certificate (rustls said so).
    Untrusted(String),
    /// What answered the TLS handshake was not TLS: a `ws://` server at a
    /// `wss://` URL.
    NotTls(String),
    /// Anything else: no answer, a refused upgrade, a reset.
    Unreachable(String),
}

impl DialFailure {
    /// Sorts an awc error by its type: a certificate rustls refused is
    /// `Untrusted`; the rest is described for the log and the status.
    fn of(error: &awc::error::WsClientError) -> Self {
        use awc::error::{ConnectError, SendRequestError, WsClientError};
        let tls = match error {
            WsClientError::SendRequest(SendRequestError::Connect(ConnectError::Io(io))) => {
                io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
            }
            _ => None,
        };
        match tls {
            Some(
                e @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented),
            ) => Self::Untrusted(e.to_string()),
            Some(e @ rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                Self::NotTls(e.to_string())
            }
            _ => Self::Unreachable(describe_refusal(error)),
        }
    }
}
