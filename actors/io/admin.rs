//! The admin endpoints, on their own listener so that they can stay private:
//! `GET /` (the dashboard), `GET /healthz`, `GET /status` (JSON) and
//! `GET /metrics` (Prometheus text),
//! for a server (its registry) or an agent (its own session). Not an actor:
//! actix-web handlers that read an [`AdminSource`]. Each request but
//! `/healthz` is checked against the listener's [`AdminAccess`]; a refused
//! one is answered 401 (or 403), counted, and logged at most once a second,
//! never with what it presented.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::dev::Payload;
use actix_web::error::InternalError;
use actix_web::{App, FromRequest, HttpRequest, HttpResponse, HttpServer, web};
use futures::future::LocalBoxFuture;

use crate::admin_access::{AdminAccess, AdminNeed, AdminRefusal};
use crate::log_limit::{LogLimiter, RemoteEvent};

use crate::actors::{AccessManager, NodeTunnelManager, TunnelAgent, TunnelRegistry};
use crate::status::{StatusReport, render_agent_metrics, render_guard_metrics, render_metrics};

/// What the admin endpoints report on.
pub(crate) trait AdminSource: Send + Sync + 'static {
    /// The `/status` document.
    fn status(&self) -> LocalBoxFuture<'_, serde_json::Value>;
    /// The `/metrics` text.
    fn metrics(&self) -> LocalBoxFuture<'_, String>;
    /// Re-reads the configuration (`POST /reload`): what changed, or why
    /// nothing did; `None`: this source does not reload.
    fn reload(&self) -> Option<LocalBoxFuture<'_, Result<serde_json::Value, String>>> {
        None
    }
    /// The services it publishes (`GET /services`); `None`: it has none.
    fn services(&self) -> Option<serde_json::Value> {
        None
    }
    /// Publishes a service (`POST /services`, a `ServiceConfig` as JSON):
    /// what it publishes now, or why not; `None`: it publishes none.
    fn add_service(
        &self,
        _service: serde_json::Value,
    ) -> Option<Result<serde_json::Value, String>> {
        None
    }
    /// Withdraws service `name` (`DELETE /services/{name}`): whether it
    /// was published; `None`: it publishes none.
    fn remove_service(&self, _name: &str) -> Option<bool> {
        None
    }
}

impl AdminSource for TunnelRegistry {
    fn status(&self) -> LocalBoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let tunnels = self.list_tunnels().await;
            let free_ports = self.available_ports().await;
            let report = StatusReport {
                tunnels: &tunnels,
                services: crate::status::replicas(&tunnels),
                free_ports,
                guards: self.guards(),
                cluster: self.cluster_status(),
            };
            serde_json::to_value(report).unwrap_or_default()
        })
    }

    fn metrics(&self) -> LocalBoxFuture<'_, String> {
        Box::pin(async move {
            let tunnels = self.list_tunnels().await;
            let mut text = render_metrics(&tunnels, self.available_ports().await);
            text.push_str(&render_guard_metrics(&self.guards()));
            if let Some(cluster) = self.cluster_status() {
                text.push_str(&crate::status::render_cluster_metrics(&cluster));
            }
            text
        })
    }
}

impl AdminSource for TunnelAgent {
    fn status(&self) -> LocalBoxFuture<'_, serde_json::Value> {
        let status = Self::status(self);
        Box::pin(async move { serde_json::to_value(status).unwrap_or_default() })
    }

    fn metrics(&self) -> LocalBoxFuture<'_, String> {
        let text = render_agent_metrics(&Self::status(self));
        Box::pin(async move { text })
    }

    fn services(&self) -> Option<serde_json::Value> {
        serde_json::to_value(Self::services(self)).ok()
    }

    fn add_service(&self, service: serde_json::Value) -> Option<Result<serde_json::Value, String>> {
        let added = serde_json::from_value::<crate::config::ServiceConfig>(service)
            .map_err(|e| format!("not a service: {e}"))
            .and_then(|s| Self::add_service(self, s).map_err(|e| e.to_string()));
        Some(added.map(|()| AdminSource::services(self).unwrap_or_default()))
    }

    fn remove_service(&self, name: &str) -> Option<bool> {
        Some(Self::remove_service(self, name))
    }
}

