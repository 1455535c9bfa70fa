//! Trace shapes: the upgrade request's server span, the connection span and message spans.
//!
//! - The upgrade request gets a `SERVER` span (HTTP semantic conventions) whose parent is the
//!   W3C `traceparent` the client sent; a malformed header starts a new trace.
//! - The connection span (`websocket.connection`) is the upgrade span's child and lasts as long
//!   as the connection; it ends with the close code, reason and totals. It is an OpenTelemetry
//!   span held by the connection, not a `tracing` span: the `tracing` registry keeps a pooled
//!   slot (and its small extension map) for every span that was ever open at once, and after a
//!   storm of 19,000 connections those ~20,000 live 150-byte maps, scattered through freed
//!   connection buffers, kept ~45 MB of pages resident. The connection's log lines get its ids
//!   by making its context current while they are written.
//! - Each handled message may get a span of its own, sampled by the configured sampler. A
//!   long-lived connection must not grow one unbounded trace, so message spans are **roots of
//!   their own traces, linked to the connection span**. They are built with the OpenTelemetry
//!   SDK's span pipeline: a sampled one is a plain record queued for a thread of its own that
//!   encodes it to OTLP (module `message_spans` says why and how). The sampling decision is
//!   taken *before* anything else: a message span is a root, and every configured sampler
//!   decides a root by a fixed probability (1, 0 or the ratio), so an unsampled message costs
//!   one draw of a per-thread random number against that probability (the SDK's own call made
//!   a trace id and a sampling result per message: 1.6% of the server's CPU at 16 in flight).

use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};

use super::labels::{MessageType, Route};
use super::message_spans::{MessageSpans, Record};
use super::settings::SamplerSetting;
use super::transport::unix_nanos;

/// The span name of message spans.
pub const MESSAGE_SPAN: &str = "websocket.message";

/// The span name of connection spans.
pub const CONNECTION_SPAN: &str = "websocket.connection";

/// Starts connection spans, and message spans deciding sampling first.
#[derive(Clone, Debug)]
pub struct Spans {
    tracer: SdkTracer,
    /// A message is sampled when a draw of 63 random bits is below this (the SDK's
    /// `TraceIdRatioBased` rule); `None` when every message is, 0 when none is.
    threshold: Option<u64>,
    /// Where sampled message spans go (not the SDK's span pipeline).
    messages: MessageSpans,
}

/// What was done with a message, for its span.
#[derive(Debug, Clone, Copy, Default)]
pub struct Handling {
    /// `websocket.operation`: what the route does with a message (`echo`, `broadcast`...),
    /// named by the application per route.
    pub operation: Option<&'static str>,
    /// `websocket.recipients`: how many it was delivered or queued to, when the application
    /// said.
    pub recipients: Option<usize>,
}

impl Spans {
    pub(crate) fn new(
        provider: &SdkTracerProvider,
        sampler: SamplerSetting,
        messages: MessageSpans,
    ) -> Self {
        let ratio = sampler.root_ratio();
        Spans {
            tracer: provider.tracer(super::SCOPE),
            threshold: (ratio < 1.0).then_some((ratio * (1u64 << 63) as f64) as u64),
            messages,
        }
    }

    /// The message span queue, for flushing at shutdown.
    pub(crate) fn messages(&self) -> &MessageSpans {
        &self.messages
    }

    /// Starts a connection's span, a child of `parent` (the upgrade request's span). The
    /// configured sampler decides now; an unsampled span still has ids, for links and logs,
    /// and costs no attributes.
    pub fn connection(
        &self,
        parent: &Context,
        id: u64,
        route: Route,
        room: Option<&str>,
    ) -> opentelemetry_sdk::trace::Span {
        let mut span = self
            .tracer
            .span_builder(CONNECTION_SPAN)
            .with_kind(SpanKind::Internal)
            .start_with_context(&self.tracer, parent);
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("connection.id", id as i64),
                KeyValue::new("http.route", route.as_str()),
            ]);
            if let Some(room) = room {
                span.set_attribute(KeyValue::new("websocket.room", room.to_owned()));
            }
        }
        span
    }

    /// Whether the next message gets a span, by the configured sampler.
    #[inline]
    pub fn sample(&self) -> bool {
        match self.threshold {
            None => true,
            Some(0) => false,
            Some(threshold) => draw() >> 1 < threshold,
        }
    }

    /// Records a span for one handled message, from `start` to `end`, linked to its
    /// connection's span; returns the message span's context (sampled, a root). Call it only
    /// for a message [`Spans::sample`] chose.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        start: SystemTime,
        end: SystemTime,
        connection: &SpanContext,
        connection_id: u64,
        route: Route,
        kind: MessageType,
        size: usize,
        handling: Handling,
    ) -> SpanContext {
        // The SDK's generator (a per-thread CSPRNG), as for every other span: 128 random bits
        // per trace id. The sampling draw's xorshift would give consecutive outputs of one
        // 64-bit state, so only 64 bits of a trace id would be random. At 1% of the messages
        // this costs well under a microsecond per sampled message.
        let ids = RandomIdGenerator::default();
        let trace_id = ids.new_trace_id().to_bytes();
        let span_id = ids.new_span_id().to_bytes();
        self.messages.push(Record {
            trace_id,
            span_id,
            start: unix_nanos(start),
            end: unix_nanos(end),
            link: connection.is_valid().then(|| connection.clone()),
            connection_id,
            route,
            kind,
            size: size as u64,
            handling,
        });
        SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    /// The `PRODUCER` span of a sampled room message handed to the backplane, a child of its
    /// message span; returns the context to carry in the NATS message's headers.
    pub fn producer(&self, message: &SpanContext, subject: &str, size: usize) -> Context {
        let parent = Context::new().with_remote_span_context(message.clone());
        let mut span = self
            .tracer
            .span_builder("publish")
            .with_kind(SpanKind::Producer)
            .with_attributes(messaging_attributes("publish", "send", subject, size))
            .start_with_context(&self.tracer, &parent);
        let context = Context::new().with_remote_span_context(span.span_context().clone());
        span.end();
        context
    }

    /// The `CONSUMER` span of a room message received from the backplane, a child of the
    /// publisher's producer span (`parent`, from the message's headers). End it when delivered.
    pub fn consumer(
        &self,
        parent: &Context,
        subject: &str,
        size: usize,
    ) -> opentelemetry_sdk::trace::Span {
        self.tracer
            .span_builder("process")
            .with_kind(SpanKind::Consumer)
            .with_attributes(messaging_attributes("process", "process", subject, size))
            .start_with_context(&self.tracer, parent)
    }
}

