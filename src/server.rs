//! `run`: the WebSocket listener, the admin listener, and graceful shutdown.
//!
//! The WebSocket listener has its own accept loop over hyper's HTTP/1 connection builder
//! rather than `axum::serve`, for three things `axum::serve` does not give: a header read
//! timeout (`--handshake-timeout`, so a client trickling headers cannot hold a socket), a
//! counted rejection when that timeout fires, and a clear log line when `accept` fails for lack
//! of file descriptors.
//!
//! Shutdown, once the `shutdown` future resolves:
//! 1. `/readyz` turns 503 and new upgrades get 503 (`shutting_down`);
//! 2. every connection is sent Close 1001 and its closing handshake is awaited;
//! 3. the drain waits for every connection task, at most `--drain-timeout`;
//! 4. both listeners stop and `run` returns; the caller then flushes telemetry.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::admin;
use crate::config::Config;
use crate::handshake::{self, WsState};
use crate::telemetry::{RejectReason, Telemetry};

/// Largest request head accepted (431 beyond).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The admin listener failed.
    #[error("admin listener: {0}")]
    Admin(#[source] std::io::Error),
}

/// Runs the server on already-bound listeners until `shutdown` resolves, then drains.
///
/// Tests and embedders bind `127.0.0.1:0` and pass the listeners in, so they know the ports
/// before the server starts and nothing is bound twice.
pub async fn run(
    ws_listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let draining = CancellationToken::new();
    let stop_listeners = CancellationToken::new();
    let drain_timeout = config.drain_timeout;
    let handshake_timeout = config.handshake_timeout;

    let state = WsState::new(
        config,
        telemetry.events().clone(),
        telemetry.spans().cloned(),
        draining.clone(),
    );
    let ws_router = handshake::router(state.clone());
    let accept = tokio::spawn(accept_loop(
        ws_listener,
        ws_router,
        handshake_timeout,
        telemetry.clone(),
        stop_listeners.clone(),
    ));

    let admin_router = admin::router(telemetry.clone(), draining.clone());
    let admin_stop = stop_listeners.clone();
    let admin = tokio::spawn(async move {
        axum::serve(admin_listener, admin_router)
            .with_graceful_shutdown(async move { admin_stop.cancelled().await })
            .await
    });

    let trimmer = tokio::spawn(give_back_memory(state.clone(), stop_listeners.clone()));
    shutdown.await;
    let open = state.open_connections();
    tracing::info!(open_connections = open, "shutdown requested: draining");
    draining.cancel();
    let started = Instant::now();
    if tokio::time::timeout(drain_timeout, state.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = state.open_connections(),
            drain_timeout_ms = drain_timeout.as_millis() as i64,
            "drain timeout: abandoning remaining connections"
        );
    } else {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as i64,
            "all connections drained"
        );
    }
    stop_listeners.cancel();
    let _ = accept.await;
    let _ = trimmer.await;
    match admin.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Admin(e)),
        Err(join) => Err(ServerError::Admin(std::io::Error::other(join))),
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    handshake_timeout: Duration,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        // An upgrade request is a few hundred bytes; refuse header floods early (431).
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(64)
        .max_buf_size(64 * 1024);
    let builder = Arc::new(builder);
    let mut last_fd_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    accept_error(&err, &mut last_fd_warning);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = tower::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req)
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let stop = stop.clone();
        let events = telemetry.events().clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                if err.is_timeout() {
                    events.handshake_rejected(None, RejectReason::HandshakeTimeout);
                    tracing::info!(client.address = %peer.ip(), "handshake timeout");
                } else {
                    tracing::debug!(client.address = %peer.ip(), error = %err, "http connection error");
                }
            }
        });
    }
}

/// How often the memory give-back checks the connection count.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Closed connections since the last give-back that make another worth it.
const TRIM_AFTER_CLOSED: usize = 1000;

/// glibc keeps the memory of freed connections in its arenas: after a disconnect storm RSS
/// would stay at its peak. When the open connections have dropped by a thousand or more since
/// the last check, `malloc_trim` returns the free pages to the kernel (a few milliseconds, on a
/// blocking thread).
async fn give_back_memory(state: WsState, stop: CancellationToken) {
    let mut high_water = state.open_connections();
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let open = state.open_connections();
        if open + TRIM_AFTER_CLOSED <= high_water {
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only returns free memory to the kernel.
                unsafe { libc::malloc_trim(0) };
            })
            .await;
            tracing::debug!(
                open_connections = open,
                was = high_water,
                "freed memory returned to the kernel"
            );
            high_water = open;
        } else {
            high_water = high_water.max(open);
        }
    }
}

/// Logs a failed `accept`: out of descriptors is said plainly, at most once every 10 s.
fn accept_error(err: &std::io::Error, last: &mut Option<Instant>) {
    let now = Instant::now();
    if last.is_some_and(|t| now - t < Duration::from_secs(10)) {
        return;
    }
    *last = Some(now);
    match err.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => tracing::error!(
            error = %err,
            open_file_limit = crate::limits::open_file_limit().unwrap_or(0) as i64,
            "refusing connections: out of file descriptors (raise the open-file limit or lower --max-connections)"
        ),
        _ => tracing::warn!(error = %err, "accept failed"),
    }
}
