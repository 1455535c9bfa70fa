//! The `tracing` subscriber: stdout logs, and the OpenTelemetry bridges for spans and logs.
//!
//! - stdout: text by default, JSON lines with `--log-format json`; filtered by `RUST_LOG`
//!   (default `info`). JSON lines carry `trace_id` and `span_id` of the span they happen in,
//!   so logs collected from stdout link to traces too.
//! - spans: when traces are exported, `tracing-opentelemetry` turns wsotel's spans into OTel
//!   spans and activates their context, so log records made inside them carry their ids.
//! - log records: when logs are exported, `opentelemetry-appender-tracing` turns events into
//!   OTel log records. The exporters' own crates (hyper, h2, tonic, tower, reqwest and the
//!   OpenTelemetry crates) are kept out, so export failures cannot feed themselves.
//! - The OpenTelemetry SDK reports each failed export on stdout; with the collector down that
//!   is several lines a minute. They are let through at most once a minute, together with
//!   wsotel's own export errors (target `wsotel_export`), which are never exported either.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, Targets, dynamic_filter_fn, filter_fn};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;

use super::Telemetry;

/// Cleared when the logger provider shuts down: events after that (the shutdown's own report)
/// go to stdout only, instead of making the SDK warn that logs arrived after its shutdown.
pub(super) static LOG_EXPORT_OPEN: AtomicBool = AtomicBool::new(true);

/// Targets whose events never become OTel log records.
const NOT_EXPORTED: [&str; 7] = [
    "hyper",
    "h2",
    "tonic",
    "tower",
    "reqwest",
    "opentelemetry",
    EXPORT_ERRORS,
];

/// The target of wsotel's own export errors (the per-message histograms' OTLP request): like
/// the SDK's, never exported as log records and let through at most once a minute.
pub(crate) const EXPORT_ERRORS: &str = "wsotel_export";

/// Whether a warning from `target` reports a failed export (the SDK's or wsotel's own).
fn is_export_error(target: &str) -> bool {
    target.starts_with("opentelemetry") || target == EXPORT_ERRORS
}

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The OpenTelemetry side of logging, for an application that installs its own `tracing`
/// subscriber: wsotel's spans (the upgrade request's `SERVER` span, so connection spans are its
/// children) exported as traces, and every event (within `RUST_LOG`) exported as an OTel log
/// record carrying the trace and span ids in force. Empty for a signal that is not exported.
///
/// ```
/// use tracing_subscriber::prelude::*;
///
/// let telemetry = wsotel::Telemetry::standalone().unwrap();
/// let subscriber = tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer())
///     .with(wsotel::telemetry::logging::otel_layer(&telemetry));
/// // tracing::subscriber::set_global_default(subscriber) in your `main`.
/// # drop(subscriber);
/// ```
pub fn otel_layer<S>(telemetry: &Telemetry) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    // Spans must pass this filter for their log records to carry trace context.
    let spans = telemetry.tracer_provider().map(|tp| {
        tracing_opentelemetry::layer()
            .with_tracer(tp.tracer("wsotel"))
            // Busy/idle time per span costs a clock read and a lock per enter and exit.
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("wsotel", Level::INFO))
    });
    let logs = telemetry.logger_provider().map(|lp| {
        UntilLoggerShutdown(
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(lp),
        )
        .with_filter(env_filter().and(filter_fn(|m| {
            !NOT_EXPORTED.iter().any(|p| m.target().starts_with(p))
        })))
    });
    Layer::and_then(spans, logs)
}