/// The messaging semantic-convention attributes of a backplane span.
fn messaging_attributes(
    operation: &'static str,
    operation_type: &'static str,
    subject: &str,
    size: usize,
) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", "nats"),
        KeyValue::new("messaging.operation.name", operation),
        KeyValue::new("messaging.operation.type", operation_type),
        KeyValue::new("messaging.destination.name", subject.to_owned()),
        KeyValue::new("messaging.message.body.size", size as i64),
    ]
}

thread_local! {
    /// xorshift64* state, seeded from the SDK's random id generator once per thread.
    static DRAW: std::cell::Cell<u64> = std::cell::Cell::new(
        u64::from_be_bytes(RandomIdGenerator::default().new_span_id().to_bytes()) | 1,
    );
}

/// A uniformly distributed `u64` (xorshift64*: not for secrets, plenty for sampling).
#[inline]
fn draw() -> u64 {
    DRAW.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Reads a W3C `traceparent` (and `tracestate`) from request headers. Returns `None` when it is
/// absent or malformed: the upgrade then starts a new trace, and never fails because of it.
pub fn remote_parent(headers: &http::HeaderMap) -> Option<Context> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    if !well_formed_traceparent(value) {
        return None;
    }
    let cx = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The W3C Trace Context shape, checked before the SDK parses the header: the SDK reads the
/// fields with `from_str_radix`, which accepts short, zero-padded and `+`-prefixed fields
/// (found by fuzzing). Version: 2 lowercase hex digits, not `ff`; then a 32-digit trace id, a
/// 16-digit parent id and 2-digit flags; version `00` has exactly those four fields.
fn well_formed_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    match parts.as_slice() {
        [version, trace, span, flags, rest @ ..] => {
            hex(version, 2)
                && *version != "ff"
                && (*version != "00" || rest.is_empty())
                && hex(trace, 32)
                && hex(span, 16)
                && hex(flags, 2)
        }
        _ => false,
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Runs `log` with `span`'s context current, so what it logs carries the span's trace and span
/// ids (in OTel log records and JSON lines). The span is not made current for the whole
/// connection: that would cost a thread-local push and pop per wake-up, per message.
pub(crate) fn in_span<R>(span: Option<&SpanContext>, log: impl FnOnce() -> R) -> R {
    let _current = span.map(|s| Context::new().with_remote_span_context(s.clone()).attach());
    log()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Message spans are roots: each setting samples them at its root probability.
    #[test]
    fn messages_are_sampled_at_the_root_ratio() {
        let provider = SdkTracerProvider::builder().build();
        // Nothing is recorded: the queue's export thread never sends.
        let export = super::super::settings::Export {
            endpoint: "http://127.0.0.1:9".into(),
            protocol: super::super::settings::Protocol::Grpc,
            timeout: std::time::Duration::from_secs(1),
            headers: Vec::new(),
        };
        let messages = MessageSpans::start(
            &export,
            tonic::metadata::MetadataMap::new(),
            &opentelemetry_sdk::Resource::builder().build(),
        )
        .unwrap();
        let fraction = |setting| {
            let spans = Spans::new(&provider, setting, messages.clone());
            let n = 200_000;
            (0..n).filter(|_| spans.sample()).count() as f64 / n as f64
        };
        assert_eq!(fraction(SamplerSetting::AlwaysOn), 1.0);
        assert_eq!(fraction(SamplerSetting::ParentAlwaysOn), 1.0);
        assert_eq!(fraction(SamplerSetting::ParentRatio(1.0)), 1.0);
        assert_eq!(fraction(SamplerSetting::AlwaysOff), 0.0);
        assert_eq!(fraction(SamplerSetting::ParentAlwaysOff), 0.0);
        assert_eq!(fraction(SamplerSetting::Ratio(0.0)), 0.0);
        // Seven standard deviations either way.
        let quarter = fraction(SamplerSetting::Ratio(0.25));
        assert!((0.243..0.257).contains(&quarter), "{quarter}");
        let hundredth = fraction(SamplerSetting::ParentRatio(0.01));
        assert!((0.0085..0.0115).contains(&hundredth), "{hundredth}");
    }

    fn headers(tp: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        h
    }

    #[test]
    fn traceparent() {
        let cx = remote_parent(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote());
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zz-01",
            // Found by fuzzing: the SDK alone accepted these.
            "00-1-2-01",
            "+0-+1-+2-+1",
            "00-004bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(remote_parent(&headers(bad)).is_none(), "{bad}");
        }
        assert!(remote_parent(&http::HeaderMap::new()).is_none());
    }
}