impl AdminSource for NodeTunnelManager {
    fn status(&self) -> LocalBoxFuture<'_, serde_json::Value> {
        let tunnels = self.list_status();
        Box::pin(async move { serde_json::json!({ "node_tunnels": tunnels }) })
    }

    fn metrics(&self) -> LocalBoxFuture<'_, String> {
        let text = crate::status::render_node_tunnel_metrics(&self.list_status());
        Box::pin(async move { text })
    }
}

impl AdminSource for AccessManager {
    fn status(&self) -> LocalBoxFuture<'_, serde_json::Value> {
        let sessions = self.list_sessions();
        Box::pin(async move { serde_json::json!({ "access_sessions": sessions }) })
    }

    fn metrics(&self) -> LocalBoxFuture<'_, String> {
        let text = crate::status::render_access_metrics(&self.list_sessions());
        Box::pin(async move { text })
    }
}

/// The listener's access rules and what it refused.
pub(crate) struct Guard {
    access: AdminAccess,
    refused: AtomicU64,
    logs: Mutex<LogLimiter>,
}

impl Guard {
    /// Checks `request` for `need`: the answer to send if it is refused.
    fn refusal(&self, request: &HttpRequest, need: AdminNeed) -> Option<HttpResponse> {
        let authorization = (request.headers().get("authorization")).and_then(|v| v.to_str().ok());
        let refusal = self.access.check(need, authorization).err()?;
        self.refused.fetch_add(1, Relaxed);
        let logs = self
            .logs
            .lock()
            .ok()
            .map(|mut l| l.admit(RemoteEvent::AdminRefused, Instant::now()));
        if let Some(Some(held_back)) = logs {
            let peer = request
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::warn!(%peer, path = request.path(), reason = %refusal, held_back, "admin request refused");
        }
        let answer = match refusal {
            AdminRefusal::Unauthorized => HttpResponse::Unauthorized()
                .insert_header(("WWW-Authenticate", "Bearer"))
                .body(format!("{refusal}\n")),
            AdminRefusal::NoAdminToken => HttpResponse::Forbidden().body(format!("{refusal}\n")),
        };
        Some(answer)
    }
}

/// Starts the admin server on `listen`, open to read and taking no
/// changes; it runs until `stop` on the returned handle.
pub(crate) fn start(
    listen: &[SocketAddr],
    source: Arc<dyn AdminSource>,
) -> std::io::Result<actix_web::dev::Server> {
    start_guarded(listen, source, AdminAccess::open())
}

/// Starts the admin server on `listen`, guarded by `access`.
pub(crate) fn start_guarded(
    listen: &[SocketAddr],
    source: Arc<dyn AdminSource>,
    access: AdminAccess,
) -> std::io::Result<actix_web::dev::Server> {
    let data: web::Data<dyn AdminSource> = web::Data::from(source);
    let guard = web::Data::new(Guard {
        access,
        refused: AtomicU64::new(0),
        logs: Mutex::new(LogLimiter::new()),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(guard.clone())
            .route("/", web::get().to(dashboard))
            .route("/healthz", web::get().to(|| async { "ok\n" }))
            .route("/status", web::get().to(status))
            .route("/metrics", web::get().to(metrics))
            .route("/reload", web::post().to(reload))
            .route("/services", web::get().to(list_services))
            .route("/services", web::post().to(add_service))
            .route("/services/{name}", web::delete().to(remove_service))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    let server = listen.iter().try_fold(server, |s, addr| {
        s.bind(addr)
            .map_err(|e| super::bind_error(e, *addr, "the admin endpoints (--admin-listen)"))
    })?;
    for addr in server.addrs() {
        tracing::info!(%addr, "admin endpoints listening (/ for the dashboard, /healthz, /status, /metrics)");
    }
    Ok(server.run())
}

/// A request the guard let read (`/status`, `/metrics`).
struct CanRead;

/// A request the guard let change something (`POST /reload`).
struct CanWrite;

/// Checks `request` for `need` against the listener's guard; the refusal
/// becomes the answer.
fn admitted(request: &HttpRequest, need: AdminNeed) -> Result<(), actix_web::Error> {
    let guard = request.app_data::<web::Data<Guard>>();
    match guard.and_then(|g| g.refusal(request, need)) {
        None => Ok(()),
        Some(answer) => Err(InternalError::from_response("refused", answer).into()),
    }
}

impl FromRequest for CanRead {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(admitted(request, AdminNeed::Read).map(|()| Self))
    }
}

impl FromRequest for CanWrite {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(admitted(request, AdminNeed::Write).map(|()| Self))
    }
}

