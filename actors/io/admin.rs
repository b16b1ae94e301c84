//! The admin endpoints, on their own listener so that they can stay private:
//! `GET /healthz`, `GET /status` (JSON) and `GET /metrics` (Prometheus text),
//! for a server (its registry) or an agent (its own session). Not an actor:
//! actix-web handlers that read an [`AdminSource`].

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use futures::future::LocalBoxFuture;

use crate::actors::{AccessManager, NodeTunnelManager, TunnelAgent, TunnelRegistry};
use crate::status::{StatusReport, render_agent_metrics, render_guard_metrics, render_metrics};

/// What the admin endpoints report on.
pub(crate) trait AdminSource: Send + Sync + 'static {
    /// The `/status` document.
    fn status(&self) -> LocalBoxFuture<'_, serde_json::Value>;
    /// The `/metrics` text.
    fn metrics(&self) -> LocalBoxFuture<'_, String>;
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

/// Starts the admin server on `listen`; it runs until `stop` on the returned handle.
pub(crate) fn start(
    listen: &[SocketAddr],
    source: Arc<dyn AdminSource>,
) -> std::io::Result<actix_web::dev::Server> {
    let data: web::Data<dyn AdminSource> = web::Data::from(source);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/healthz", web::get().to(|| async { "ok\n" }))
            .route("/status", web::get().to(status))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    let server = listen.iter().try_fold(server, |s, addr| s.bind(addr))?;
    for addr in server.addrs() {
        tracing::info!(%addr, "admin endpoints listening (/healthz, /status, /metrics)");
    }
    Ok(server.run())
}

async fn status(source: web::Data<dyn AdminSource>) -> HttpResponse {
    HttpResponse::Ok().json(source.status().await)
}

async fn metrics(source: web::Data<dyn AdminSource>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(source.metrics().await)
}
