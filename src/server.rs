//! `run`: the WebSocket listener, the admin listener, and graceful shutdown.
//!
//! Both listeners have their own accept loop over hyper's HTTP/1 connection builder rather than
//! `axum::serve`, for what `axum::serve` does not give: a header read timeout
//! (`--handshake-timeout`, so a client trickling headers cannot hold a socket, on the admin
//! listener too), counted refusals when it fires or a request head is too large or malformed,
//! per-source limits checked as each socket is accepted (see [`crate::sources`]), a shutdown
//! that does not wait on an admin client, and a clear log line when `accept` fails for lack of
//! file descriptors.
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
use crate::auth::Authenticator;
use crate::backplane::Backplane;
use crate::config::Config;
use crate::layer::WebSockets;
use crate::rooms::Rooms;
use crate::routes::{self, ServerState, Terms};
use crate::sources::{FD_RESERVE, SourceLimits, Sources};
use crate::telemetry::log_limit::REPORT_EVERY;
use crate::telemetry::{Events, RejectReason, Telemetry};

/// Largest request head accepted (431 beyond).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Longest an admin-listener client may hold the exit once the drain is over.
const ADMIN_SHUTDOWN: Duration = Duration::from_secs(1);

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The admin listener failed.
    #[error("admin listener: {0}")]
    Admin(#[source] std::io::Error),
    /// The configuration cannot be used (an authentication key that does not load).
    #[error("{0}")]
    Config(String),
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
    let stop_listeners = CancellationToken::new();
    let drain_timeout = config.drain_timeout;
    let handshake_timeout = config.handshake_timeout;
    let events = telemetry.events().clone();
    events.log_limiter().set_rate(config.log_rate);

    let auth = Authenticator::from_settings(&config.auth())
        .map_err(|e| ServerError::Config(format!("authentication key: {e}")))?;
    match &auth {
        Some(_) => tracing::info!("authentication on: every upgrade needs a valid token"),
        None => tracing::info!(
            "authentication off: anyone who reaches the listener may use any room \
             (set --auth-hs256-secret-file, --auth-rs256-public-key-file, \
             --auth-es256-public-key-file or --auth-jwks-file to turn it on)"
        ),
    }
    let sources = Sources::new(source_limits(&config));
    let saturation = events.saturation();
    saturation.connection_limit.store(
        u64::from(config.max_connections),
        std::sync::atomic::Ordering::Relaxed,
    );
    saturation.pending_limit.store(
        u64::from(config.max_pending_handshakes),
        std::sync::atomic::Ordering::Relaxed,
    );
    let counts = sources.clone();
    // A second `run` on the same telemetry (tests) keeps the first reader: both read alike.
    let _ = saturation
        .pending
        .set(Box::new(move || u64::from(counts.counts().0)));

    let backplane = match config
        .backplane()
        .map_err(|e| ServerError::Config(format!("--nats-url: {e}")))?
    {
        None => None,
        Some(settings) => {
            let spans = telemetry.spans().cloned().map(Arc::new);
            let bp = Backplane::start(&settings, events.clone(), routes::ROOMS, spans)
                .await
                .map_err(ServerError::Config)?;
            tracing::info!(
                servers = settings.servers.len() as i64,
                subject_prefix = %settings.prefix,
                "backplane on: rooms span every instance on this NATS"
            );
            Some(bp)
        }
    };

    let sockets = WebSockets::builder(&telemetry)
        .max_message_size(config.max_message_size)
        .max_connections(config.max_connections)
        .ping_interval(config.ping_interval)
        .pong_timeout(config.pong_timeout)
        .write_timeout(config.write_timeout)
        .allowed_origins(config.allowed_origins.iter().cloned())
        .sources(sources.clone())
        .route(routes::ECHO.as_str())
        .route(routes::ROOMS.as_str())
        .build();
    let state = ServerState::new(
        Rooms::new(events.clone(), routes::ROOMS, backplane.clone()),
        auth,
        sources.clone(),
        telemetry.spans().cloned().map(Arc::new),
        Terms {
            queue: config.outbound_queue as usize,
            publish_rate: config.publish_rate,
            publish_burst: config.publish_burst,
            rate_limit_penalty: config.rate_limit_penalty,
            write_delay: config.room_write_delay,
        },
    );
    let ws_router = routes::router(state, &sockets);
    let accept = tokio::spawn(accept_loop(
        ws_listener,
        ws_router,
        handshake_timeout,
        events.clone(),
        Some(sources),
        stop_listeners.clone(),
    ));

    let admin_router = admin::router(telemetry.clone(), &sockets);
    let admin = tokio::spawn(accept_loop(
        admin_listener,
        admin_router,
        handshake_timeout,
        events.clone(),
        None,
        stop_listeners.clone(),
    ));

    let trimmer = tokio::spawn(give_back_memory(sockets.clone(), stop_listeners.clone()));
    let reporter = tokio::spawn(report_suppressed_logs(events, stop_listeners.clone()));
    shutdown.await;
    let open = sockets.open_connections();
    tracing::info!(open_connections = open, "shutdown requested: draining");
    sockets.shutdown();
    let started = Instant::now();
    if tokio::time::timeout(drain_timeout, sockets.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = sockets.open_connections(),
            drain_timeout_ms = drain_timeout.as_millis() as i64,
            "drain timeout: abandoning remaining connections"
        );
    } else {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as i64,
            "all connections drained"
        );
    }
    if let Some(bp) = &backplane {
        // What the drained connections published last still crosses.
        bp.flush(Duration::from_secs(1)).await;
    }
    stop_listeners.cancel();
    let _ = accept.await;
    let _ = trimmer.await;
    let _ = reporter.await;
    match admin.await {
        Ok(()) => Ok(()),
        Err(join) => Err(ServerError::Admin(std::io::Error::other(join))),
    }
}

