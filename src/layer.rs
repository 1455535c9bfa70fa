//! [`WebSockets`]: the instrumentation an application's WebSocket routes share, and the
//! [`WebSocketLayer`] that puts it in front of them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::sources::{SourceLimits, Sources};
use crate::telemetry::traces::remote_parent;
use crate::telemetry::{Events, RejectReason, Route, Spans, Telemetry};

/// tungstenite reads into a buffer of this size. Its default (128 KiB, allocated up front and
/// zero-filled before every read) dominated both idle memory and echo CPU.
const READ_BUFFER: usize = 1024;
/// Written frames are collected up to this size before a write is forced.
const WRITE_BUFFER: usize = 8 * 1024;
/// Longest `User-Agent` kept on a span: the header is client input.
const MAX_USER_AGENT: usize = 256;
/// Longest `url.path` kept on a span (and so in the log lines written inside it).
const MAX_PATH: usize = 256;

/// The instrumentation shared by an application's WebSocket routes: the telemetry they record
/// to, their limits, and the shutdown that closes them. Cheap to clone.
///
/// Build it once with [`WebSockets::builder`], put [`WebSockets::layer`] on the router that
/// holds the WebSocket routes, and take a [`WebSocketUpgrade`](crate::WebSocketUpgrade) in
/// their handlers.
///
/// ```
/// use axum::{Router, routing::get};
/// use wsotel::{Telemetry, WebSockets, WebSocketUpgrade};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let telemetry = Telemetry::from_env()?;
/// let sockets = WebSockets::builder(&telemetry).build();
/// let app: Router = Router::new()
///     .route("/ws", get(|ws: WebSocketUpgrade| async move {
///         ws.on_upgrade(|mut socket| async move {
///             while let Some(msg) = socket.recv().await {
///                 if socket.send(msg).await.is_err() {
///                     break;
///                 }
///             }
///         })
///     }))
///     .layer(sockets.layer());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WebSockets {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) events: Events,
    pub(crate) spans: Option<Arc<Spans>>,
    /// Cancelled by [`WebSockets::shutdown`].
    pub(crate) shutdown: CancellationToken,
    /// The open connections against `max_connections`.
    pub(crate) gate: Arc<Gate>,
    pub(crate) next_id: AtomicU64,
    /// Lower-cased, without a trailing `/`.
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) sources: Sources,
    pub(crate) socket_config: tungstenite::protocol::WebSocketConfig,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) write_timeout: Duration,
}

/// The open connections against the connection limit, and the shutdown flag the connections
/// check before every write.
pub(crate) struct Gate {
    open: AtomicUsize,
    max: usize,
    /// Woken when the last connection closes.
    idle: Notify,
    /// Set by [`WebSockets::shutdown`] (before the token is cancelled).
    stopping: AtomicBool,
}

impl Gate {
    /// A place for one more connection, if the limit allows.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<GateSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| GateSlot(self.clone()))
    }

    async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One open connection's place in the [`Gate`], given back when dropped.
pub(crate) struct GateSlot(Arc<Gate>);

impl GateSlot {
    /// Whether the server is shutting down (one load, cheap enough for every write).
    #[inline]
    pub(crate) fn stopping(&self) -> bool {
        self.0.stopping.load(Ordering::Relaxed)
    }
}

impl Drop for GateSlot {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Builds [`WebSockets`]; every setting has the `wsotel` server's default.
#[must_use]
pub struct WebSocketsBuilder {
    events: Events,
    spans: Option<Arc<Spans>>,
    max_message_size: usize,
    max_connections: u32,
    ping_interval: Duration,
    pong_timeout: Duration,
    write_timeout: Duration,
    allowed_origins: Vec<String>,
    sources: Option<Sources>,
    routes: Vec<String>,
}

impl WebSockets {
    /// Starts building the instrumentation of WebSocket routes that record to `telemetry`.
    pub fn builder(telemetry: &Telemetry) -> WebSocketsBuilder {
        WebSocketsBuilder {
            events: telemetry.events().clone(),
            spans: telemetry.spans().cloned().map(Arc::new),
            max_message_size: 64 * 1024,
            max_connections: 10_000,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            sources: None,
            routes: Vec::new(),
        }
    }

