//! The admin endpoints, on their own listener so that they can stay private:
//! `GET /healthz`, `GET /status` (JSON) and `GET /metrics` (Prometheus text).
//! Not an actor: actix-web handlers that read the registry.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};

use super::TunnelRegistry;
use crate::status::{StatusReport, render_metrics};

/// Starts the admin server on `listen`; it runs until `stop` on the returned handle.
pub(crate) fn start(
    listen: &[SocketAddr],
    registry: Arc<TunnelRegistry>,
) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::from(registry);
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

async fn status(registry: web::Data<TunnelRegistry>) -> HttpResponse {
    let tunnels = registry.list_tunnels().await;
    let free_ports = registry.available_ports().await;
    HttpResponse::Ok().json(StatusReport {
        tunnels: &tunnels,
        free_ports,
    })
}

async fn metrics(registry: web::Data<TunnelRegistry>) -> HttpResponse {
    let tunnels = registry.list_tunnels().await;
    let text = render_metrics(&tunnels, registry.available_ports().await);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}
