//! Every `websocket.server.*` and `http.server.*` instrument, created once, and the typed events
//! that record them.
//!
//! Handlers never touch an instrument: they call an event (`connection_opened`,
//! `message_received`, `handshake_rejected`...), and this module decides the name, unit,
//! attributes and log line. The per-message instruments are bound to their attribute set when
//! the server starts (`experimental_metrics_bound_instruments` in the SDK), so the hot path does
//! no attribute lookup and no allocation: a bound counter add costs a few nanoseconds where an
//! unbound one with a two-attribute slice costs about 100 (see ../shared/FACTS.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundHistogram, BoundUpDownCounter, Counter, Histogram, Meter, UpDownCounter,
};

use super::labels::{
    CloseInitiator, CloseReason, Direction, DropReason, ErrorType, MessageType, RejectReason, Route,
};
use super::log_limit::{LogEvent, LogLimiter};

const ROUTE: &str = "http.route";
const DIRECTION: &str = "network.io.direction";
const MESSAGE_TYPE: &str = "websocket.message.type";
const CLOSE_REASON: &str = "websocket.close.reason";
const CLOSE_INITIATOR: &str = "websocket.close.initiator";
const LOG_EVENT: &str = "event";
const ERROR_TYPE: &str = "error.type";
const DROP_REASON: &str = "reason";

/// Histogram boundaries, chosen for what each histogram measures.
pub mod buckets {
    /// Connection lifetimes: 10 ms to a week.
    pub const CONNECTION_SECONDS: &[f64] = &[
        0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0,
    ];
    /// Payload sizes: 16 B to 1 MiB, by powers of four.
    pub const MESSAGE_BYTES: &[f64] = &[
        16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
    ];
    /// Server time per message: 5 us to 1 s.
    pub const MESSAGE_SECONDS: &[f64] = &[
        0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
        0.025, 0.05, 0.1, 0.25, 1.0,
    ];
    /// Heartbeat round trips: 100 us to 10 s.
    pub const PING_SECONDS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    /// HTTP request durations, as the semantic conventions recommend.
    pub const HTTP_SECONDS: &[f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ];
}

/// The instruments of one route, bound to their attribute sets once at startup.
pub struct RouteInstruments {
    route: Route,
    active: BoundUpDownCounter<i64>,
    accepted: BoundCounter<u64>,
    /// `[direction][message type]`
    messages: [[BoundCounter<u64>; 5]; 2],
    /// `[direction]`
    io: [BoundCounter<u64>; 2],
    /// `[direction]`
    size: [BoundHistogram<u64>; 2],
    message_duration: BoundHistogram<f64>,
}

impl RouteInstruments {
    fn new(meter_instruments: &Instruments, route: Route) -> Self {
        let r = KeyValue::new(ROUTE, route.as_str());
        let per_direction = |d: Direction| [r.clone(), KeyValue::new(DIRECTION, d.as_str())];
        RouteInstruments {
            route,
            active: meter_instruments.active.bind(std::slice::from_ref(&r)),
            accepted: meter_instruments.accepted.bind(std::slice::from_ref(&r)),
            messages: Direction::ALL.map(|d| {
                MessageType::ALL.map(|t| {
                    meter_instruments.messages.bind(&[
                        r.clone(),
                        KeyValue::new(DIRECTION, d.as_str()),
                        KeyValue::new(MESSAGE_TYPE, t.as_str()),
                    ])
                })
            }),
            io: Direction::ALL.map(|d| meter_instruments.io.bind(&per_direction(d))),
            size: Direction::ALL.map(|d| meter_instruments.size.bind(&per_direction(d))),
            message_duration: meter_instruments
                .message_duration
                .bind(std::slice::from_ref(&r)),
        }
    }

    /// The route these instruments belong to.
    pub fn route(&self) -> Route {
        self.route
    }

    /// A message (data or control) crossed the socket. Data messages also count their payload
    /// bytes in `websocket.server.io` and `websocket.server.message.size`.
    #[inline]
    pub fn message(&self, direction: Direction, kind: MessageType, payload_len: usize) {
        let d = direction as usize;
        self.messages[d][kind as usize].add(1);
        if kind.is_data() {
            self.io[d].add(payload_len as u64);
            self.size[d].record(payload_len as u64);
        }
    }

    /// Server time from a message received to its echo written or its broadcast queued.
    #[inline]
    pub fn message_handled(&self, received_at: Instant) {
        self.message_duration
            .record(received_at.elapsed().as_secs_f64());
    }
}

