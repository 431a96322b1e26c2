//! Observability stage, served: the `health` listener (`/ready`, `/metrics`
//! for kubelet probes and Prometheus) and the local `admin` listener (also
//! `/config`, `/denied` and the traffic page of `page`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::denied::denied_toml;
use crate::state::Shared;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    if s.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if s.draining.load(std::sync::atomic::Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn config(State(s): State<Arc<Shared>>) -> Response {
    let gen = s.generation();
    let status = s.reload_status();
    // The config in force (restart-required keys at their running values),
    // and what the last reload said: "restart required" keys, "re-run init".
    let body = serde_json::json!({
        "config": gen.config(),
        "reload": status,
        "restart_required": status.restart_required,
        "rerun_init": status.rerun_init,
        "draining": s.draining.load(std::sync::atomic::Ordering::Acquire),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )
        .into_response()
}

async fn denied(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let records = s.denied.snapshot();
    if q.get("format").map(String::as_str) == Some("toml") {
        let gen = s.generation();
        return (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            denied_toml(&records, gen.config()),
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&records).unwrap_or_default(),
    )
        .into_response()
}

/// The admin listener's routes: health, metrics, config, denied, and the
/// traffic page with its `/api/` (which starts the page's sampler), all
/// behind the loopback Host check (docs/DESIGN.md §4).
pub fn admin_router(shared: Arc<Shared>) -> Router {
    let page = crate::page::Page::new(shared.clone());
    page.spawn_sampler();
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .route("/denied", get(denied))
        .with_state(shared)
        .merge(page.router())
        .layer(axum::middleware::from_fn(crate::page::host_guard))
}

/// Binds and serves `health` and `admin` (each may be "off"), each bounded
/// by its caps and timeouts (`crate::endpoint`).
pub async fn spawn(shared: Arc<Shared>, cfg: &Config) -> std::io::Result<()> {
    use crate::endpoint::{bind, serve, ConnLimiter, ADMIN_LIMITS, HEALTH_LIMITS};
    // One limiter for every health address: its caps count the listener as a
    // whole, whichever family a peer arrives on.
    let health_limiter = ConnLimiter::new("health", HEALTH_LIMITS);
    for &addr in &cfg.proxy.health {
        let app = Router::new()
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(shared.clone());
        // IPv6 is V6ONLY, so "0.0.0.0:15021" and "[::]:15021" (the default)
        // bind side by side; where IPv6 is off the IPv6 one is skipped.
        let l = match crate::proxy::bind_one(addr) {
            Ok(l) => l,
            Err(e) if crate::proxy::ipv6_unavailable(addr, &e) => {
                tracing::warn!(%addr, error = %e, "IPv6 health listener not bound (IPv6 disabled?): continuing without it");
                continue;
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on health {addr}: {e}"),
                ))
            }
        };
        tracing::info!(%addr, per_peer = HEALTH_LIMITS.per_peer, total = HEALTH_LIMITS.total, "health endpoint");
        tokio::spawn(serve(l, app, health_limiter.clone(), shared.clone()));
    }
    if let Some(addr) = cfg.proxy.admin {
        let app = admin_router(shared.clone());
        let l = bind("admin", addr).await?;
        tracing::info!(%addr, per_peer = ADMIN_LIMITS.per_peer, total = ADMIN_LIMITS.total, "admin endpoint");
        let limiter = ConnLimiter::new("admin", ADMIN_LIMITS);
        tokio::spawn(serve(l, app, limiter, shared.clone()));
    }
    Ok(())
}
