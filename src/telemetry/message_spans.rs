//! Message spans (`websocket.message`) from record to OTLP without the SDK's span pipeline.
//!
//! At 16 messages in flight, 1% of ~1.7M messages a second is ~17,000 spans a second. Through
//! the SDK each one allocated its attributes, link and span data on a runtime worker and freed
//! them on the batch processor's thread, crossed a channel, and was converted and encoded on
//! export, while the gRPC channel's tasks ran on the server's own workers: 5-10% of the
//! server's CPU against traces at 0% (BENCHMARKS.md). A message span has a fixed shape (a root,
//! linked to its connection's span, with four to six attributes whose keys are constants), so:
//!
//! - **Record**: the span's ids, times, link and attributes go into a plain [`Record`] (no
//!   heap) pushed onto the calling thread's shard of the queue, behind a mutex nobody else
//!   takes except the export thread, for a moment, once a batch. At most [`QUEUE`] records
//!   (176 bytes each: 1.4 MiB) wait, and as many again may be in the export thread's hands;
//!   beyond that they are dropped and counted.
//! - **Export**: a thread of its own (`wsotel-spans`) takes the records every second, or as
//!   soon as [`WAKE_AT`] are waiting, encodes them straight to OTLP protobuf (resource and
//!   scope encoded once, at start) and sends them with the traces export's protocol,
//!   endpoint, headers and timeout. The thread runs a current-thread runtime of its own, which
//!   drives the gRPC connection between exports too (a collector's restart is seen at once),
//!   so no export work lands on the server's workers.
//! - **Accounting**: the SDK's own self-metric `otel.sdk.processor.span.processed` (same
//!   meter, name, unit and description as the SDK's batch span processor) counts what was
//!   handed to the exporter, and with `error.type` what was dropped (`queue_full`) or came
//!   after shutdown (`already_shutdown`), under `otel.component.name` =
//!   `batching_span_processor/websocket.message`. A failed send is logged like the SDK's own
//!   export errors: at most once a minute, and never as an exported log record.
//!
//! What arrives is what the SDK would have sent for the same span: a unit test converts the
//! same span through the SDK's own OTLP conversion and compares the decoded requests field by
//! field. Every other span (upgrade, connection, backplane) still goes through the SDK.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Receiver;
use tokio::sync::mpsc::error::TrySendError;

use opentelemetry::KeyValue;
use opentelemetry::metrics::BoundCounter;
use opentelemetry::trace::SpanContext;
use opentelemetry_sdk::Resource;
use prost::Message;

use super::labels::{MessageType, Route};
use super::logging::EXPORT_ERRORS;
use super::settings::Export;
use super::traces::{Handling, MESSAGE_SPAN};
use super::transport::{Signal, Transport};

/// Records waiting at most; a message span beyond them is dropped and counted.
pub(crate) const QUEUE: usize = 8192;
/// The export thread is woken early when this many records are waiting.
pub(crate) const WAKE_AT: usize = 2048;
/// Spans per request at most (~170 bytes each: well under gRPC's 4 MiB default limit).
const PER_REQUEST: usize = 4096;
/// The export thread's schedule when fewer than [`WAKE_AT`] are waiting.
const DELAY: Duration = Duration::from_secs(1);
/// Shards of the queue: a thread pushes onto `thread slot % SHARDS`.
const SHARDS: usize = 16;

/// One message span, as recorded: everything its OTLP form needs, nothing on the heap (the
/// link's trace state allocates only when the connection's parent sent a `tracestate`).
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    /// Unix nanoseconds.
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The connection's span, when it has valid ids.
    pub(crate) link: Option<SpanContext>,
    pub(crate) connection_id: u64,
    pub(crate) route: Route,
    pub(crate) kind: MessageType,
    pub(crate) size: u64,
    pub(crate) handling: Handling,
}

/// A shard on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Vec<Record>>);

/// What the recording side and the export thread share.
struct Shared {
    shards: [Shard; SHARDS],
    /// Records in the shards (not yet taken by the export thread).
    queued: AtomicUsize,
    /// Set by `shutdown`: what comes later is counted as `already_shutdown`.
    closed: AtomicBool,
    counts: Counts,
}