/// The unbound instruments, kept for the events that are rare or carry variable attributes.
pub(crate) struct Instruments {
    active: UpDownCounter<i64>,
    accepted: Counter<u64>,
    rejected: Counter<u64>,
    connection_duration: Histogram<f64>,
    messages: Counter<u64>,
    io: Counter<u64>,
    size: Histogram<u64>,
    message_duration: Histogram<f64>,
    ping_duration: Histogram<f64>,
    errors: Counter<u64>,
    dropped: Counter<u64>,
    rooms: UpDownCounter<i64>,
    http_duration: Histogram<f64>,
    log_suppressed: Counter<u64>,
    backplane_messages: Counter<u64>,
    backplane_io: Counter<u64>,
    backplane_errors: Counter<u64>,
    backplane_reconnects: Counter<u64>,
    backplane_hop: Histogram<f64>,
}

impl Instruments {
    pub(crate) fn new(meter: &Meter) -> Self {
        Instruments {
            active: meter
                .i64_up_down_counter("websocket.server.active_connections")
                .with_unit("{connection}")
                .with_description("WebSocket connections open right now.")
                .build(),
            accepted: meter
                .u64_counter("websocket.server.accepted_connections")
                .with_unit("{connection}")
                .with_description("WebSocket handshakes completed.")
                .build(),
            rejected: meter
                .u64_counter("websocket.server.rejected_connections")
                .with_unit("{connection}")
                .with_description("WebSocket handshakes refused, by error.type.")
                .build(),
            connection_duration: meter
                .f64_histogram("websocket.server.connection.duration")
                .with_unit("s")
                .with_description(
                    "Lifetime of closed WebSocket connections, by close reason and initiator.",
                )
                .with_boundaries(buckets::CONNECTION_SECONDS.to_vec())
                .build(),
            messages: meter
                .u64_counter("websocket.server.messages")
                .with_unit("{message}")
                .with_description("WebSocket messages, by direction and frame type.")
                .build(),
            io: meter
                .u64_counter("websocket.server.io")
                .with_unit("By")
                .with_description("Payload bytes of data messages, by direction.")
                .build(),
            size: meter
                .u64_histogram("websocket.server.message.size")
                .with_unit("By")
                .with_description("Payload size of data messages, by direction.")
                .with_boundaries(buckets::MESSAGE_BYTES.to_vec())
                .build(),
            message_duration: meter
                .f64_histogram("websocket.server.message.duration")
                .with_unit("s")
                .with_description(
                    "Server time from a message received to its echo written or broadcast queued.",
                )
                .with_boundaries(buckets::MESSAGE_SECONDS.to_vec())
                .build(),
            ping_duration: meter
                .f64_histogram("websocket.server.ping.duration")
                .with_unit("s")
                .with_description("Heartbeat round trip: server ping to client pong.")
                .with_boundaries(buckets::PING_SECONDS.to_vec())
                .build(),
            errors: meter
                .u64_counter("websocket.server.errors")
                .with_unit("{error}")
                .with_description("Errors on open connections, by error.type.")
                .build(),
            dropped: meter
                .u64_counter("websocket.server.dropped_messages")
                .with_unit("{message}")
                .with_description("Messages accepted for delivery but never sent, by reason.")
                .build(),
            rooms: meter
                .i64_up_down_counter("websocket.server.rooms")
                .with_unit("{room}")
                .with_description("Rooms with at least one member.")
                .build(),
            http_duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description(
                    "Duration of HTTP server requests, the WebSocket upgrade included.",
                )
                .with_boundaries(buckets::HTTP_SECONDS.to_vec())
                .build(),
            backplane_messages: meter
                .u64_counter("websocket.server.backplane.messages")
                .with_unit("{message}")
                .with_description(
                    "Room messages published to (transmit) and received from (receive) the NATS backplane.",
                )
                .build(),
            backplane_io: meter
                .u64_counter("websocket.server.backplane.io")
                .with_unit("By")
                .with_description("Payload bytes of backplane messages, by direction.")
                .build(),
            backplane_errors: meter
                .u64_counter("websocket.server.backplane.errors")
                .with_unit("{error}")
                .with_description("Backplane failures, by error.type.")
                .build(),
            backplane_reconnects: meter
                .u64_counter("websocket.server.backplane.reconnects")
                .with_unit("{reconnect}")
                .with_description("Times the NATS connection came back after being lost.")
                .build(),
            backplane_hop: meter
                .f64_histogram("websocket.server.backplane.hop.duration")
                .with_unit("s")
                .with_description(
                    "Publish on one instance to hand-off on this one, for room messages from the backplane.",
                )
                .with_boundaries(buckets::MESSAGE_SECONDS.to_vec())
                .build(),
            log_suppressed: meter
                .u64_counter("websocket.server.log.suppressed")
                .with_unit("{line}")
                .with_description(
                    "Connection-level log lines held back by the per-event log rate, by event.",
                )
                .build(),
        }
    }
}

