//! Telemetry: the one place that owns the OpenTelemetry resource, providers and instruments.
//!
//! [`Telemetry::new`] builds one `SdkMeterProvider` whose Prometheus reader backs `/metrics`.
//! The server records through [`Events`], which owns every instrument, so the rest of the code
//! says *what happened* and never touches a counter. Nothing here is global: tests can run many
//! servers in one process, each with its own registry.

pub mod instruments;
pub mod labels;
pub mod logging;
pub mod process;

use std::collections::HashSet;

use opentelemetry::metrics::MeterProvider;
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::resource::{
    EnvResourceDetector, ResourceDetector, TelemetryResourceDetector,
};

pub use instruments::{ConnectionGuard, Events, RouteInstruments};
pub use labels::{CloseReason, Direction, DropReason, ErrorType, MessageType, RejectReason, Route};

/// The instrumentation scope of every wsotel instrument.
pub const SCOPE: &str = "wsotel";

/// Resource attributes that become labels on every Prometheus series, so dashboards can split
/// by instance and region without joining on `target_info`.
pub const PROMOTED_RESOURCE_KEYS: [&str; 2] = ["service.instance.id", "cloud.region"];

/// Errors while setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
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
    registry: prometheus::Registry,
    events: Events,
}

impl Telemetry {
    /// Builds the resource from the environment (`OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`) and the meter provider with its Prometheus reader, and
    /// creates every instrument.
    pub fn new() -> Result<Self, TelemetryError> {
        let resource = build_resource();
        let registry = prometheus::Registry::new();
        let keys: HashSet<Key> = PROMOTED_RESOURCE_KEYS
            .iter()
            .map(|k| Key::from(*k))
            .collect();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .with_resource_selector(keys)
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let meter_provider = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(exporter)
            .build();
        let meter = meter_provider.meter_with_scope(
            opentelemetry::InstrumentationScope::builder(SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let events = Events::new(&meter);
        process::register(&meter);
        Ok(Telemetry {
            resource,
            meter_provider,
            registry,
            events,
        })
    }

    /// The recording handle the server uses.
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
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Flushes and shuts the providers down; errors are logged, never panicked on.
    pub fn shutdown(&self) {
        if let Err(err) = self.meter_provider.shutdown() {
            tracing::warn!(error = %err, "meter provider shutdown failed");
        }
    }
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
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME") {
        if !name.trim().is_empty() {
            builder = builder.with_service_name(name.trim().to_owned());
        }
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