/// `otel.sdk.processor.span.processed`, bound to this processor's three attribute sets.
struct Counts {
    processed: BoundCounter<u64>,
    queue_full: BoundCounter<u64>,
    after_shutdown: BoundCounter<u64>,
}

impl Counts {
    /// On the global meter provider's `otel.sdk` meter, as the SDK's batch span processor
    /// counts; `Telemetry` makes that provider its own before building this.
    fn new() -> Self {
        let counter = opentelemetry::global::meter("otel.sdk")
            .u64_counter("otel.sdk.processor.span.processed")
            .with_description(
                "The number of spans for which the processing has finished, \
                 either successful or failed.",
            )
            .with_unit("{span}")
            .build();
        let attrs = |error: Option<&'static str>| {
            let mut kvs: Vec<KeyValue> = error
                .map(|e| KeyValue::new("error.type", e))
                .into_iter()
                .collect();
            kvs.push(KeyValue::new(
                "otel.component.type",
                "batching_span_processor",
            ));
            kvs.push(KeyValue::new(
                "otel.component.name",
                "batching_span_processor/websocket.message",
            ));
            kvs
        };
        Counts {
            processed: counter.bind(&attrs(None)),
            queue_full: counter.bind(&attrs(Some("queue_full"))),
            after_shutdown: counter.bind(&attrs(Some("already_shutdown"))),
        }
    }
}

enum Command {
    /// `WAKE_AT` records are waiting.
    Wake,
    /// Export everything waiting and answer.
    Flush(SyncSender<Result<(), String>>),
}

/// The recording handle; clones share one queue and one export thread, which exports what is
/// left and ends when the last clone is dropped (or at [`MessageSpans::shutdown`]).
#[derive(Clone)]
pub(crate) struct MessageSpans {
    shared: Arc<Shared>,
    commands: tokio::sync::mpsc::Sender<Command>,
}