/// The recording side of telemetry that the server holds: cheap to clone.
#[derive(Clone)]
pub struct Events {
    inner: Arc<EventsInner>,
}

struct EventsInner {
    instruments: Instruments,
    routes: [Arc<RouteInstruments>; 2],
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
    pub(crate) fn new(meter: &Meter) -> Self {
        let instruments = Instruments::new(meter);
        let saturation = Arc::new(Saturation::default());
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
        let routes = Route::ALL.map(|r| Arc::new(RouteInstruments::new(&instruments, r)));
        let ping = instruments.ping_duration.bind(&[]);
        // Series that should read 0 rather than be absent before the first event, so rates and
        // alerts work from the first scrape. Every value is from a bounded set.
        instruments.rooms.add(0, &[]);
        for e in LogEvent::ALL {
            instruments
                .log_suppressed
                .add(0, &[KeyValue::new(LOG_EVENT, e.as_str())]);
        }
        for route in Route::ALL {
            let r = KeyValue::new(ROUTE, route.as_str());
            for e in ErrorType::ALL {
                let attrs = [r.clone(), KeyValue::new(ERROR_TYPE, e.as_str())];
                instruments.errors.add(0, &attrs);
            }
            // The backplane's reasons start at 0 only when a backplane is configured.
            for d in [DropReason::SlowConsumer, DropReason::ConnectionClosed] {
                let attrs = [r.clone(), KeyValue::new(DROP_REASON, d.as_str())];
                instruments.dropped.add(0, &attrs);
            }
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
    pub fn backplane_configured(&self, connected: Arc<std::sync::atomic::AtomicBool>) {
        let _ = self.inner.saturation.backplane.set(connected);
        let i = &self.inner.instruments;
        for d in Direction::ALL {
            let attrs = [KeyValue::new(DIRECTION, d.as_str())];
            i.backplane_messages.add(0, &attrs);
            i.backplane_io.add(0, &attrs);
        }
        i.backplane_reconnects.add(0, &[]);
        for e in crate::backplane::ERROR_TYPES {
            i.backplane_errors.add(0, &[KeyValue::new(ERROR_TYPE, e)]);
        }
        for d in [DropReason::BackplaneUnavailable, DropReason::BackplaneFull] {
            let attrs = [
                KeyValue::new(ROUTE, Route::Rooms.as_str()),
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

    /// The backplane connected.
    pub fn backplane_mark_connected(&self) {
        self.inner
            .saturation
            .backplane_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The backplane connection came back.
    pub fn backplane_reconnected(&self) {
        self.inner.instruments.backplane_reconnects.add(1, &[]);
    }

    /// A backplane failure (`error_type` from a fixed set in `backplane`).
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

    /// The bound per-message instruments of `route`.
    pub fn route(&self, route: Route) -> Arc<RouteInstruments> {
        self.inner.routes[route.index()].clone()
    }

    /// A handshake completed: counts it, and returns the guard that keeps the connection in
    /// `active_connections` until it is dropped, on every path out of the connection task.
    pub fn connection_opened(&self, route: Route) -> ConnectionGuard {
        let r = self.route(route);
        r.accepted.add(1);
        r.active.add(1);
        ConnectionGuard {
            events: self.clone(),
            route: r,
            opened_at: Instant::now(),
            closed: false,
        }
    }

    /// A handshake was refused before the upgrade.
    pub fn handshake_rejected(&self, route: Option<Route>, reason: RejectReason) {
        let e = KeyValue::new(ERROR_TYPE, reason.as_str());
        match route {
            Some(r) => self
                .inner
                .instruments
                .rejected
                .add(1, &[KeyValue::new(ROUTE, r.as_str()), e]),
            None => self.inner.instruments.rejected.add(1, &[e]),
        }
    }

    /// Something went wrong on an open connection.
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
    /// template, or `None` when nothing matched; `method` must already be normalised to a known
    /// method or `_OTHER`.
    pub fn http_request(
        &self,
        method: &'static str,
        route: Option<&'static str>,
        status: u16,
        elapsed: Duration,
    ) {
        let method = KeyValue::new("http.request.method", method);
        let status = KeyValue::new("http.response.status_code", i64::from(status));
        let scheme = KeyValue::new("url.scheme", "http");
        let secs = elapsed.as_secs_f64();
        match route {
            Some(r) => self
                .inner
                .instruments
                .http_duration
                .record(secs, &[method, KeyValue::new(ROUTE, r), status, scheme]),
            None => self
                .inner
                .instruments
                .http_duration
                .record(secs, &[method, status, scheme]),
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
    pub fn closed(mut self, reason: CloseReason, initiator: CloseInitiator) -> Duration {
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
