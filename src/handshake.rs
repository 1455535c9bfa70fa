//! The WebSocket routes and everything decided before the upgrade: draining, room name,
//! Origin, the upgrade headers and the connection limit. Each refusal is a plain HTTP answer
//! (400, 403, 503...) counted in `websocket.server.rejected_connections` by `error.type`.

use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::connection::{self, Admission, ConnectionContext, ConnectionKind};
use crate::http_metrics;
use crate::rooms::{Rooms, valid_room_name};
use crate::sources::{OpenSlot, Sources};
use crate::telemetry::log_limit::LogEvent;
use crate::telemetry::traces::remote_parent;
use crate::telemetry::{ErrorType, Events, RejectReason, Route, Spans};
use crate::upgrade::{Socket, UpgradeError, UpgradeRequest};

/// tungstenite reads into a buffer of this size. Its default (128 KiB, allocated up front and
/// zero-filled before every read) dominated both idle memory and echo CPU (../shared/FACTS.md).
const READ_BUFFER: usize = 1024;
/// Written frames are collected up to this size before a write is forced.
const WRITE_BUFFER: usize = 8 * 1024;

/// State shared by every WebSocket request.
#[derive(Clone)]
pub struct WsState {
    inner: Arc<WsInner>,
}

struct WsInner {
    config: Config,
    events: Events,
    rooms: Rooms,
    /// One permit per open connection, held from the handshake to the end of its task; the
    /// drain waits until every permit is back.
    slots: Arc<Semaphore>,
    /// Cancelled when the server starts draining.
    shutdown: CancellationToken,
    next_id: AtomicU64,
    allowed_origins: Vec<String>,
    spans: Option<Arc<Spans>>,
    /// Verifies tokens, when authentication is on.
    auth: Option<Authenticator>,
    /// Per-source counts and limits.
    sources: Sources,
    /// The socket settings of every connection.
    socket_config: tungstenite::protocol::WebSocketConfig,
}

impl WsState {
    /// State for a server with `config`, recording through `events`, draining on `shutdown`.
    pub fn new(
        config: Config,
        events: Events,
        spans: Option<Spans>,
        shutdown: CancellationToken,
        auth: Option<Authenticator>,
        sources: Sources,
        backplane: Option<crate::backplane::Backplane>,
    ) -> Self {
        let spans = spans.map(Arc::new);
        let socket_config = socket_config(config.max_message_size);
        let allowed_origins = config
            .allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .collect();
        WsState {
            inner: Arc::new(WsInner {
                slots: Arc::new(Semaphore::new(config.max_connections as usize)),
                rooms: Rooms::new(events.clone(), backplane),
                events,
                shutdown,
                next_id: AtomicU64::new(1),
                allowed_origins,
                spans,
                config,
                auth,
                sources,
                socket_config,
            }),
        }
    }

    /// The per-source counts (shared with the accept loop).
    pub fn sources(&self) -> &Sources {
        &self.inner.sources
    }

    /// Connections open right now (handshakes accepted and not yet finished).
    pub fn open_connections(&self) -> usize {
        self.inner.config.max_connections as usize - self.inner.slots.available_permits()
    }

    /// Waits until every connection task has finished.
    pub async fn drained(&self) {
        let all = self.inner.config.max_connections;
        // The semaphore is never closed, so this only returns once every permit is back.
        let _ = self.inner.slots.acquire_many(all).await;
    }
}

/// The WebSocket router: `/ws/echo` and `/ws/rooms/{room}`.
pub fn router(state: WsState) -> Router {
    let events = state.inner.events.clone();
    let sources = state.inner.sources.clone();
    Router::new()
        .route("/ws/echo", get(echo))
        .route("/ws/rooms/{room}", get(room))
        .with_state(state)
        .layer(middleware::from_fn_with_state(sources, upgrade_span))
        .layer(middleware::from_fn_with_state(events, http_metrics::record))
}

async fn echo(
    State(state): State<WsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<UpgradeRequest, UpgradeError>,
) -> Response {
    upgrade(state, Route::Echo, None, peer, &uri, &headers, ws).await
}

async fn room(
    State(state): State<WsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<UpgradeRequest, UpgradeError>,
) -> Response {
    upgrade(state, Route::Rooms, Some(name), peer, &uri, &headers, ws).await
}

fn reject(
    events: &Events,
    route: Route,
    reason: RejectReason,
    status: StatusCode,
    client: IpAddr,
) -> Response {
    reject_with(events, route, reason, status, HeaderMap::new(), client)
}