/// The per-source limits from `config`, and the descriptors the WebSocket listener may use:
/// the open-file limit less [`FD_RESERVE`]. Warns when `--max-connections` cannot be reached.
fn source_limits(config: &Config) -> SourceLimits {
    let fd_limit = crate::limits::open_file_limit();
    let max_sockets = fd_limit.map_or(u64::MAX, |l| l.saturating_sub(FD_RESERVE));
    let wanted = u64::from(config.max_connections) + u64::from(config.max_pending_handshakes);
    if wanted > max_sockets {
        tracing::warn!(
            open_file_limit = fd_limit.unwrap_or(0) as i64,
            max_connections = config.max_connections as i64,
            max_pending_handshakes = config.max_pending_handshakes as i64,
            "the open-file limit, less {FD_RESERVE} descriptors kept for the admin listener, is \
             below --max-connections plus --max-pending-handshakes: raise the limit (ulimit -n, \
             LimitNOFILE=) to reach them"
        );
    }
    SourceLimits {
        max_pending: config.max_pending_handshakes,
        max_pending_per_ip: config.max_pending_per_ip,
        max_open_per_ip: config.max_connections_per_ip,
        max_sockets,
        trusted_proxies: config.trusted_proxies.clone(),
    }
}

/// Every [`REPORT_EVERY`], one line per event whose log lines were held back.
async fn report_suppressed_logs(events: Events, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        for (event, count) in events.log_limiter().take_suppressed() {
            if count > 0 {
                tracing::warn!(
                    event = event.as_str(),
                    suppressed = count as i64,
                    "log lines suppressed by --log-rate"
                );
            }
        }
        if stopping {
            return;
        }
    }
}

/// Serves `router` on `listener` until `stop`. With `sources` (the WebSocket listener), every
/// socket is admitted against the per-source limits first. Once stopped, open HTTP connections
/// are shut down gracefully, but an admin client cannot hold the exit past [`ADMIN_SHUTDOWN`]
/// (upgraded WebSockets are not HTTP connections any more: the drain closes them).
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    handshake_timeout: Duration,
    events: Events,
    sources: Option<Sources>,
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
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    accept_error(&err, &mut last_fd_warning);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let slot = match sources.as_ref().map(|s| s.admit(peer.ip())) {
            Some(Err(refusal)) => {
                refused(&events, refusal.reason(), peer);
                // Dropped at once: the client sees its connection closed.
                continue;
            }
            Some(Ok(slot)) => Some(slot),
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        // Set once a request head has arrived: hyper's header timer also runs while a
        // keep-alive connection idles between requests, and that is no handshake timeout.
        let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = answered.clone();
        let service = tower::service_fn(move |mut req: hyper::Request<Incoming>| {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req)
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let stop = stop.clone();
        let events = events.clone();
        let counted = sources.is_some();
        connections.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            // The socket is no longer pending: refused, timed out, closed, or upgraded (then
            // its connection counts it).
            drop(slot);
            if let Err(err) = result {
                if !counted {
                    // The admin listener: its refusals are not WebSocket handshakes.
                    tracing::debug!(client.address = %peer.ip(), error = %err, "admin connection error");
                } else if err.is_timeout()
                    && answered.load(std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::debug!(client.address = %peer.ip(), "idle keep-alive connection closed");
                } else if err.is_timeout() {
                    refused(&events, RejectReason::HandshakeTimeout, peer);
                } else if err.is_parse_too_large() {
                    refused(&events, RejectReason::HeaderTooLarge, peer);
                } else if err.is_parse() {
                    refused(&events, RejectReason::MalformedRequest, peer);
                } else {
                    tracing::debug!(client.address = %peer.ip(), error = %err, "http connection error");
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(ADMIN_SHUTDOWN, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            open = connections.len() as i64,
            "HTTP connections still open after the shutdown bound: dropped"
        );
    }
}

/// Counts and logs (within the log budget) a socket refused before any request was answered.
fn refused(events: &Events, reason: RejectReason, peer: SocketAddr) {
    events.handshake_rejected(None, reason, None, peer.ip());
}

/// How often the memory give-back checks the connection count.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Closed connections since the last give-back that make another worth it.
const TRIM_AFTER_CLOSED: usize = 1000;

/// glibc keeps the memory of freed connections in its arenas: after a disconnect storm RSS
/// would stay at its peak. When the open connections have dropped by a thousand or more since
/// the last check, `malloc_trim` returns the free pages to the kernel (a few milliseconds, on a
/// blocking thread).
async fn give_back_memory(sockets: WebSockets, stop: CancellationToken) {
    let mut high_water = sockets.open_connections();
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let open = sockets.open_connections();
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
            "refusing connections: out of file descriptors (raise the open-file limit: ulimit -n, \
             LimitNOFILE=, or the container's nofile ulimit)"
        ),
        _ => tracing::warn!(error = %err, "accept failed"),
    }
}
