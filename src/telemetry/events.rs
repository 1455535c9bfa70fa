//! Events: what happened to a connection or a handshake, each written to its metric, its log
//! line and its span attributes from one definition here.
//!
//! Handlers never touch an instrument or write these log lines themselves: they call an event
//! (`connection_opened`, `connection_closed`, `handshake_rejected`, `connection_error`,
//! `panicked`...). Log fields use the span attributes' names (`websocket.messages.received`,
//! not a second spelling), and every connection-level line is within the per-event log budget
//! (counted in `websocket.server.log.suppressed` when held back), except a panic's.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundHistogram, Meter};
use opentelemetry::trace::{Span as _, SpanContext};

use super::instruments::{Instruments, RouteInstruments};
use super::labels::{
    CloseInitiator, CloseReason, Direction, DropReason, ErrorType, RejectReason, Route,
};
use super::log_limit::{LogEvent, LogLimiter};
use super::traces::in_span;

const ROUTE: &str = "http.route";
const DIRECTION: &str = "network.io.direction";
const CLOSE_REASON: &str = "websocket.close.reason";
const CLOSE_INITIATOR: &str = "websocket.close.initiator";
const LOG_EVENT: &str = "event";
const ERROR_TYPE: &str = "error.type";
const DROP_REASON: &str = "reason";

/// A connection's info line: who it is (`connection.id`, `http.route`, `client.address`,
/// `network.peer.address`, `network.peer.port`, `user.id`, `websocket.room`), then the
/// event's own fields. One list, so the opening and closing lines always name the same things.
macro_rules! connection_line {
    ($who:expr, $message:literal $(, $($field:tt)*)?) => {
        tracing::info!(
            connection.id = $who.id as i64,
            http.route = $who.route.as_str(),
            client.address = %$who.client(),
            network.peer.address = %$who.peer.ip(),
            network.peer.port = $who.peer.port(),
            user.id = $who.user(),
            websocket.room = $who.room(),
            $($($field)*)?
            $message
        )
    };
}

/// How often the per-message tallies are handed to the SDK between collections.
const TALLY_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) type RouteRegistry = RwLock<HashMap<&'static str, Arc<RouteInstruments>>>;

/// The routes seen so far, out of the registry's lock.
pub(crate) fn routes_of(routes: &RouteRegistry) -> Vec<Arc<RouteInstruments>> {
    routes
        .read()
        .expect("route registry poisoned")
        .values()
        .cloned()
        .collect()
}

/// Hands every route's per-message tallies over (SDK counters, histogram totals).
fn collect_tallies(routes: &RouteRegistry) {
    for route in routes_of(routes) {
        route.collect();
    }
}

/// The recording side of telemetry that the server holds: cheap to clone.
#[derive(Clone)]
pub struct Events {
    inner: Arc<EventsInner>,
}

struct EventsInner {
    instruments: Instruments,
    /// Each route's bound instruments, made when the route is first seen (at most
    /// [`Route::MAX`]).
    routes: Arc<RouteRegistry>,
    ping: BoundHistogram<f64>,
    logs: LogLimiter,
    /// What the saturation gauges read: set by the server when it starts.
    saturation: Arc<Saturation>,
}

/// The limits and the counts measured against them, read by observable gauges at collection.
#[derive(Default)]
pub struct Saturation {
    /// `--max-connections` (0 until the server starts).
    pub connection_limit: std::sync::atomic::AtomicU64,
    /// `--max-pending-handshakes` (0 until the server starts).
    pub pending_limit: std::sync::atomic::AtomicU64,
    /// Reads the sockets that have not finished their upgrade, once the server runs.
    pub pending: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Whether the backplane is connected, once one is configured.
    pub backplane: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>>,
    /// Whether the backplane has ever connected (a later connect is a reconnect).
    pub backplane_seen: std::sync::atomic::AtomicBool,
}

