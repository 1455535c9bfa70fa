//! Every `websocket.server.*` and `http.server.*` instrument, created once, and the typed events
//! that record them.
//!
//! Handlers never touch an instrument: they call an event (`connection_opened`,
//! `message_received`, `handshake_rejected`...), and this module decides the name, unit,
//! attributes and log line. The per-route instruments are bound to their attribute set when
//! the route is first seen (`experimental_metrics_bound_instruments` in the SDK), so recording
//! does no attribute lookup and no allocation; the per-message ones are tallied per thread and
//! handed over at collection (module `tally`), so the hot path shares no cache line with
//! another thread either. The two per-message histograms are not SDK instruments at all: the
//! route keeps their totals, and `/metrics` and the OTLP export read them (module
//! `message_histograms`).

use std::sync::Mutex;
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundUpDownCounter, Counter, Histogram, Meter, UpDownCounter,
};

use super::labels::{Direction, MessageType, Route};
use super::tally::{self, Cumulative, DURATION_BUCKETS, SIZE_BUCKETS, Sink, Tally};

const ROUTE: &str = "http.route";
const DIRECTION: &str = "network.io.direction";
const MESSAGE_TYPE: &str = "websocket.message.type";

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
///
/// The per-message ones are recorded through the route's tally: a per-thread shard that is
/// handed over at each collection (see the `tally` module).
pub struct RouteInstruments {
    pub(crate) route: Route,
    pub(crate) active: BoundUpDownCounter<i64>,
    pub(crate) accepted: BoundCounter<u64>,
    tally: Tally,
    sdk: PerMessage,
    /// The per-message histograms since the process started, as of the last hand-over.
    totals: Mutex<MessageTotals>,
}

/// The SDK's per-message counters of one route, fed by its tally at collection.
struct PerMessage {
    /// `[direction][message type]`
    messages: [[BoundCounter<u64>; 5]; 2],
    /// `[direction]`
    io: [BoundCounter<u64>; 2],
}

/// `websocket.server.message.size` and `websocket.server.message.duration` of one route.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct MessageTotals {
    /// Payload bytes, `[direction]`.
    pub(crate) size: [Cumulative<SIZE_BUCKETS>; 2],
    /// Handling time in nanoseconds.
    pub(crate) duration: Cumulative<DURATION_BUCKETS>,
}

/// One hand-over: counters to the SDK, histograms to the route's totals.
struct Handover<'a> {
    sdk: &'a PerMessage,
    totals: &'a mut MessageTotals,
}

impl Sink for Handover<'_> {
    fn messages(&mut self, direction: usize, kind: usize, n: u64) {
        self.sdk.messages[direction][kind].add(n);
    }

    fn io(&mut self, direction: usize, n: u64) {
        self.sdk.io[direction].add(n);
    }

    fn sizes(&mut self, direction: usize, added: &Cumulative<SIZE_BUCKETS>) {
        self.totals.size[direction].add(added);
    }

    fn durations(&mut self, added: &Cumulative<DURATION_BUCKETS>) {
        self.totals.duration.add(added);
    }
}

impl RouteInstruments {
    pub(crate) fn new(meter_instruments: &Instruments, route: Route) -> Self {
        let r = KeyValue::new(ROUTE, route.as_str());
        let per_direction = |d: Direction| [r.clone(), KeyValue::new(DIRECTION, d.as_str())];
        RouteInstruments {
            route,
            active: meter_instruments.active.bind(std::slice::from_ref(&r)),
            accepted: meter_instruments.accepted.bind(std::slice::from_ref(&r)),
            tally: Tally::default(),
            sdk: PerMessage {
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
            },
            totals: Mutex::default(),
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
        let (d, k) = (direction as usize, kind as usize);
        if kind.is_data() {
            let len = payload_len as u64;
            let bucket = tally::size_bucket(len);
            self.tally.record(|c| {
                c.message(d, k);
                c.data(d, len, bucket);
            });
        } else {
            self.tally.record(|c| c.message(d, k));
        }
    }

    /// Server time from a message received to its echo written or its broadcast queued.
    #[inline]
    pub fn message_handled(&self, received_at: Instant) {
        let nanos = u64::try_from(received_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = tally::duration_bucket(nanos);
        self.tally.record(|c| c.duration(nanos, bucket));
    }

    /// Hands over what was recorded since the last collection: to the SDK counters and the
    /// histogram totals. Called by the collection callback before every metric reader
    /// aggregates, by `/metrics` before it reads the totals, and every second.
    pub(crate) fn collect(&self) {
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        self.tally.flush(&mut Handover {
            sdk: &self.sdk,
            totals: &mut totals,
        });
    }

    /// Records a handling time of exactly `nanos` (tests that need a known value).
    #[cfg(test)]
    pub(crate) fn record_duration(&self, nanos: u64) {
        let bucket = tally::duration_bucket(nanos);
        self.tally.record(|c| c.duration(nanos, bucket));
    }

    /// The per-message histograms as of the last hand-over.
    pub(crate) fn totals(&self) -> MessageTotals {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The unbound instruments, kept for the events that are rare or carry variable attributes.
pub(crate) struct Instruments {
    pub(crate) active: UpDownCounter<i64>,
    pub(crate) accepted: Counter<u64>,
    pub(crate) rejected: Counter<u64>,
    pub(crate) connection_duration: Histogram<f64>,
    pub(crate) messages: Counter<u64>,
    pub(crate) io: Counter<u64>,
    pub(crate) ping_duration: Histogram<f64>,
    pub(crate) errors: Counter<u64>,
    pub(crate) dropped: Counter<u64>,
    pub(crate) rooms: UpDownCounter<i64>,
    pub(crate) http_duration: Histogram<f64>,
    pub(crate) log_suppressed: Counter<u64>,
    pub(crate) backplane_messages: Counter<u64>,
    pub(crate) backplane_io: Counter<u64>,
    pub(crate) backplane_errors: Counter<u64>,
    pub(crate) backplane_reconnects: Counter<u64>,
    pub(crate) backplane_hop: Histogram<f64>,
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