impl std::fmt::Debug for MessageSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageSpans")
            .field("queued", &self.shared.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl MessageSpans {
    /// Starts the export thread for the traces export `export`, with `resource`.
    pub(crate) fn start(
        export: &Export,
        metadata: tonic::metadata::MetadataMap,
        resource: &Resource,
    ) -> Result<Self, String> {
        // The export thread runs its loop on this runtime, so the gRPC connection is driven
        // all the time, not only during a send: a collector that restarts between two
        // exports is noticed when it closes the connection, and the next export reconnects
        // instead of failing on a dead one.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("message span export runtime: {err}"))?;
        let transport = {
            // The gRPC channel's worker is spawned on the runtime current now: this one.
            let _runtime = runtime.enter();
            Transport::new(export, Signal::Traces, metadata)?
        };
        let shared = Arc::new(Shared {
            shards: Default::default(),
            queued: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            counts: Counts::new(),
        });
        let (commands, rx) = tokio::sync::mpsc::channel(4);
        let exporter = Exporter {
            shared: shared.clone(),
            encoder: Encoder::new(resource),
            transport: Arc::new(transport),
            endpoint: export.endpoint.clone(),
        };
        std::thread::Builder::new()
            .name("wsotel-spans".into())
            .spawn(move || runtime.block_on(exporter.run(rx)))
            .map_err(|err| format!("cannot start the message span export thread: {err}"))?;
        Ok(MessageSpans { shared, commands })
    }

    /// Queues one span; drops and counts it when [`QUEUE`] are waiting.
    pub(crate) fn push(&self, record: Record) {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            shared.counts.after_shutdown.add(1);
            return;
        }
        let queued = shared.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= QUEUE {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            shared.counts.queue_full.add(1);
            return;
        }
        let shard = &shared.shards[super::tally::thread_slot() % SHARDS];
        shard
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
        if queued + 1 == WAKE_AT {
            // A full command channel means a wake is already pending.
            let _ = self.commands.try_send(Command::Wake);
        }
    }

    /// Stops taking spans (later ones are counted as `already_shutdown`), then exports
    /// everything queued, within `bound`. The export thread ends when the last handle is
    /// dropped, exporting anything a racing push queued after this flush.
    pub(crate) fn shutdown(&self, bound: Duration) -> Result<(), String> {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.flush(bound)
    }

    /// Exports everything queued now, waiting at most `bound` in all (for room in the command
    /// channel, which a stuck export can keep full, and for the answer).
    pub(crate) fn flush(&self, bound: Duration) -> Result<(), String> {
        let deadline = Instant::now() + bound;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut command = Command::Flush(tx);
        loop {
            match self.commands.try_send(command) {
                Ok(()) => break,
                Err(TrySendError::Full(c)) if Instant::now() < deadline => {
                    command = c;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => {
                    return Err(format!("message spans not flushed within {bound:?}"));
                }
                Err(TrySendError::Closed(_)) => {
                    return Err("the message span export thread has ended".to_owned());
                }
            }
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| format!("message spans not flushed within {bound:?}"))?
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

/// The export thread's state.
struct Exporter {
    shared: Arc<Shared>,
    encoder: Encoder,
    transport: Arc<Transport>,
    endpoint: String,
}

impl Exporter {
    async fn run(mut self, mut commands: Receiver<Command>) {
        let mut taken = Vec::new();
        let mut schedule = tokio::time::interval_at(tokio::time::Instant::now() + DELAY, DELAY);
        schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Wake) => {
                        let _ = self.export(&mut taken).await;
                    }
                    Some(Command::Flush(reply)) => {
                        let _ = reply.send(self.export(&mut taken).await);
                    }
                    None => {
                        let _ = self.export(&mut taken).await;
                        return;
                    }
                },
                _ = schedule.tick() => {
                    let _ = self.export(&mut taken).await;
                }
            }
        }
    }

    /// Takes every waiting record and sends them, [`PER_REQUEST`] at a time.
    async fn export(&mut self, taken: &mut Vec<Record>) -> Result<(), String> {
        for shard in &self.shared.shards {
            let mut records = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            if !records.is_empty() {
                self.shared
                    .queued
                    .fetch_sub(records.len(), Ordering::Relaxed);
                taken.append(&mut records);
            }
        }
        let mut result = Ok(());
        for chunk in taken.chunks(PER_REQUEST) {
            self.shared.counts.processed.add(chunk.len() as u64);
            let body = self.encoder.request(chunk);
            if let Err(err) = Transport::send_from_runtime(&self.transport, body).await {
                tracing::warn!(
                    target: EXPORT_ERRORS,
                    endpoint = %self.endpoint,
                    spans = chunk.len() as u64,
                    error = %err,
                    "cannot export message spans over OTLP"
                );
                result = Err(err);
            }
        }
        taken.clear();
        result
    }
}

/// Writes `ExportTraceServiceRequest`s by hand: one resource, one scope, message spans.
struct Encoder {
    /// `ResourceSpans.resource` (field 1), whole, and `ResourceSpans.schema_url` (field 3).
    resource: Vec<u8>,
    schema_url: Vec<u8>,
    /// `ScopeSpans.scope` (field 1), whole.
    scope: Vec<u8>,
    /// Reused between requests.
    spans: Vec<u8>,
    span: Vec<u8>,
    scratch: Vec<u8>,
}

impl Encoder {
    fn new(resource: &Resource) -> Self {
        use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
        use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
        use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
        let with_schema = ResourceAttributesWithSchema::from(resource);
        let resource = ProtoResource {
            attributes: with_schema.attributes.0,
            ..Default::default()
        };
        // The scope of the tracer `Spans` gets from the provider: `tracer("wsotel")`.
        let scope = InstrumentationScope {
            name: super::SCOPE.to_owned(),
            ..Default::default()
        };
        let mut out = Encoder {
            resource: Vec::new(),
            schema_url: Vec::new(),
            scope: Vec::new(),
            spans: Vec::new(),
            span: Vec::new(),
            scratch: Vec::new(),
        };
        pb::message(&mut out.resource, 1, &resource.encode_to_vec());
        if let Some(url) = with_schema.schema_url.filter(|u| !u.is_empty()) {
            pb::bytes(&mut out.schema_url, 3, url.as_bytes());
        }
        pb::message(&mut out.scope, 1, &scope.encode_to_vec());
        out
    }