/// Counts and logs a refused handshake and answers it; the reason also travels with the
/// response, so the upgrade span records it as `error.type`.
fn reject_with(
    events: &Events,
    route: Route,
    reason: RejectReason,
    status: StatusCode,
    headers: HeaderMap,
    client: IpAddr,
) -> Response {
    events.handshake_rejected(Some(route), reason);
    if events.log_allowed(LogEvent::HandshakeRejected) {
        tracing::info!(
            http.route = route.as_str(),
            error.type = reason.as_str(),
            client.address = %client,
            http.response.status_code = status.as_u16(),
            "handshake rejected"
        );
    }
    let mut response = (status, headers, reason.as_str()).into_response();
    response.extensions_mut().insert(reason);
    response
}

async fn upgrade(
    state: WsState,
    route: Route,
    room: Option<String>,
    peer: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
    ws: Result<UpgradeRequest, UpgradeError>,
) -> Response {
    let s = &state.inner;
    let events = &s.events;
    let client = s.sources.client_address(peer.ip(), headers);
    if s.shutdown.is_cancelled() {
        return reject(
            events,
            route,
            RejectReason::ShuttingDown,
            StatusCode::SERVICE_UNAVAILABLE,
            client,
        );
    }
    if let Some(name) = &room
        && !valid_room_name(name)
    {
        return reject(
            events,
            route,
            RejectReason::InvalidRoom,
            StatusCode::BAD_REQUEST,
            client,
        );
    }
    if !origin_allowed(headers, &s.allowed_origins) {
        return reject(
            events,
            route,
            RejectReason::OriginDenied,
            StatusCode::FORBIDDEN,
            client,
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(err) => {
            return reject_with(
                events,
                route,
                err.reason(),
                err.status(),
                err.headers(),
                client,
            );
        }
    };
    let grant = match &s.auth {
        None => None,
        Some(auth) => match auth.authorize(headers, uri, room.as_deref()) {
            Ok(grant) => Some(grant),
            Err(err) => return reject(events, route, err.reason(), err.status(), client),
        },
    };
    // Over the per-address limit, or serving a rate-limit penalty: 429 either way.
    let source = match s.sources.open(client) {
        Ok(slot) => slot,
        Err(refusal) => {
            let status = StatusCode::TOO_MANY_REQUESTS;
            return reject(events, route, refusal.reason(), status, client);
        }
    };
    let Ok(permit) = s.slots.clone().try_acquire_owned() else {
        return reject(
            events,
            route,
            RejectReason::ConnectionLimit,
            StatusCode::SERVICE_UNAVAILABLE,
            client,
        );
    };
    let may_publish = match (&grant, &room) {
        (Some(g), Some(room)) => g.may_publish(room),
        _ => true,
    };
    let expires_at = grant
        .as_ref()
        .map(|g| std::time::Instant::now() + g.remaining());
    let config = &s.config;
    // Terms beyond the TCP peer only when there are any: a plain echo connection pays nothing.
    let admission = (room.is_some() || grant.is_some() || client != peer.ip()).then(|| {
        let mut a = Admission::new(client, s.sources.clone());
        a.subject = grant.as_ref().map(|g| g.subject.clone());
        a.may_publish = may_publish;
        a.publish_rate = config.publish_rate;
        a.publish_burst = config.publish_burst;
        a.rate_limit_penalty = config.rate_limit_penalty;
        Box::new(a)
    });

    let kind = match room {
        None => ConnectionKind::Echo,
        // With a backplane this waits until NATS has the room's subscription (bounded), so the
        // member hears other instances from the moment it gets its 101.
        Some(name) => ConnectionKind::Room {
            reservation: s.rooms.reserve(&name).await,
            queue: config.outbound_queue as usize,
        },
    };
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    // Made here, inside the upgrade span, so the connection span is its child.
    let span = s.spans.as_ref().map(|spans| {
        Box::new(spans.connection(&tracing::Span::current().context(), id, route, kind.room()))
    });
    let pending = Box::new(Pending {
        ctx: ConnectionContext {
            id,
            route,
            events: events.clone(),
            shutdown: s.shutdown.clone(),
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            kind,
            span,
            spans: s.spans.clone(),
            peer,
            write_timeout: config.write_timeout,
            expires_at,
            admission,
        },
        permit,
        source,
    });
    ws.accept(s.socket_config, move |socket| pending.start(socket))
}

/// The socket settings every connection gets, made once: buffers (see [`READ_BUFFER`]) and the
/// message and frame size limit.
fn socket_config(max: usize) -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max + 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Everything a connection needs once upgraded, in one allocation: axum keeps the upgrade
/// callback alive as long as the connection, so it captures one pointer, not these fields.
struct Pending {
    ctx: ConnectionContext,
    /// The connection's slot, released when its task ends.
    permit: OwnedSemaphorePermit,
    /// Its place in its client address's count, released with it.
    source: OpenSlot,
}

impl Pending {
    /// The connection's task. `serve` contains a panic in the connection's handling itself
    /// (Close 1011); this is the last line, for a panic in its cleanup: the task must not leak
    /// its slot, the drop guard records the lifetime as `internal_error` as it unwinds, and the
    /// panic is counted here. Built from combinators, not an `async` block, so the connection
    /// future is stored once.
    #[allow(clippy::boxed_local)] // the box is what keeps axum's upgrade callback small
    fn start(self: Box<Self>, socket: Socket) -> impl std::future::Future<Output = ()> {
        let Pending {
            ctx,
            permit,
            source,
        } = *self;
        let (id, route, events) = (ctx.id, ctx.route, ctx.events.clone());
        AssertUnwindSafe(connection::serve(Box::new(socket), Box::new(ctx)))
            .catch_unwind()
            .map(move |outcome| {
                if let Err(panic) = outcome {
                    events.error(route, ErrorType::Panic);
                    tracing::error!(
                        connection.id = id as i64,
                        panic = crate::telemetry::logging::panic_message(&*panic),
                        "connection task panicked"
                    );
                }
                drop(permit);
                drop(source);
            })
    }
}

/// Longest `User-Agent` kept on a span: the header is client input.
const MAX_USER_AGENT: usize = 256;
/// Longest `url.path` kept on a span (and so in the log lines written inside it).
const MAX_PATH: usize = 256;

/// `s` cut to at most `max` characters.
fn capped(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// The upgrade request's `SERVER` span, with the HTTP semantic-convention attributes. Its parent
/// is the client's W3C `traceparent`, when valid; a malformed one starts a new trace and never
/// fails the upgrade. A refused handshake ends the span with error status and `error.type`;
/// `user_agent.original` is present only when the request has a `User-Agent`. `client.address`
/// is the client (what a trusted proxy forwarded), `network.peer.address` the TCP peer; the
/// query string (it may carry a token) is never recorded, and the path is cut to 256 characters.
async fn upgrade_span(State(sources): State<Sources>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let client = peer
        .map(|p| sources.client_address(p, req.headers()).to_string())
        .unwrap_or_default();
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .filter(|ua| !ua.is_empty())
        .map(|ua| ua.chars().take(MAX_USER_AGENT).collect::<String>());
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!(
        "http.server.request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        url.scheme = "http",
        url.path = capped(req.uri().path(), MAX_PATH),
        client.address = client,
        network.peer.address = peer,
        user_agent.original = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if let Some(ua) = user_agent {
        span.record("user_agent.original", ua);
    }
    if let Some(parent) = remote_parent(req.headers()) {
        let _ = span.set_parent(parent);
    }
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_client_error() || status.is_server_error() {
        span.record("otel.status_code", "error");
        // A refusal of the handler's names its reason; any other (404, 405 from the router)
        // the status code, as the HTTP semantic conventions say.
        match response.extensions().get::<RejectReason>() {
            Some(reason) => span.record("error.type", reason.as_str()),
            None => span.record("error.type", status.as_str()),
        };
    }
    response
}

/// A request without `Origin` (a non-browser client) passes. One with `Origin` passes when the
/// origin's host matches the `Host` header, or the origin is listed in `--allowed-origin`
/// (or `*` is). Everything else is cross-site WebSocket hijacking and gets 403.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if allowed.iter().any(|a| a == "*" || *a == origin) {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return false,
    };
    let strip = |a: &str| {
        a.strip_suffix(default_port)
            .map(str::to_owned)
            .unwrap_or_else(|| a.to_owned())
    };
    strip(authority) == strip(&host.trim().to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            m.insert(header::ORIGIN, o.parse().unwrap());
        }
        m
    }

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(&h(None, "a.example"), &none));
        assert!(origin_allowed(
            &h(Some("https://a.example"), "a.example"),
            &none
        ));
        assert!(origin_allowed(
            &h(Some("https://A.example:443"), "a.example"),
            &none
        ));
        assert!(origin_allowed(
            &h(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"),
            &none
        ));
        assert!(!origin_allowed(
            &h(Some("http://127.0.0.1:9999"), "127.0.0.1:8080"),
            &none
        ));
        assert!(!origin_allowed(
            &h(Some("https://evil.example"), "a.example"),
            &none
        ));
        assert!(!origin_allowed(&h(Some("null"), "a.example"), &none));
        assert!(!origin_allowed(
            &h(Some("https://a.example.evil.example"), "a.example"),
            &none
        ));
        let list = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(
            &h(Some("https://app.example/"), "api.example"),
            &list
        ));
        assert!(!origin_allowed(
            &h(Some("http://app.example"), "api.example"),
            &list
        ));
        assert!(origin_allowed(&h(Some("null"), "x"), &["*".to_owned()]));
    }
}
