//! One HTTP port: `/metrics` (Prometheus text exposition), `/healthz` (200 while the engine and consumer
//! threads are alive and iterating; 503 with the reason once one of them died or has been stuck for
//! `daemon.liveness_timeout_secs`, after which armd exits non-zero) and `/readyz` (200 when the model is loaded, the Kafka clients run, every client has a broker
//! connection and the daemon is not shutting down; 503 with the reasons otherwise).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::kafka::Health;

#[derive(Clone)]
struct AppState {
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    liveness_timeout: Duration,
}

pub fn router(
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    liveness_timeout: Duration,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            prometheus,
            health,
            liveness_timeout,
        })
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let reasons = s.health.not_live_reasons(s.liveness_timeout);
    if reasons.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {}\n", reasons.join(", ")),
        )
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.prometheus.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.prometheus.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let reasons = s.health.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join(", ")),
        )
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    liveness_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(prometheus, health, liveness_timeout))
        .with_graceful_shutdown(shutdown)
        .await
}
