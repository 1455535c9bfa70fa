//! OTLP exporters for the three signals, over gRPC (tonic) or HTTP/protobuf, from validated
//! [`OtlpSettings`].
//!
//! Every pipeline is bounded: spans and log records wait in the SDK's batch queues (2048 each,
//! dropped beyond), message spans in their own queue (8192, module `message_spans`), metrics
//! are aggregates. Exports wait on threads of their own (the SDK's, and `wsotel-spans`), never
//! on the server's runtime workers, so a slow or absent collector cannot slow message
//! handling. The SDK's gRPC channels are made here, inside the server's runtime, so their
//! connection tasks run on its workers (they only move bytes); the message spans' channel
//! runs on `wsotel-spans`' own runtime.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, Temporality};
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::message_histograms::{HistogramExporter, MessageHistograms};
use super::message_spans::MessageSpans;
use super::settings::{Export, OtlpSettings, Protocol};

/// Queue bound of the span and log batch processors.
const QUEUE: usize = 2048;

/// Builds one exporter of any signal: the three builders share their shape but not a type.
macro_rules! build_exporter {
    ($builder:expr, $export:expr) => {{
        let e: &Export = $export;
        match e.protocol {
            Protocol::Grpc => $builder
                .with_tonic()
                .with_endpoint(e.endpoint.clone())
                .with_timeout(e.timeout)
                .with_metadata(metadata(&e.headers)?)
                .build(),
            Protocol::HttpProtobuf => $builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(e.endpoint.clone())
                .with_timeout(e.timeout)
                .with_headers(e.headers.iter().cloned().collect())
                .build(),
        }
        .map_err(|err| format!("OTLP exporter for {}: {err}", e.endpoint))
    }};
}

fn metadata(headers: &[(String, String)]) -> Result<tonic::metadata::MetadataMap, String> {
    let mut map = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("OTLP header name {k:?} is not valid gRPC metadata"))?;
        let value = v.parse().map_err(|_| {
            format!("OTLP header {k:?} has a value that is not valid gRPC metadata")
        })?;
        map.insert(key, value);
    }
    Ok(map)
}

/// The tracer provider, when traces are exported. Must run inside the Tokio runtime (tonic).
pub(crate) fn tracer_provider(
    settings: &OtlpSettings,
    resource: &Resource,
) -> Result<Option<SdkTracerProvider>, String> {
    let Some(export) = &settings.traces else {
        return Ok(None);
    };
    let exporter = build_exporter!(opentelemetry_otlp::SpanExporter::builder(), export)?;
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .with_scheduled_delay(Duration::from_secs(1))
                .build(),
        )
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_sampler(settings.sampler.sampler())
            .with_span_processor(processor)
            .build(),
    ))
}

/// The message span queue and its export thread, when traces are exported (message spans do
/// not go through the tracer provider: module `message_spans`). Build it after the global
/// meter provider is set: it counts on it as the SDK's span processor does.
pub(crate) fn message_spans(
    settings: &OtlpSettings,
    resource: &Resource,
) -> Result<Option<MessageSpans>, String> {
    let Some(export) = &settings.traces else {
        return Ok(None);
    };
    MessageSpans::start(export, metadata(&export.headers)?, resource).map(Some)
}

/// The logger provider, when logs are exported.
pub(crate) fn logger_provider(
    settings: &OtlpSettings,
    resource: &Resource,
) -> Result<Option<SdkLoggerProvider>, String> {
    let Some(export) = &settings.logs else {
        return Ok(None);
    };
    let exporter = build_exporter!(opentelemetry_otlp::LogExporter::builder(), export)?;
    let processor = opentelemetry_sdk::logs::BatchLogProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::logs::BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .with_scheduled_delay(Duration::from_secs(1))
                .build(),
        )
        .build();
    Ok(Some(
        SdkLoggerProvider::builder()
            .with_resource(resource.clone())
            .with_log_processor(processor)
            .build(),
    ))
}

/// The periodic OTLP metric reader, when metrics are exported. Cumulative, like the
/// Prometheus reader, so both paths report the same values. Every export also sends the
/// per-message `histograms`, which are not SDK instruments.
pub(crate) fn metric_reader(
    settings: &OtlpSettings,
    histograms: &Arc<MessageHistograms>,
) -> Result<Option<PeriodicReader<HistogramExporter<opentelemetry_otlp::MetricExporter>>>, String> {
    let Some(export) = &settings.metrics else {
        return Ok(None);
    };
    let exporter = build_exporter!(
        opentelemetry_otlp::MetricExporter::builder().with_temporality(Temporality::Cumulative),
        export
    )?;
    let exporter = HistogramExporter::new(
        exporter,
        histograms.clone(),
        export,
        metadata(&export.headers)?,
    )?;
    Ok(Some(
        PeriodicReader::builder(exporter)
            .with_interval(settings.metric_interval)
            .build(),
    ))
}