/// Installs the global subscriber: lines on stdout in `format` (filtered by `RUST_LOG`), and
/// [`otel_layer`]. Call once, from `main`, after [`Telemetry::new`]; it leaves an
/// application's subscriber in place if one is installed already (then add [`otel_layer`] to
/// it). It also bridges the `log` crate at warn and above, and makes a panic a log line.
pub fn init(format: LogFormat, telemetry: &Telemetry) {
    let ansi = std::io::stdout().is_terminal();
    let stdout = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .boxed(),
    }
    .with_filter(env_filter().and(
        dynamic_filter_fn(|m, _| sdk_errors_once_a_minute(m)).with_callsite_filter(|m| {
            // Only the SDK's warnings need asking per event; every other callsite's
            // answer is cached, so a disabled event costs nothing.
            if is_export_error(m.target()) && *m.level() <= Level::WARN {
                Interest::sometimes()
            } else {
                Interest::always()
            }
        }),
    ));

    let subscriber = tracing_subscriber::registry()
        .with(stdout)
        .with(otel_layer(telemetry));
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        return; // already installed (an embedder's own subscriber wins)
    }
    // Dependencies that log through the `log` crate (tungstenite logs every frame at trace
    // level) are bridged at warn and above only: with the bridge wide open, every frame's
    // `log::trace!` went through the whole subscriber's filters, about half of the server's
    // CPU with telemetry on (profile in BENCHMARKS.md).
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(log::LevelFilter::Warn)
        .init();
    // A panic is logged like everything else (a text or JSON line, an OTel log record), not
    // as raw text on stderr; with `RUST_BACKTRACE=1` the backtrace goes with it. The standard
    // hook still reports it when error logs are filtered out, or when the panic happened
    // inside logging itself (logging it again could deadlock or abort).
    let standard = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        thread_local! {
            static IN_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        let reentered = IN_HOOK.try_with(|h| h.replace(true)).unwrap_or(true);
        if reentered || !tracing::enabled!(Level::ERROR) {
            standard(info);
        } else {
            log_panic(info);
        }
        if !reentered {
            let _ = IN_HOOK.try_with(|h| h.set(false));
        }
    }));
}

/// The text of a panic's payload (`panic!` with a literal or a format string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&'static str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let location = info.location().map(ToString::to_string).unwrap_or_default();
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    tracing::error!(
        panic = panic_message(info.payload()),
        panic.location = %location,
        panic.thread = std::thread::current().name().unwrap_or("unnamed"),
        backtrace,
        "panicked"
    );
}

/// The OTel log bridge until the logger provider shuts down. A wrapping layer, not a filter:
/// a per-layer filter whose `event_enabled` says no leaves tracing-subscriber's filter state
/// dirty (a debug assertion fires). Only `on_event` is forwarded, all the bridge uses with its
/// default features; its `experimental_span_attributes` feature would need `on_new_span` and
/// `on_record` forwarded too.
struct UntilLoggerShutdown<L>(L);

impl<S: Subscriber, L: Layer<S>> Layer<S> for UntilLoggerShutdown<L> {
    fn on_event(&self, event: &Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if LOG_EXPORT_OPEN.load(Ordering::Relaxed) {
            self.0.on_event(event, ctx);
        }
    }
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Lets export warnings and errors (the OpenTelemetry crates', wsotel's own) through at most
/// once a minute, all of them together.
fn sdk_errors_once_a_minute(meta: &tracing::Metadata<'_>) -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    if !is_export_error(meta.target()) || *meta.level() > Level::WARN {
        return true;
    }
    // A dynamic filter: asked for every event, never cached per callsite.
    if !meta.is_event() {
        return true;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// One JSON object per line: timestamp, level, target, the event's fields flattened, the
/// current span's name, and `trace_id`/`span_id` when the event happens inside a traced span.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut obj = serde_json::Map::new();
        obj.insert("timestamp".into(), timestamp.into());
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        event.record(&mut JsonVisitor(&mut obj));
        if let Some(span) = ctx.lookup_current() {
            obj.insert("span".into(), span.name().into());
        }
        let cx = opentelemetry::Context::current();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            obj.insert("trace_id".into(), sc.trace_id().to_string().into());
            obj.insert("span_id".into(), sc.span_id().to_string().into());
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}