impl Events {
    /// Every instrument on `meter`; `routes` is where each route's instruments go when the
    /// route is first seen (shared with what reads the per-message histograms).
    pub(crate) fn new(meter: &Meter, routes: Arc<RouteRegistry>) -> Self {
        let instruments = Instruments::new(meter);
        let saturation = Arc::new(Saturation::default());
        let r = routes.clone();
        // Observes nothing, so it is never exported: the SDK runs observable callbacks before
        // each reader aggregates, and this one hands every route's per-thread message tallies
        // to its SDK instruments, so each scrape and export counts every message recorded
        // before it.
        meter
            .u64_observable_gauge("wsotel.internal.tally")
            .with_description("Not exported: takes in the per-message tallies at collection.")
            .with_callback(move |_| collect_tallies(&r))
            .build();
        // Between collections too, every second: what a collection hands over stays at most a
        // second of traffic, however rarely anyone scrapes (nobody, with no OTLP and no
        // Prometheus), so a scrape never stalls on an hour of backlog.
        let r = Arc::downgrade(&routes);
        let spawned = std::thread::Builder::new()
            .name("wsotel-tally".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TALLY_INTERVAL);
                    let Some(routes) = r.upgrade() else { return };
                    collect_tallies(&routes);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the tally thread: metrics are handed over at collection only");
        }
        let s = saturation.clone();
        meter
            .i64_observable_up_down_counter("websocket.server.connection.limit")
            .with_unit("{connection}")
            .with_description("--max-connections: upgrades beyond it get 503 (connection_limit).")
            .with_callback(move |o| {
                let limit = s
                    .connection_limit
                    .load(std::sync::atomic::Ordering::Relaxed);
                if limit > 0 {
                    o.observe(limit as i64, &[]);
                }
            })
            .build();
        let s = saturation.clone();
        meter
            .i64_observable_up_down_counter("websocket.server.pending_connections")
            .with_unit("{connection}")
            .with_description("Sockets that have not finished their upgrade.")
            .with_callback(move |o| {
                if let Some(read) = s.pending.get() {
                    o.observe(read() as i64, &[]);
                }
            })
            .build();
        let s = saturation.clone();
        meter
            .i64_observable_up_down_counter("websocket.server.backplane.connected")
            .with_unit("{connection}")
            .with_description(
                "1 while the NATS backplane is connected, 0 while not (only with --nats-url).",
            )
            .with_callback(move |o| {
                if let Some(up) = s.backplane.get() {
                    o.observe(
                        i64::from(up.load(std::sync::atomic::Ordering::Relaxed)),
                        &[],
                    );
                }
            })
            .build();
        let s = saturation.clone();
        meter
            .i64_observable_up_down_counter("websocket.server.pending_connections.limit")
            .with_unit("{connection}")
            .with_description(
                "--max-pending-handshakes: sockets beyond it are closed at once (pending_limit).",
            )
            .with_callback(move |o| {
                let limit = s.pending_limit.load(std::sync::atomic::Ordering::Relaxed);
                if limit > 0 {
                    o.observe(limit as i64, &[]);
                }
            })
            .build();
        let ping = instruments.ping_duration.bind(&[]);
        // Series that should read 0 rather than be absent before the first event, so rates and
        // alerts work from the first scrape. Every value is from a bounded set.
        instruments.rooms.add(0, &[]);
        for e in LogEvent::ALL {
            instruments
                .log_suppressed
                .add(0, &[KeyValue::new(LOG_EVENT, e.as_str())]);
        }
        Events {
            inner: Arc::new(EventsInner {
                instruments,
                routes,
                ping,
                logs: LogLimiter::new(0),
                saturation,
            }),
        }
    }

    /// A backplane is configured: its gauge reads `connected`, and its counters start at 0.
    /// Dropped room messages are counted on `route`.
    pub fn backplane_configured(
        &self,
        connected: Arc<std::sync::atomic::AtomicBool>,
        route: Route,
    ) {
        let _ = self.inner.saturation.backplane.set(connected);
        let i = &self.inner.instruments;
        for d in Direction::ALL {
            let attrs = [KeyValue::new(DIRECTION, d.as_str())];
            i.backplane_messages.add(0, &attrs);
            i.backplane_io.add(0, &attrs);
        }
        i.backplane_reconnects.add(0, &[]);
        for e in super::labels::BACKPLANE_ERROR_TYPES {
            i.backplane_errors.add(0, &[KeyValue::new(ERROR_TYPE, e)]);
        }
        for d in [DropReason::BackplaneUnavailable, DropReason::BackplaneFull] {
            let attrs = [
                KeyValue::new(ROUTE, route.as_str()),
                KeyValue::new(DROP_REASON, d.as_str()),
            ];
            i.dropped.add(0, &attrs);
        }
    }

    /// Whether the backplane has connected before.
    pub fn backplane_was_connected(&self) -> bool {
        self.inner
            .saturation
            .backplane_seen
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The backplane connected to NATS (`reconnected`: after a loss, when it counts in
    /// `websocket.server.backplane.reconnects`). Logged once per transition.
    pub fn backplane_connected(&self, reconnected: bool) {
        if reconnected {
            self.inner.instruments.backplane_reconnects.add(1, &[]);
            tracing::info!("backplane: reconnected to NATS; subscriptions restored");
        } else {
            tracing::info!("backplane: connected to NATS");
        }
        self.inner
            .saturation
            .backplane_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The backplane lost NATS (the `backplane.connected` gauge reads the flag). Logged once
    /// per transition.
    pub fn backplane_disconnected(&self) {
        tracing::warn!(
            "backplane: disconnected from NATS; room messages stay local (counted dropped, \
             backplane_unavailable) until it is back"
        );
    }

    /// A backplane failure, counted in `websocket.server.backplane.errors` by `error_type`
    /// (from the fixed set in `backplane`), and logged when `log` (the caller keeps repeated
    /// failures to one line per transition).
    pub fn backplane_failed(
        &self,
        error_type: &'static str,
        detail: Option<&dyn std::fmt::Display>,
        log: bool,
    ) {
        self.backplane_error(error_type);
        let message = match error_type {
            "slow_consumer" => "backplane: NATS dropped messages for a slow subscription",
            "server_error" => "backplane: NATS server error",
            "client_error" => "backplane: NATS client error",
            _ => "backplane: failure",
        };
        let detail = detail.map(tracing::field::display);
        if log {
            tracing::warn!(error.type = error_type, error = detail, "{message}");
        } else {
            tracing::debug!(error.type = error_type, error = detail, "{message}");
        }
    }

    /// Counts a backplane failure (`error_type` from the fixed set in `backplane`) without
    /// logging it (see [`Events::backplane_failed`]).
    pub fn backplane_error(&self, error_type: &'static str) {
        self.inner
            .instruments
            .backplane_errors
            .add(1, &[KeyValue::new(ERROR_TYPE, error_type)]);
    }

    /// A room message of `len` payload bytes was published (`transmit`) or received.
    pub fn backplane_message(&self, transmit: bool, len: usize) {
        let d = if transmit {
            Direction::Transmit
        } else {
            Direction::Receive
        };
        let attrs = [KeyValue::new(DIRECTION, d.as_str())];
        self.inner.instruments.backplane_messages.add(1, &attrs);
        self.inner.instruments.backplane_io.add(len as u64, &attrs);
    }

    /// The hop of a message from the backplane, in seconds.
    pub fn backplane_hop(&self, secs: f64) {
        self.inner.instruments.backplane_hop.record(secs, &[]);
    }

    /// The limits the saturation gauges report, and where they read live counts.
    pub fn saturation(&self) -> &Saturation {
        &self.inner.saturation
    }

    /// Whether a connection-level log line of `event` may be written now (see
    /// [`LogLimiter`]); one held back is counted in `websocket.server.log.suppressed`.
    pub fn log_allowed(&self, event: LogEvent) -> bool {
        if self.inner.logs.allow(event) {
            return true;
        }
        self.inner
            .instruments
            .log_suppressed
            .add(1, &[KeyValue::new(LOG_EVENT, event.as_str())]);
        false
    }

    /// The log budget.
    pub fn log_limiter(&self) -> &LogLimiter {
        &self.inner.logs
    }

    /// The route of `template` (an application's route template, such as axum's
    /// `MatchedPath`): the first [`Route::MAX`] distinct templates are recorded as they are,
    /// with their error and drop series starting at 0; later ones as [`Route::OTHER`].
    pub fn route(&self, template: &str) -> Route {
        self.instruments_of(template).route()
    }

    /// The bound per-message instruments of `template` (see [`Events::route`]).
    pub fn instruments_of(&self, template: &str) -> Arc<RouteInstruments> {
        if let Some(r) = self
            .inner
            .routes
            .read()
            .expect("route registry poisoned")
            .get(template)
        {
            return r.clone();
        }
        let mut routes = self.inner.routes.write().expect("route registry poisoned");
        if let Some(r) = routes.get(template) {
            return r.clone();
        }
        let route = if routes.len() < Route::MAX {
            // Leaked once per distinct template, and there are at most `Route::MAX` of them.
            Route::from_static(Box::leak(template.to_owned().into_boxed_str()))
        } else if let Some(other) = routes.get(Route::OTHER.as_str()) {
            return other.clone();
        } else {
            Route::OTHER
        };
        let instruments = Arc::new(RouteInstruments::new(&self.inner.instruments, route));
        let i = &self.inner.instruments;
        let r = KeyValue::new(ROUTE, route.as_str());
        for e in ErrorType::ALL {
            i.errors
                .add(0, &[r.clone(), KeyValue::new(ERROR_TYPE, e.as_str())]);
        }
        // The backplane's reasons start at 0 only when a backplane is configured.
        for d in [DropReason::SlowConsumer, DropReason::ConnectionClosed] {
            i.dropped
                .add(0, &[r.clone(), KeyValue::new(DROP_REASON, d.as_str())]);
        }
        routes.insert(route.as_str(), instruments.clone());
        instruments
    }

    /// A handshake completed on the route `instruments` belong to: counts it, and returns the
    /// guard that keeps the connection in `active_connections` until it is dropped, on every
    /// path out of the connection.
    pub fn connection_opened(&self, instruments: Arc<RouteInstruments>) -> ConnectionGuard {
        instruments.accepted.add(1);
        instruments.active.add(1);
        ConnectionGuard {
            events: self.clone(),
            route: instruments,
            opened_at: Instant::now(),
            closed: false,
        }
    }

    /// A handshake was refused: counted by `error.type`, and logged within the budget. With a
    /// route, the refusal is the handler's (`handshake rejected`, with the status it answered);
    /// without, the socket was refused before any request (a limit, a timeout, a request head
    /// too large or malformed).
    pub fn handshake_rejected(
        &self,
        route: Option<Route>,
        reason: RejectReason,
        status: Option<u16>,
        client: IpAddr,
    ) {
        let e = KeyValue::new(ERROR_TYPE, reason.as_str());
        let rejected = &self.inner.instruments.rejected;
        match route {
            Some(r) => rejected.add(1, &[KeyValue::new(ROUTE, r.as_str()), e]),
            None => rejected.add(1, &[e]),
        }
        if !self.log_allowed(LogEvent::HandshakeRejected) {
            return;
        }
        match route {
            Some(route) => tracing::info!(
                http.route = route.as_str(),
                error.type = reason.as_str(),
                client.address = %client,
                http.response.status_code = status.map(i64::from),
                "handshake rejected"
            ),
            None => tracing::info!(
                error.type = reason.as_str(),
                client.address = %client,
                "connection refused before the upgrade"
            ),
        }
    }

    /// Something went wrong on an open connection: counted by `error.type` and logged (within
    /// the budget) with the connection span's ids, at warn (info for a client's protocol
    /// error), with `detail` when there is one.
    pub fn connection_error(
        &self,
        route: Route,
        kind: ErrorType,
        detail: Option<&dyn std::fmt::Display>,
        span: Option<&SpanContext>,
    ) {
        self.error(route, kind);
        if !self.log_allowed(LogEvent::ConnectionError) {
            return;
        }
        let message = error_message(kind);
        let detail = detail.map(tracing::field::display);
        in_span(span, || match kind {
            ErrorType::Protocol | ErrorType::MessageTooBig | ErrorType::InvalidUtf8 => {
                tracing::info!(error.type = kind.as_str(), error = detail, "{message}")
            }
            _ => tracing::warn!(error.type = kind.as_str(), error = detail, "{message}"),
        });
    }

    /// A connection's handler panicked (a bug): counted as `errors{error.type=panic}` and
    /// logged every time (no budget), with the connection span's ids.
    pub fn panicked(&self, route: Route, id: u64, panic: &str, span: Option<&SpanContext>) {
        self.error(route, ErrorType::Panic);
        in_span(span, || {
            tracing::error!(
                connection.id = id as i64,
                panic,
                "connection handler panicked: closing with 1011"
            )
        });
    }

    /// A connection is open: its `connection opened` line (within the budget).
    pub fn connection_logged_open(&self, who: &Identity, span: Option<&SpanContext>) {
        if !self.log_allowed(LogEvent::ConnectionOpened) {
            return;
        }
        in_span(span, || connection_line!(who, "connection opened"));
    }

    /// A connection ended: its lifetime in `websocket.server.connection.duration` (by reason
    /// and initiator; the guard also leaves `active_connections`), its `connection closed` line
    /// (within the budget), and its span's closing attributes, status and end.
    pub fn connection_closed(
        &self,
        guard: &mut ConnectionGuard,
        who: &Identity,
        closed: Closed,
        totals: Totals,
        span: Option<&mut opentelemetry_sdk::trace::Span>,
    ) {
        let lifetime = guard.closed(closed.reason, closed.initiator);
        let reason = closed.reason.as_str();
        let initiator = closed.initiator.as_str();
        if self.log_allowed(LogEvent::ConnectionClosed) {
            in_span(span.as_deref().map(|s| s.span_context()), || {
                connection_line!(
                    who,
                    "connection closed",
                    websocket.close.code = closed.code.map(i64::from),
                    websocket.close.reason = reason,
                    websocket.close.initiator = initiator,
                    websocket.connection.duration_ms = lifetime.as_millis() as i64,
                    websocket.messages.received = totals.messages_received as i64,
                    websocket.messages.sent = totals.messages_sent as i64,
                    websocket.bytes.received = totals.bytes_received as i64,
                    websocket.bytes.sent = totals.bytes_sent as i64,
                )
            });
        }
        let Some(span) = span else {
            return;
        };
        if span.is_recording() {
            if closed.reason == CloseReason::InternalError
                && closed.initiator == CloseInitiator::Server
            {
                span.set_status(opentelemetry::trace::Status::error(reason));
            }
            if let Some(code) = closed.code {
                span.set_attribute(KeyValue::new("websocket.close.code", i64::from(code)));
            }
            if let Some(user) = who.user() {
                span.set_attribute(KeyValue::new("user.id", user.to_owned()));
            }
            span.set_attributes([
                KeyValue::new("client.address", who.client().to_string()),
                KeyValue::new(CLOSE_REASON, reason),
                KeyValue::new(CLOSE_INITIATOR, initiator),
                KeyValue::new(
                    "websocket.messages.received",
                    totals.messages_received as i64,
                ),
                KeyValue::new("websocket.messages.sent", totals.messages_sent as i64),
                KeyValue::new("websocket.bytes.received", totals.bytes_received as i64),
                KeyValue::new("websocket.bytes.sent", totals.bytes_sent as i64),
            ]);
        }
        span.end();
    }

    /// Counts an error on an open connection without logging it (see
    /// [`Events::connection_error`]).
    pub fn error(&self, route: Route, kind: ErrorType) {
        self.inner.instruments.errors.add(
            1,
            &[
                KeyValue::new(ROUTE, route.as_str()),
                KeyValue::new(ERROR_TYPE, kind.as_str()),
            ],
        );
    }

    /// `count` messages were accepted for delivery but will never be sent.
    pub fn dropped(&self, route: Route, reason: DropReason, count: u64) {
        if count == 0 {
            return;
        }
        self.inner.instruments.dropped.add(
            count,
            &[
                KeyValue::new(ROUTE, route.as_str()),
                KeyValue::new(DROP_REASON, reason.as_str()),
            ],
        );
    }

    /// A heartbeat pong came back after `rtt`.
    pub fn ping_round_trip(&self, rtt: Duration) {
        self.inner.ping.record(rtt.as_secs_f64());
    }

    /// A room got its first member.
    pub fn room_created(&self) {
        self.inner.instruments.rooms.add(1, &[]);
    }

    /// A room lost its last member.
    pub fn room_removed(&self) {
        self.inner.instruments.rooms.add(-1, &[]);
    }

    /// An HTTP request finished (`http.server.request.duration`). `route` is the matched
    /// template (bounded by the application's route table), or `None` when nothing matched; a
    /// scanner probing random paths adds no series. `method` must already be normalised to a
    /// known method or `_OTHER`.
    pub fn http_request(
        &self,
        method: &'static str,
        route: Option<String>,
        status: u16,
        elapsed: Duration,
    ) {
        let method = KeyValue::new("http.request.method", method);
        let status = KeyValue::new("http.response.status_code", i64::from(status));
        let scheme = KeyValue::new("url.scheme", "http");
        let secs = elapsed.as_secs_f64();
        let duration = &self.inner.instruments.http_duration;
        match route {
            Some(r) => duration.record(secs, &[method, KeyValue::new(ROUTE, r), status, scheme]),
            None => duration.record(secs, &[method, status, scheme]),
        }
    }
}

/// Holds one open connection in `websocket.server.active_connections`. Dropping it, on any
/// path including a panic, takes the connection out again; [`ConnectionGuard::closed`] also
/// records its lifetime with the close reason.
pub struct ConnectionGuard {
    events: Events,
    route: Arc<RouteInstruments>,
    opened_at: Instant,
    /// Set by `closed`; a guard dropped without it (a panic) records `internal_error`.
    closed: bool,
}

impl ConnectionGuard {
    /// The bound instruments of this connection's route.
    pub fn instruments(&self) -> &RouteInstruments {
        &self.route
    }

    /// The shared events handle.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// How long the connection has been open.
    pub fn age(&self) -> Duration {
        self.opened_at.elapsed()
    }

    /// The connection ended for `reason`, decided by `initiator`: records its lifetime and
    /// returns it.
    pub fn closed(&mut self, reason: CloseReason, initiator: CloseInitiator) -> Duration {
        self.closed = true;
        self.record_lifetime(reason, initiator)
    }

    fn record_lifetime(&self, reason: CloseReason, initiator: CloseInitiator) -> Duration {
        let age = self.age();
        self.events.inner.instruments.connection_duration.record(
            age.as_secs_f64(),
            &[
                KeyValue::new(ROUTE, self.route.route.as_str()),
                KeyValue::new(CLOSE_REASON, reason.as_str()),
                KeyValue::new(CLOSE_INITIATOR, initiator.as_str()),
            ],
        );
        age
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if !self.closed {
            self.record_lifetime(CloseReason::InternalError, CloseInitiator::Server);
        }
        self.route.active.add(-1);
    }
}

/// The log message of each connection error.
fn error_message(kind: ErrorType) -> &'static str {
    match kind {
        ErrorType::MessageTooBig => "message too big: closing with 1009",
        ErrorType::InvalidUtf8 => "invalid utf-8: closing with 1007",
        ErrorType::Protocol => "protocol error: closing with 1002",
        ErrorType::Io => "connection I/O error",
        ErrorType::HeartbeatTimeout => "heartbeat timeout: no pong",
        ErrorType::SlowConsumer => "slow consumer disconnected",
        ErrorType::Panic => "connection handler panicked: closing with 1011",
        ErrorType::RateLimited => "publish rate exceeded: closing with 1008",
        ErrorType::WriteTimeout => "write timeout: the client is not reading",
        ErrorType::PublishForbidden => "publish not allowed: closing with 1008",
    }
}

/// Who is on a connection, for its log lines and span (never a metric).
#[derive(Debug)]
pub struct Identity {
    /// Unique per process.
    pub id: u64,
    /// The route it came in on.
    pub route: Route,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// What only some connections have, boxed: every idle connection pays for what it holds
    /// inline.
    pub more: Option<Box<MoreIdentity>>,
}

/// The rarer parts of an [`Identity`].
#[derive(Debug, Default)]
pub struct MoreIdentity {
    /// The client, when a trusted proxy forwarded its address (else the TCP peer is).
    pub client: Option<IpAddr>,
    /// The authenticated user (`user.id`).
    pub user: Option<String>,
    /// The room, channel or topic the connection is in (`websocket.room`).
    pub room: Option<String>,
}

impl Identity {
    /// The client's address: the one a trusted proxy forwarded, else the TCP peer's.
    pub fn client(&self) -> IpAddr {
        self.more
            .as_ref()
            .and_then(|m| m.client)
            .unwrap_or(self.peer.ip())
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.more.as_ref().and_then(|m| m.user.as_deref())
    }

    /// The room, if any.
    pub fn room(&self) -> Option<&str> {
        self.more.as_ref().and_then(|m| m.room.as_deref())
    }
}

/// How a connection ended, for its metric, log line and span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// Why.
    pub reason: CloseReason,
    /// Who decided.
    pub initiator: CloseInitiator,
    /// The close code of the connection, whichever side sent the first Close.
    pub code: Option<u16>,
}

/// A connection's data-message totals, for its log line and span (metrics are recorded as
/// messages cross the socket).
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Data messages received.
    pub messages_received: u64,
    /// Data messages sent.
    pub messages_sent: u64,
    /// Their payload bytes.
    pub bytes_received: u64,
    /// Their payload bytes.
    pub bytes_sent: u64,
}
