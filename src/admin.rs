//! The admin listener: `/metrics` (Prometheus text), `/healthz` (live) and `/readyz` (503 while
//! draining). Served apart from the WebSocket listener, by default on loopback only.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http_metrics;
use crate::layer::WebSockets;
use crate::telemetry::Telemetry;

#[derive(Clone)]
struct AdminState {
    telemetry: Arc<Telemetry>,
    sockets: WebSockets,
}

/// The admin router: `/metrics` from `telemetry`; `/readyz` turns 503 once `sockets` is
/// shutting down.
pub fn router(telemetry: Arc<Telemetry>, sockets: &WebSockets) -> Router {
    let events = telemetry.events().clone();
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState {
            telemetry,
            sockets: sockets.clone(),
        });
    #[cfg(feature = "pprof")]
    let router = router.merge(crate::profiling::router());
    router.layer(middleware::from_fn_with_state(events, http_metrics::record))
}

async fn metrics(State(s): State<AdminState>) -> Response {
    // A collection takes locks (the SDK's, the tallies' hand-over) and renders every series:
    // on a blocking thread, not on a worker serving WebSockets.
    let telemetry = s.telemetry.clone();
    let rendered = tokio::task::spawn_blocking(move || telemetry.render_prometheus())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match rendered {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "rendering /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.sockets.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}