    /// The tower layer for the router holding the WebSocket routes: it records
    /// `http.server.request.duration` and the upgrade request's `SERVER` span for every
    /// request through it, and hands [`WebSocketUpgrade`](crate::WebSocketUpgrade) this
    /// instrumentation. Add it with `Router::layer`, after the routes.
    pub fn layer(&self) -> WebSocketLayer {
        WebSocketLayer {
            sockets: self.clone(),
        }
    }

    /// Starts the shutdown: new upgrades get 503 (`shutting_down`), and every open connection
    /// is closed with 1001 (its closing handshake awaited) at its next read or write. Wait for
    /// them with [`WebSockets::drained`].
    pub fn shutdown(&self) {
        self.shared
            .gate
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.shutdown.cancel();
    }

    /// Whether [`WebSockets::shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Connections open right now (upgraded and not yet finished).
    pub fn open_connections(&self) -> usize {
        self.shared
            .gate
            .open
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until no connection is open (each is counted until its `WebSocket` is dropped,
    /// wherever the application moved it).
    pub async fn drained(&self) {
        self.shared.gate.drained().await
    }

    /// Refuses a request to a WebSocket route before [`WebSocketUpgrade`](crate::WebSocketUpgrade)
    /// checks it (from an extractor of the application's that runs first, say): counted in
    /// `rejected_connections` by `reason` on the request's route, logged within the budget, and
    /// recorded on the upgrade span as `error.type`.
    pub fn refuse(
        &self,
        parts: &axum::http::request::Parts,
        reason: RejectReason,
        status: StatusCode,
    ) -> Response {
        let s = &self.shared;
        let template = parts
            .extensions
            .get::<MatchedPath>()
            .map_or(crate::telemetry::Route::OTHER.as_str(), |p| p.as_str());
        let route = s.events.route(template);
        let peer = peer_of(&parts.extensions).unwrap_or(UNKNOWN_PEER);
        let client = s.sources.client_address(peer.ip(), &parts.headers);
        refusal(&s.events, route, reason, status, HeaderMap::new(), client)
    }

    /// The per-address counts and limits (shared with an accept loop that counts sockets
    /// before their upgrade, as the `wsotel` server's does).
    pub fn sources(&self) -> &Sources {
        &self.shared.sources
    }
}

impl WebSocketsBuilder {
    /// Largest message (and frame) accepted, in bytes; a larger one closes the connection with
    /// 1009. Default 64 KiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Most connections open at once; upgrades beyond get 503 (`connection_limit`). Default
    /// 10 000.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How often the server pings each connection (at least 1 ms). Default 20 s.
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every.max(Duration::from_millis(1));
        self
    }

    /// How long a ping may go unanswered before the connection is cut
    /// (`heartbeat_timeout`; at least 1 ms). Default 10 s.
    pub fn pong_timeout(mut self, timeout: Duration) -> Self {
        self.pong_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long a write may make no progress before the connection is cut (`write_timeout`):
    /// a client that stops reading cannot hold the server's memory. Default 10 s.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Origins allowed besides the request's own host (`*`: any). A browser request from any
    /// other origin gets 403 (`origin_denied`): cross-site WebSocket hijacking.
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// Per-address limits and the proxies whose `X-Forwarded-For` is believed. Default: no
    /// per-address limit, no trusted proxy.
    pub fn sources(mut self, sources: Sources) -> Self {
        self.sources = Some(sources);
        self
    }

    /// Declares a route template served by this instrumentation, so that its series
    /// (errors, drops) read 0 from the first scrape instead of appearing with the first
    /// connection: alerts on rates then work from the start.
    pub fn route(mut self, template: impl Into<String>) -> Self {
        self.routes.push(template.into());
        self
    }

    /// The instrumentation, ready for [`WebSockets::layer`].
    pub fn build(self) -> WebSockets {
        for route in &self.routes {
            self.events.route(route);
        }
        let saturation = self.events.saturation();
        saturation.connection_limit.store(
            u64::from(self.max_connections),
            std::sync::atomic::Ordering::Relaxed,
        );
        let max = self.max_message_size;
        let socket_config = tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let sources = self.sources.unwrap_or_else(|| {
            Sources::new(SourceLimits {
                max_pending: u32::MAX,
                max_pending_per_ip: u32::MAX,
                max_open_per_ip: 0,
                max_sockets: u64::MAX,
                trusted_proxies: Vec::new(),
            })
        });
        WebSockets {
            shared: Arc::new(Shared {
                events: self.events,
                spans: self.spans,
                shutdown: CancellationToken::new(),
                gate: Arc::new(Gate {
                    open: AtomicUsize::new(0),
                    max: self.max_connections as usize,
                    idle: Notify::new(),
                    stopping: AtomicBool::new(false),
                }),
                next_id: AtomicU64::new(1),
                allowed_origins: self
                    .allowed_origins
                    .iter()
                    .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                    .collect(),
                sources,
                socket_config,
                ping_interval: self.ping_interval,
                pong_timeout: self.pong_timeout,
                write_timeout: self.write_timeout,
            }),
        }
    }
}

/// The tower layer of [`WebSockets::layer`].
#[derive(Clone)]
pub struct WebSocketLayer {
    sockets: WebSockets,
}

impl<S> tower::Layer<S> for WebSocketLayer {
    type Service = WebSocketService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WebSocketService {
            inner,
            sockets: self.sockets.clone(),
        }
    }
}

/// The service of [`WebSocketLayer`].
#[derive(Clone)]
pub struct WebSocketService<S> {
    inner: S,
    sockets: WebSockets,
}

impl<S> tower::Service<Request> for WebSocketService<S>
where
    S: tower::Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // The clone is the one that is not ready; the ready one serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.sockets.shared.clone();
        let span = upgrade_span(&req, &shared.sources);
        req.extensions_mut().insert(self.sockets.clone());
        let started = Instant::now();
        let method = crate::http_metrics::method_name(req.method());
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned());
        Box::pin(async move {
            let response = inner.call(req).instrument(span.clone()).await?;
            let status = response.status();
            shared
                .events
                .http_request(method, route, status.as_u16(), started.elapsed());
            span.record("http.response.status_code", i64::from(status.as_u16()));
            if status.is_client_error() || status.is_server_error() {
                span.record("otel.status_code", "error");
                // A refusal of the handler's names its reason; any other (404, 405 from the
                // router) the status code, as the HTTP semantic conventions say.
                match response.extensions().get::<RejectReason>() {
                    Some(reason) => span.record("error.type", reason.as_str()),
                    None => span.record("error.type", status.as_str()),
                };
            }
            Ok(response)
        })
    }
}

