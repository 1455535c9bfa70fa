//! Telemetry: the one place that owns the OpenTelemetry resource, providers and instruments.
//!
//! [`Telemetry::new`] builds one `SdkMeterProvider` whose Prometheus reader backs `/metrics`.
//! The server records through [`Events`], which owns every instrument, so the rest of the code
//! says *what happened* and never touches a counter. Nothing here is global: tests can run many
//! servers in one process, each with its own registry.

#[doc(hidden)] // the recording side of the connections and the server; not for applications
pub mod events;
#[doc(hidden)]
pub mod instruments;
pub mod labels;
pub mod log_limit;
pub mod logging;
mod message_histograms;
mod message_spans;
pub mod otlp;
pub mod process;
pub mod settings;
mod tally;
pub mod traces;
mod transport;

use std::collections::HashSet;

use opentelemetry::metrics::MeterProvider;
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::resource::{
    EnvResourceDetector, ResourceDetector, TelemetryResourceDetector,
};

#[doc(hidden)]
pub use events::{Closed, ConnectionGuard, Events, Identity, MoreIdentity, Totals};
#[doc(hidden)]
pub use instruments::RouteInstruments;
pub use labels::{
    CloseInitiator, CloseReason, Direction, DropReason, ErrorType, MessageType, RejectReason, Route,
};
pub use settings::OtlpSettings;
pub use traces::Spans;

use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;

/// The instrumentation scope of every wsotel instrument.
pub const SCOPE: &str = "wsotel";

/// Resource attributes that become labels on every Prometheus series, so dashboards can split
/// by instance and region without joining on `target_info`.
pub const PROMOTED_RESOURCE_KEYS: [&str; 2] = ["service.instance.id", "cloud.region"];

/// Errors while setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting is invalid (an `OTEL_*` variable, an exporter that cannot be built).
    #[error("{0}")]
    Config(String),
    /// The Prometheus exporter could not be built.
    #[error("prometheus exporter: {0}")]
    Prometheus(String),
    /// Rendering `/metrics` failed.
    #[error("rendering metrics: {0}")]
    Render(#[from] prometheus::Error),
}

/// The process's telemetry: resource, meter provider and the Prometheus registry behind
/// `/metrics`.
pub struct Telemetry {
    resource: Resource,
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
    logger_provider: Option<SdkLoggerProvider>,
    spans: Option<Spans>,
    registry: prometheus::Registry,
    /// The per-message histograms, which `/metrics` reads beside the registry.
    histograms: std::sync::Arc<message_histograms::MessageHistograms>,
    events: Events,
    settings: OtlpSettings,
}

impl Telemetry {
    /// Telemetry configured from the `OTEL_*` environment variables (see [`OtlpSettings`]):
    /// OTLP export of the signals that have an endpoint, `/metrics` always. Must run inside
    /// the Tokio runtime when a gRPC exporter is configured.
    pub fn from_env() -> Result<Self, TelemetryError> {
        let settings = OtlpSettings::from_env().map_err(TelemetryError::Config)?;
        Self::new(&settings)
    }

    /// Telemetry with OTLP off: `/metrics` only. For tests and embedders.
    pub fn standalone() -> Result<Self, TelemetryError> {
        Self::new(&OtlpSettings::off())
    }