/// The dashboard: one page, everything embedded, that draws `/status`
/// every second. It holds no data itself (what it reads is guarded like
/// `/status`: it asks for the read token), so it is served to anyone.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the dashboard may do: run its own inline script and style, and
/// read this listener; nothing else, and never inside another site's frame.
const DASHBOARD_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Content-Security-Policy", DASHBOARD_POLICY))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cache-Control", "no-store"))
        .body(DASHBOARD)
}

async fn status(_: CanRead, source: web::Data<dyn AdminSource>) -> HttpResponse {
    let mut status = source.status().await;
    // when it was read (ms since the Unix epoch): a reader's rates come
    // from this clock, not from when its answers arrived
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    if let (Some(fields), Ok(now)) = (status.as_object_mut(), now) {
        let now = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        fields.insert("now_ms".into(), now.into());
    }
    HttpResponse::Ok().json(status)
}

async fn metrics(
    _: CanRead,
    source: web::Data<dyn AdminSource>,
    guard: web::Data<Guard>,
) -> HttpResponse {
    let mut text = source.metrics().await;
    let name = "zlayer_tunnel_admin_refused_total";
    text.push_str(&format!(
        "# HELP {name} Admin requests refused for a missing or wrong token.\n# TYPE {name} counter\n{name} {}\n",
        guard.refused.load(Relaxed)
    ));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

async fn reload(_: CanWrite, source: web::Data<dyn AdminSource>) -> HttpResponse {
    let Some(reloading) = source.reload() else {
        return HttpResponse::NotFound().body("this listener has nothing to reload\n");
    };
    match reloading.await {
        Ok(report) => HttpResponse::Ok().json(report),
        Err(error) => HttpResponse::BadRequest().body(format!("nothing changed: {error}\n")),
    }
}

const NO_SERVICES: &str = "this listener publishes no services\n";

async fn list_services(_: CanRead, source: web::Data<dyn AdminSource>) -> HttpResponse {
    match source.services() {
        Some(services) => HttpResponse::Ok().json(services),
        None => HttpResponse::NotFound().body(NO_SERVICES),
    }
}

async fn add_service(
    _: CanWrite,
    source: web::Data<dyn AdminSource>,
    service: web::Json<serde_json::Value>,
) -> HttpResponse {
    match source.add_service(service.into_inner()) {
        Some(Ok(services)) => HttpResponse::Ok().json(services),
        Some(Err(error)) => HttpResponse::BadRequest().body(format!("{error}\n")),
        None => HttpResponse::NotFound().body(NO_SERVICES),
    }
}

async fn remove_service(
    _: CanWrite,
    source: web::Data<dyn AdminSource>,
    name: web::Path<String>,
) -> HttpResponse {
    match source.remove_service(&name) {
        Some(true) => HttpResponse::NoContent().finish(),
        Some(false) => HttpResponse::NotFound().body(format!("no service named {:?}\n", *name)),
        None => HttpResponse::NotFound().body(NO_SERVICES),
    }
}