/// The upgrade request's `SERVER` span, with the HTTP semantic-convention attributes. Its parent
/// is the client's W3C `traceparent`, when valid; a malformed one starts a new trace and never
/// fails the upgrade. `user_agent.original` is present only when the request has a
/// `User-Agent`. `client.address` is the client (what a trusted proxy forwarded),
/// `network.peer.address` the TCP peer; the query string (it may carry a token) is never
/// recorded, and the path is cut to 256 characters.
fn upgrade_span(req: &Request, sources: &Sources) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let peer = peer_of(req.extensions());
    let client = peer
        .map(|p| sources.client_address(p.ip(), req.headers()).to_string())
        .unwrap_or_default();
    let peer = peer.map(|p| p.ip().to_string()).unwrap_or_default();
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
    span
}

/// Counts and logs a refused upgrade and answers it; the reason also travels with the
/// response, so the upgrade span records it as `error.type`.
pub(crate) fn refusal(
    events: &Events,
    route: Route,
    reason: RejectReason,
    status: StatusCode,
    headers: HeaderMap,
    client: IpAddr,
) -> Response {
    events.handshake_rejected(Some(route), reason, Some(status.as_u16()), client);
    let mut response = (status, headers, reason.as_str()).into_response();
    response.extensions_mut().insert(reason);
    response
}

/// The TCP peer, when the server was started with `ConnectInfo<SocketAddr>`.
pub(crate) fn peer_of(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// `s` cut to at most `max` characters.
fn capped(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// A request without `Origin` (a non-browser client) passes. One with `Origin` passes when the
/// origin's host matches the `Host` header, or the origin is listed in `allowed` (or `*` is).
/// Everything else is cross-site WebSocket hijacking and gets 403.
pub fn origin_allowed(headers: &axum::http::HeaderMap, allowed: &[String]) -> bool {
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

/// An address to stand for a peer the server did not say (served without
/// `ConnectInfo<SocketAddr>`): counted against no per-address limit.
pub(crate) const UNKNOWN_PEER: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

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