    /// Builds the resource from the environment (`OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`), one meter provider with the Prometheus reader (and the
    /// OTLP reader when metrics are exported), the tracer and logger providers when those
    /// signals are exported, and every instrument. Must run inside the Tokio runtime when a
    /// gRPC exporter is configured.
    pub fn new(settings: &OtlpSettings) -> Result<Self, TelemetryError> {
        let resource = build_resource();
        let registry = prometheus::Registry::new();
        let exporter = prometheus_reader(&registry)?;
        let routes = std::sync::Arc::<events::RouteRegistry>::default();
        let histograms = std::sync::Arc::new(message_histograms::MessageHistograms::new(
            routes.clone(),
            &resource,
            &PROMOTED_RESOURCE_KEYS,
        ));
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(exporter);
        if let Some(reader) =
            otlp::metric_reader(settings, &histograms).map_err(TelemetryError::Config)?
        {
            meters = meters.with_reader(reader);
        }
        let meter_provider = meters.build();
        // The SDK's batch processors count what they drop (queue full) on the global meter
        // provider, as `otel.sdk.processor.*`: make it this one before they are built, so
        // dropped telemetry shows on /metrics and over OTLP like everything else.
        if settings.traces.is_some() || settings.logs.is_some() {
            opentelemetry::global::set_meter_provider(meter_provider.clone());
        }
        let tracer_provider =
            otlp::tracer_provider(settings, &resource).map_err(TelemetryError::Config)?;
        let logger_provider =
            otlp::logger_provider(settings, &resource).map_err(TelemetryError::Config)?;
        let messages = otlp::message_spans(settings, &resource).map_err(TelemetryError::Config)?;
        let spans = tracer_provider
            .as_ref()
            .zip(messages)
            .map(|(tp, messages)| Spans::new(tp, settings.sampler, messages));
        let meter = meter_provider.meter_with_scope(
            opentelemetry::InstrumentationScope::builder(SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let events = Events::new(&meter, routes);
        process::register(&meter);
        Ok(Telemetry {
            resource,
            meter_provider,
            tracer_provider,
            logger_provider,
            spans,
            registry,
            histograms,
            events,
            settings: settings.clone(),
        })
    }

    /// The export settings in force.
    pub fn settings(&self) -> &OtlpSettings {
        &self.settings
    }

    /// The tracer provider, when traces are exported.
    pub fn tracer_provider(&self) -> Option<&SdkTracerProvider> {
        self.tracer_provider.as_ref()
    }

    /// The logger provider, when logs are exported.
    pub fn logger_provider(&self) -> Option<&SdkLoggerProvider> {
        self.logger_provider.as_ref()
    }

    /// Connection and message spans, when traces are exported.
    pub fn spans(&self) -> Option<&Spans> {
        self.spans.as_ref()
    }

    /// The recording handle the server uses (its connections record through `WebSocket`).
    #[doc(hidden)]
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The resource every signal carries.
    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// Renders the Prometheus text exposition format for `/metrics`.
    pub fn render_prometheus(&self) -> Result<String, TelemetryError> {
        use prometheus::Encoder;
        let mut out = Vec::with_capacity(16 * 1024);
        // Gathering runs the collection callbacks, which hand the tallies over: the histogram
        // totals read after it count every message the counters count.
        let mut families = self.registry.gather();
        families.extend(self.histograms.prometheus());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        prometheus::TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Flushes and shuts the providers down in the order message spans, tracer, logger, meter
    /// (so the last spans' and logs' metrics are still recorded), within `bound` in all.
    /// Errors are logged, never panicked on; a collector that does not answer cannot hold the
    /// exit past `bound`.
    pub fn shutdown(&self, bound: Duration) {
        let messages = self.spans.as_ref().map(|s| s.messages().clone());
        let tracer = self.tracer_provider.clone();
        let logger = self.logger_provider.clone();
        let meter = self.meter_provider.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("wsotel-telemetry-shutdown".into())
            .spawn(move || {
                let mut errors = Vec::new();
                if let Some(m) = messages
                    && let Err(e) = m.shutdown(bound)
                {
                    errors.push(format!("message spans: {e}"));
                }
                if let Some(t) = tracer
                    && let Err(e) = t.shutdown()
                {
                    errors.push(format!("tracer provider: {e}"));
                }
                if let Some(l) = logger {
                    logging::LOG_EXPORT_OPEN.store(false, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = l.shutdown() {
                        errors.push(format!("logger provider: {e}"));
                    }
                }
                if let Err(e) = meter.shutdown() {
                    errors.push(format!("meter provider: {e}"));
                }
                let _ = tx.send(errors);
            });
        if let Err(err) = worker {
            tracing::warn!(error = %err, "cannot start the telemetry shutdown thread");
            return;
        }
        match rx.recv_timeout(bound) {
            Ok(errors) if errors.is_empty() => tracing::debug!("telemetry flushed"),
            Ok(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "telemetry shutdown");
                }
            }
            Err(_) => tracing::warn!(
                bound_ms = bound.as_millis() as i64,
                "telemetry shutdown did not finish in time; exiting anyway"
            ),
        }
    }
}

/// The Prometheus reader behind `/metrics`, writing into `registry`: the promoted resource
/// attributes become labels on every series.
fn prometheus_reader(
    registry: &prometheus::Registry,
) -> Result<opentelemetry_prometheus::PrometheusExporter, TelemetryError> {
    let keys: HashSet<Key> = PROMOTED_RESOURCE_KEYS
        .iter()
        .map(|k| Key::from(*k))
        .collect();
    opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .with_resource_selector(keys)
        .build()
        .map_err(|e| TelemetryError::Prometheus(e.to_string()))
}

/// Builds the resource: defaults first, then `OTEL_RESOURCE_ATTRIBUTES`, then
/// `OTEL_SERVICE_NAME`, each overriding the one before, as the specification orders them.
fn build_resource() -> Resource {
    let defaults = [
        KeyValue::new("service.name", "wsotel"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", new_instance_id()),
    ];
    let mut builder = Resource::builder_empty()
        .with_detectors(&[Box::new(TelemetryResourceDetector) as Box<dyn ResourceDetector>])
        .with_attributes(defaults)
        .with_detectors(&[Box::new(EnvResourceDetector::new()) as Box<dyn ResourceDetector>]);
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME")
        && !name.trim().is_empty()
    {
        builder = builder.with_service_name(name.trim().to_owned());
    }
    builder.build()
}

/// A random v4 UUID from the kernel; falls back to host name, pid and start time, which is
/// still unique per process.
fn new_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            format!("{}-{nanos}", std::process::id())
        })
}