    /// One request carrying `records`.
    fn request(&mut self, records: &[Record]) -> Vec<u8> {
        self.spans.clear();
        self.spans.extend_from_slice(&self.scope);
        for r in records {
            self.span.clear();
            span(&mut self.span, &mut self.scratch, r);
            pb::message(&mut self.spans, 2, &self.span);
        }
        let scope_spans_len = self.spans.len();
        let resource_spans_len = self.resource.len()
            + 1
            + pb::varint_len(scope_spans_len as u64)
            + scope_spans_len
            + self.schema_url.len();
        let mut out = Vec::with_capacity(resource_spans_len + 8);
        pb::key(&mut out, 1, pb::LEN);
        pb::varint(&mut out, resource_spans_len as u64);
        out.extend_from_slice(&self.resource);
        pb::message(&mut out, 2, &self.spans);
        out.extend_from_slice(&self.schema_url);
        out
    }
}

/// One `Span` message, as the SDK's OTLP conversion fills it for a message span.
fn span(out: &mut Vec<u8>, scratch: &mut Vec<u8>, r: &Record) {
    // SpanFlags: the sampled bit, and "whether the parent is remote is known" (no parent).
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    pb::bytes(out, 1, &r.trace_id);
    pb::bytes(out, 2, &r.span_id);
    pb::bytes(out, 5, MESSAGE_SPAN.as_bytes());
    pb::key(out, 6, pb::VARINT);
    pb::varint(out, 1); // SPAN_KIND_INTERNAL
    pb::fixed64(out, 7, r.start);
    pb::fixed64(out, 8, r.end);
    pb::key_value(out, 9, "http.route", Value::Str(r.route.as_str()));
    pb::key_value(out, 9, "connection.id", Value::Int(r.connection_id as i64));
    pb::key_value(
        out,
        9,
        "websocket.message.type",
        Value::Str(r.kind.as_str()),
    );
    pb::key_value(out, 9, "websocket.message.size", Value::Int(r.size as i64));
    if let Some(operation) = r.handling.operation {
        pb::key_value(out, 9, "websocket.operation", Value::Str(operation));
    }
    if let Some(recipients) = r.handling.recipients {
        pb::key_value(
            out,
            9,
            "websocket.recipients",
            Value::Int(recipients as i64),
        );
    }
    if let Some(link) = &r.link {
        let l = &mut *scratch;
        l.clear();
        pb::bytes(l, 1, &link.trace_id().to_bytes());
        pb::bytes(l, 2, &link.span_id().to_bytes());
        let state = link.trace_state().header();
        if !state.is_empty() {
            pb::bytes(l, 3, state.as_bytes());
        }
        let remote = if link.is_remote() { IS_REMOTE } else { 0 };
        pb::fixed32(
            l,
            6,
            u32::from(link.trace_flags().to_u8()) | HAS_IS_REMOTE | remote,
        );
        pb::message(out, 13, l);
    }
    pb::message(out, 15, &[]); // Status: unset
    pb::fixed32(out, 16, 0x01 | HAS_IS_REMOTE); // sampled, a local root
}

/// An attribute value of a message span.
#[derive(Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Int(i64),
}

/// Protobuf wire format, the few pieces a span needs.
mod pb {
    use super::Value;

    pub(super) const VARINT: u8 = 0;
    pub(super) const I64: u8 = 1;
    pub(super) const LEN: u8 = 2;
    pub(super) const I32: u8 = 5;

