//! CPU profiles on the admin listener, with the `pprof` cargo feature:
//!
//! - `GET /debug/pprof/profile?seconds=N`: a pprof protobuf (`go tool pprof`, `pprof -http`);
//! - `GET /debug/pprof/flamegraph?seconds=N`: the same samples as a flamegraph SVG.
//!
//! Sampling is SIGPROF-based at 999 Hz for `N` seconds (1-60, default 10), one profile at a
//! time (409 while one runs). The admin listener is on loopback by default; keep it there.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

/// Sampling frequency: 999 Hz avoids lockstep with 1 kHz timers.
const FREQUENCY: i32 = 999;
/// Longest profile.
const MAX_SECONDS: u64 = 60;

/// Routes for the admin router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let busy = Arc::new(Semaphore::new(1));
    Router::new()
        .route("/debug/pprof/profile", get(profile))
        .route("/debug/pprof/flamegraph", get(flamegraph))
        .with_state(busy)
}

enum Format {
    Pprof,
    Flamegraph,
}

async fn profile(
    State(busy): State<Arc<Semaphore>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    run(busy, &q, Format::Pprof).await
}

async fn flamegraph(
    State(busy): State<Arc<Semaphore>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    run(busy, &q, Format::Flamegraph).await
}

fn seconds(q: &[(String, String)]) -> Result<u64, String> {
    match q.iter().find(|(k, _)| k == "seconds") {
        None => Ok(10),
        Some((_, v)) => match v.parse::<u64>() {
            Ok(n) if (1..=MAX_SECONDS).contains(&n) => Ok(n),
            _ => Err(format!("seconds must be 1-{MAX_SECONDS}, got {v:?}\n")),
        },
    }
}

async fn run(busy: Arc<Semaphore>, q: &[(String, String)], format: Format) -> Response {
    let secs = match seconds(q) {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let Ok(permit) = busy.try_acquire_owned() else {
        return (StatusCode::CONFLICT, "a profile is already running\n").into_response();
    };
    tracing::info!(seconds = secs as i64, "CPU profile started");
    let result = tokio::task::spawn_blocking(move || -> Result<Response, String> {
        let _permit = permit;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(secs));
        let report = guard.report().build().map_err(|e| e.to_string())?;
        Ok(match format {
            Format::Pprof => {
                use pprof::protos::Message;
                let profile = report.pprof().map_err(|e| e.to_string())?;
                let mut body = Vec::new();
                profile.encode(&mut body).map_err(|e| e.to_string())?;
                (
                    [
                        (header::CONTENT_TYPE, "application/octet-stream"),
                        (
                            header::CONTENT_DISPOSITION,
                            "attachment; filename=\"wsotel.pb\"",
                        ),
                    ],
                    body,
                )
                    .into_response()
            }
            Format::Flamegraph => {
                let mut svg = Vec::new();
                report.flamegraph(&mut svg).map_err(|e| e.to_string())?;
                ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
            }
        })
    })
    .await;
    match result {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "CPU profile failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("profile failed: {e}\n"),
            )
                .into_response()
        }
        Err(join) => {
            tracing::warn!(error = %join, "CPU profile task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "profile failed\n").into_response()
        }
    }
}