    pub(super) fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub(super) fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    pub(super) fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, u64::from(field) << 3 | u64::from(wire));
    }

    pub(super) fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        key(out, field, LEN);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    /// An embedded message whose encoding is `m` (present even when empty).
    pub(super) fn message(out: &mut Vec<u8>, field: u32, m: &[u8]) {
        bytes(out, field, m);
    }

    pub(super) fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, I64);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub(super) fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
        key(out, field, I32);
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// A `KeyValue` as field `field`: lengths are computed, nothing is staged.
    pub(super) fn key_value(out: &mut Vec<u8>, field: u32, k: &str, value: Value<'_>) {
        let any = match value {
            Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
            Value::Int(i) => 1 + varint_len(i as u64),
        };
        key(out, field, LEN);
        varint(
            out,
            (1 + varint_len(k.len() as u64) + k.len() + 1 + varint_len(any as u64) + any) as u64,
        );
        bytes(out, 1, k.as_bytes());
        key(out, 2, LEN);
        varint(out, any as u64);
        match value {
            Value::Str(s) => bytes(out, 1, s.as_bytes()),
            Value::Int(i) => {
                key(out, 3, VARINT);
                varint(out, i as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::trace::{
        Link, Span as _, SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState,
        Tracer as _, TracerProvider as _,
    };
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{
        SdkTracerProvider, SimpleSpanProcessor, SpanData, SpanExporter,
    };
    use prost::Message;

    use super::*;

    /// Keeps what the SDK hands its exporter.
    #[derive(Debug, Default, Clone)]
    struct Capture(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Capture {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    /// The message span as the SDK's tracer made it before this module (the same builder
    /// calls `Spans::record` made), with its ids and times copied into a `Record`.
    fn through_the_sdk(
        resource: &Resource,
        link: Option<SpanContext>,
        r: &Record,
    ) -> (SpanData, Record) {
        let capture = Capture::default();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_span_processor(SimpleSpanProcessor::new(capture.clone()))
            .build();
        let tracer = provider.tracer(crate::telemetry::SCOPE);
        let mut attributes = vec![
            KeyValue::new("http.route", r.route.as_str()),
            KeyValue::new("connection.id", r.connection_id as i64),
            KeyValue::new("websocket.message.type", r.kind.as_str()),
            KeyValue::new("websocket.message.size", r.size as i64),
        ];
        if let Some(operation) = r.handling.operation {
            attributes.push(KeyValue::new("websocket.operation", operation));
        }
        if let Some(recipients) = r.handling.recipients {
            attributes.push(KeyValue::new("websocket.recipients", recipients as i64));
        }
        let start = UNIX_EPOCH + Duration::from_nanos(r.start);
        let end = UNIX_EPOCH + Duration::from_nanos(r.end);
        let mut span = tracer
            .span_builder(MESSAGE_SPAN)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .with_links(link.iter().cloned().map(Link::with_context).collect())
            .start_with_context(&tracer, &Context::new());
        span.end_with_timestamp(end);
        let data = capture
            .0
            .lock()
            .unwrap()
            .pop()
            .expect("the SDK exported the span");
        let record = Record {
            trace_id: data.span_context.trace_id().to_bytes(),
            span_id: data.span_context.span_id().to_bytes(),
            link,
            ..r.clone()
        };
        (data, record)
    }

    fn record(route: &'static str, handling: Handling, size: u64) -> Record {
        Record {
            trace_id: [0; 16],
            span_id: [0; 8],
            start: 1_764_620_000_123_456_789,
            end: 1_764_620_000_123_999_000,
            link: None,
            connection_id: 300_000_000_001,
            route: Route::from_static(route),
            kind: MessageType::Binary,
            size,
            handling,
        }
    }

    /// Every field of every span, the resource and the scope decode to what the SDK's own
    /// OTLP conversion makes of the same span.
    #[test]
    fn requests_decode_to_what_the_sdk_sends() {
        let remote_parent_state = TraceState::from_key_value([("vendor", "opaque")]).unwrap();
        let connection = |state: TraceState, remote: bool| {
            SpanContext::new(
                TraceId::from_bytes([7; 16]),
                SpanId::from_bytes([9; 8]),
                TraceFlags::SAMPLED,
                remote,
                state,
            )
        };
        // A route name over 127 bytes makes every enclosing length a two-byte varint.
        let long_route: &'static str = Box::leak(format!("/ws/{}", "r".repeat(300)).into());
        let cases = [
            (
                record(
                    "/ws/rooms/{room}",
                    Handling {
                        operation: Some("broadcast"),
                        recipients: Some(100),
                    },
                    64,
                ),
                Some(connection(TraceState::default(), false)),
            ),
            (
                record("/ws/echo", Handling::default(), 1 << 40),
                Some(connection(remote_parent_state.clone(), true)),
            ),
            (record(long_route, Handling::default(), 0), None),
        ];
        for resource in [
            Resource::builder().with_service_name("svc").build(),
            Resource::builder_empty()
                .with_schema_url(
                    [KeyValue::new("service.name", "svc")],
                    "https://opentelemetry.io/schemas/1.38.0",
                )
                .build(),
        ] {
            let mut encoder = Encoder::new(&resource);
            let mut datas = Vec::new();
            let mut records = Vec::new();
            for (r, link) in &cases {
                let (data, record) = through_the_sdk(&resource, link.clone(), r);
                datas.push(data);
                records.push(record);
            }
            let expected = ExportTraceServiceRequest {
                resource_spans: group_spans_by_resource_and_scope(
                    datas,
                    &ResourceAttributesWithSchema::from(&resource),
                ),
            };
            let ours = ExportTraceServiceRequest::decode(&encoder.request(&records)[..])
                .expect("our request decodes");
            assert_eq!(ours, expected);
            // The encoder's buffers are reused: a second request is whole as well.
            let again =
                ExportTraceServiceRequest::decode(&encoder.request(&records[1..])[..]).unwrap();
            assert_eq!(again.resource_spans[0].scope_spans[0].spans.len(), 2);
            assert_eq!(
                again.resource_spans[0].scope_spans[0].spans[..],
                ours.resource_spans[0].scope_spans[0].spans[1..]
            );
        }
    }

    /// The memory bound docs/telemetry.md states: 8192 records of 176 bytes (1.4 MiB) queued,
    /// as many again being sent.
    #[test]
    fn a_record_is_176_bytes() {
        assert_eq!(std::mem::size_of::<Record>(), 176);
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            pb::varint(&mut out, v);
            assert_eq!(out.len(), pb::varint_len(v), "{v}");
        }
    }

    /// The queue holds at most `QUEUE` records while the export thread is stuck on a
    /// collector that never answers; a flush then takes everything; after shutdown nothing
    /// is queued.
    #[test]
    fn the_queue_is_bounded_and_flushes() {
        // Accepts connections (the kernel does) and never answers.
        let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let export = Export {
            endpoint: format!("http://{}", blackhole.local_addr().unwrap()),
            protocol: crate::telemetry::settings::Protocol::Grpc,
            headers: Vec::new(),
            timeout: Duration::from_millis(500),
        };
        let spans = MessageSpans::start(
            &export,
            tonic::metadata::MetadataMap::new(),
            &Resource::builder().build(),
        )
        .unwrap();
        let r = record("/ws/echo", Handling::default(), 1);
        for _ in 0..WAKE_AT {
            spans.push(r.clone());
        }
        // The wake at WAKE_AT: the export thread takes those and is stuck sending them.
        let waited = Instant::now();
        while spans.queued() != 0 {
            assert!(waited.elapsed() < Duration::from_secs(5), "no wake");
            std::thread::yield_now();
        }
        for _ in 0..QUEUE * 2 {
            spans.push(r.clone());
        }
        assert_eq!(spans.queued(), QUEUE, "bounded while the export is stuck");
        // The flush comes after the wake those pushes sent, which took (and failed to send)
        // everything: the flush itself finds nothing more to send.
        let _ = spans.flush(Duration::from_secs(10));
        assert_eq!(spans.queued(), 0);
        let _ = spans.shutdown(Duration::from_secs(10));
        spans.push(r);
        assert_eq!(spans.queued(), 0, "after shutdown nothing is queued");
    }
}
