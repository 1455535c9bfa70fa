//! `websocket.server.message.size` and `websocket.server.message.duration`, read from each
//! route's totals (module `tally`) instead of SDK instruments.
//!
//! The SDK (0.33) takes a histogram one value at a time: handing it a collection's worth of
//! messages cost three records per message per metric reader, 12% of the server's CPU at 16
//! messages in flight with both readers, and it has no way to take a bucket count
//! (open-telemetry/opentelemetry-rust#2505, #1670). So these two are kept as totals per route
//! (per bucket count, exact sum, min, max), which a hand-over adds to in O(buckets), and are
//! written out here:
//! - on `/metrics`, as the families opentelemetry-prometheus would write for them (the same
//!   names, help, labels and label order: attributes, scope, promoted resource attributes);
//! - over OTLP, as cumulative histograms in a request of their own, sent beside the SDK's own
//!   export of everything else, to the same endpoint with the same headers and timeout
//!   ([`HistogramExporter`] wraps the SDK's exporter, so they go on its schedule: every
//!   interval, on force-flush and at shutdown). A failed send is logged like the SDK's own
//!   export errors: at most once a minute, and never as an exported log record.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1 as common;
use opentelemetry_proto::tonic::metrics::v1 as metrics;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use prometheus::proto::{LabelPair, MetricFamily, MetricType};

use super::events::{RouteRegistry, routes_of};
use super::instruments::buckets;
use super::labels::Direction;
use super::logging::EXPORT_ERRORS;
use super::settings::Export;
use super::transport::{Signal, Transport, unix_nanos};

/// One of the two histograms: what a reader sees of it.
struct Spec {
    name: &'static str,
    /// The name opentelemetry-prometheus gives it (unit suffix included).
    prometheus_name: &'static str,
    unit: &'static str,
    description: &'static str,
    bounds: &'static [f64],
    /// Recorded units per reported unit (nanoseconds per second).
    divisor: f64,
}

const SIZE: Spec = Spec {
    name: "websocket.server.message.size",
    prometheus_name: "websocket_server_message_size_bytes",
    unit: "By",
    description: "Payload size of data messages, by direction.",
    bounds: buckets::MESSAGE_BYTES,
    divisor: 1.0,
};

const DURATION: Spec = Spec {
    name: "websocket.server.message.duration",
    prometheus_name: "websocket_server_message_duration_seconds",
    unit: "s",
    description: "Server time from a message received to its echo written or broadcast queued.",
    bounds: buckets::MESSAGE_SECONDS,
    divisor: 1e9,
};

/// One data point, in reported units.
struct Point {
    attributes: Vec<(&'static str, &'static str)>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    /// `None` while empty.
    min_max: Option<(f64, f64)>,
}

impl Point {
    fn new<const N: usize>(
        attributes: Vec<(&'static str, &'static str)>,
        h: &super::tally::Cumulative<N>,
        divisor: f64,
    ) -> Self {
        let count = h.count();
        Point {
            attributes,
            counts: h.counts.to_vec(),
            count,
            sum: h.sum as f64 / divisor,
            min_max: (count > 0).then(|| (h.min as f64 / divisor, h.max as f64 / divisor)),
        }
    }
}

/// The two histograms of every route, for `/metrics` and OTLP.
pub(crate) struct MessageHistograms {
    routes: Arc<RouteRegistry>,
    /// When the totals started: the start of every cumulative point.
    start: SystemTime,
    /// What opentelemetry-prometheus writes after a series' attributes: the scope, then the
    /// promoted resource attributes.
    prometheus_labels: Vec<LabelPair>,
    resource: Resource,
}

impl MessageHistograms {
    pub(crate) fn new(routes: Arc<RouteRegistry>, resource: &Resource, promoted: &[&str]) -> Self {
        let mut labels = vec![
            label("otel_scope_name", super::SCOPE),
            label("otel_scope_version", env!("CARGO_PKG_VERSION")),
        ];
        let mut selected: Vec<LabelPair> = resource
            .iter()
            .filter(|(k, _)| promoted.contains(&k.as_str()))
            .map(|(k, v)| label(&sanitize(k.as_str()), &v.to_string()))
            .collect();
        selected.sort_by(|a, b| a.name().cmp(b.name()));
        labels.extend(selected);
        MessageHistograms {
            routes,
            start: SystemTime::now(),
            prometheus_labels: labels,
            resource: resource.clone(),
        }
    }

    /// Every route's points of both histograms, as of the last hand-over.
    fn points(&self) -> [(&'static Spec, Vec<Point>); 2] {
        let mut routes = routes_of(&self.routes);
        routes.sort_by_key(|r| r.route().as_str());
        let (mut size, mut duration) = (Vec::new(), Vec::new());
        for r in routes {
            let route = r.route().as_str();
            let totals = r.totals();
            for d in Direction::ALL {
                size.push(Point::new(
                    vec![("http.route", route), ("network.io.direction", d.as_str())],
                    &totals.size[d as usize],
                    SIZE.divisor,
                ));
            }
            duration.push(Point::new(
                vec![("http.route", route)],
                &totals.duration,
                DURATION.divisor,
            ));
        }
        // By name, as `Registry::gather` orders families.
        [(&DURATION, duration), (&SIZE, size)]
    }

    /// The two families as opentelemetry-prometheus would write them, to be merged into the
    /// registry's (sorted by name, series by label values, as `Registry::gather` does).
    pub(crate) fn prometheus(&self) -> Vec<MetricFamily> {
        self.points()
            .into_iter()
            .map(|(spec, points)| {
                let mut series: Vec<prometheus::proto::Metric> = points
                    .iter()
                    .map(|p| self.prometheus_series(spec, p))
                    .collect();
                series.sort_by(|a, b| {
                    let values = |m: &prometheus::proto::Metric| {
                        m.get_label()
                            .iter()
                            .map(|l| l.value().to_owned())
                            .collect::<Vec<_>>()
                    };
                    values(a).cmp(&values(b))
                });
                let mut mf = MetricFamily::default();
                mf.set_name(spec.prometheus_name.to_owned());
                mf.set_help(spec.description.to_owned());
                mf.set_field_type(MetricType::HISTOGRAM);
                mf.set_metric(series);
                mf
            })
            .collect()
    }

    fn prometheus_series(&self, spec: &Spec, p: &Point) -> prometheus::proto::Metric {
        let mut labels: Vec<LabelPair> = p
            .attributes
            .iter()
            .map(|(k, v)| label(&sanitize(k), v))
            .collect();
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        labels.extend(self.prometheus_labels.iter().cloned());
        let mut cumulative = 0;
        let buckets = spec
            .bounds
            .iter()
            .zip(&p.counts)
            .map(|(&bound, &n)| {
                cumulative += n;
                let mut b = prometheus::proto::Bucket::default();
                b.set_upper_bound(bound);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = prometheus::proto::Histogram::default();
        h.set_sample_sum(p.sum);
        h.set_sample_count(p.count);
        h.set_bucket(buckets);
        let mut m = prometheus::proto::Metric::default();
        m.set_label(labels);
        m.set_histogram(h);
        m
    }

    /// Both histograms as one OTLP request, with the SDK's resource and scope; `None` while
    /// there is no route (a library user's server before its first connection).
    fn otlp_request(&self) -> Option<ExportMetricsServiceRequest> {
        if self
            .routes
            .read()
            .expect("route registry poisoned")
            .is_empty()
        {
            return None;
        }
        let start = unix_nanos(self.start);
        let now = unix_nanos(SystemTime::now());
        let metrics = self
            .points()
            .into_iter()
            .map(|(spec, points)| metrics::Metric {
                name: spec.name.to_owned(),
                description: spec.description.to_owned(),
                unit: spec.unit.to_owned(),
                data: Some(metrics::metric::Data::Histogram(metrics::Histogram {
                    aggregation_temporality: metrics::AggregationTemporality::Cumulative as i32,
                    data_points: points
                        .into_iter()
                        .map(|p| metrics::HistogramDataPoint {
                            attributes: p.attributes.iter().map(|(k, v)| string_kv(k, v)).collect(),
                            start_time_unix_nano: start,
                            time_unix_nano: now,
                            count: p.count,
                            sum: Some(p.sum),
                            bucket_counts: p.counts,
                            explicit_bounds: spec.bounds.to_vec(),
                            min: p.min_max.map(|(min, _)| min),
                            max: p.min_max.map(|(_, max)| max),
                            ..Default::default()
                        })
                        .collect(),
                })),
                ..Default::default()
            })
            .collect();
        let resource =
            opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema::from(
                &self.resource,
            );
        Some(ExportMetricsServiceRequest {
            resource_metrics: vec![metrics::ResourceMetrics {
                resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                    attributes: resource.attributes.0,
                    ..Default::default()
                }),
                scope_metrics: vec![metrics::ScopeMetrics {
                    scope: Some(common::InstrumentationScope {
                        name: super::SCOPE.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    metrics,
                    ..Default::default()
                }],
                schema_url: resource.schema_url.unwrap_or_default(),
            }],
        })
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

/// A Prometheus label name for an attribute key, as opentelemetry-prometheus makes it.
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn string_kv(k: &str, v: &str) -> common::KeyValue {
    common::KeyValue {
        key: k.to_owned(),
        value: Some(common::AnyValue {
            value: Some(common::any_value::Value::StringValue(v.to_owned())),
        }),
        ..Default::default()
    }
}

/// The SDK's OTLP metric exporter, plus the per-message histograms in a request of their own
/// on every export.
pub(crate) struct HistogramExporter<E> {
    inner: E,
    histograms: Arc<MessageHistograms>,
    transport: Transport,
    endpoint: String,
}

impl<E> HistogramExporter<E> {
    pub(crate) fn new(
        inner: E,
        histograms: Arc<MessageHistograms>,
        export: &Export,
        metadata: tonic::metadata::MetadataMap,
    ) -> Result<Self, String> {
        Ok(HistogramExporter {
            inner,
            histograms,
            transport: Transport::new(export, Signal::Metrics, metadata)?,
            endpoint: export.endpoint.clone(),
        })
    }
}

impl<E: PushMetricExporter> PushMetricExporter for HistogramExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        // The SDK has just run the collection callbacks, which handed the tallies over: the
        // totals read now count every message its counters count.
        let request = self.histograms.otlp_request();
        let ours = async {
            match request {
                Some(request) => {
                    use prost::Message;
                    self.transport.send(request.encode_to_vec()).await
                }
                None => Ok(()),
            }
        };
        let (sdk, ours) = futures_util::future::join(self.inner.export(metrics), ours).await;
        if let Err(err) = &ours {
            tracing::warn!(
                target: EXPORT_ERRORS,
                endpoint = %self.endpoint,
                error = %err,
                "cannot export the per-message histograms over OTLP"
            );
        }
        sdk?;
        ours.map_err(OTelSdkError::InternalFailure)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use prometheus::Encoder;

    use super::*;
    use crate::telemetry::PROMOTED_RESOURCE_KEYS;
    use crate::telemetry::instruments::{Instruments, RouteInstruments};
    use crate::telemetry::labels::{MessageType, Route};

    const ROUTES: [Route; 2] = [
        Route::from_static("/ws/echo"),
        Route::from_static("/ws/rooms/{room}"),
    ];
    /// (route, direction, payload bytes) and (route, nanoseconds), on bounds and between.
    const SIZES: [(usize, Direction, u64); 7] = [
        (0, Direction::Receive, 100),
        (0, Direction::Receive, 16),
        (0, Direction::Transmit, 17),
        (0, Direction::Transmit, 4096),
        (1, Direction::Receive, 2_000_000),
        (1, Direction::Receive, 0),
        (0, Direction::Receive, 64),
    ];
    const NANOS: [(usize, u64); 6] = [
        (0, 5_000),
        (0, 5_001),
        (0, 1_000_000),
        (0, 7),
        (1, 2_000_000_000),
        (1, 250_000),
    ];

    fn render(families: &[MetricFamily]) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(families, &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The lines of `text` that belong to the two histograms; sums apart (compared with a
    /// tolerance: the SDK adds seconds one value at a time, the totals divide a sum of
    /// nanoseconds once).
    fn lines(text: &str) -> (Vec<&str>, Vec<(&str, f64)>) {
        let ours =
            |l: &&str| l.contains(SIZE.prometheus_name) || l.contains(DURATION.prometheus_name);
        let (sums, rest): (Vec<&str>, Vec<&str>) =
            text.lines().filter(ours).partition(|l| l.contains("_sum{"));
        let sums = sums
            .into_iter()
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series, value.parse().unwrap())
            })
            .collect();
        (rest, sums)
    }

    /// What opentelemetry-prometheus writes for the same values recorded into SDK histograms,
    /// through the reader and scope `Telemetry` uses, is what `/metrics` gets from the
    /// totals: names, help, type, labels and their order, buckets, counts; sums to rounding.
    #[test]
    fn prometheus_families_read_as_opentelemetry_prometheus_writes_them() {
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "parity"),
                KeyValue::new("service.instance.id", "instance-1"),
                KeyValue::new("cloud.region", "eu-north-1"),
                KeyValue::new("host.name", "not-promoted"),
            ])
            .build();
        let scope = InstrumentationScope::builder(crate::telemetry::SCOPE)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();

        let registry = prometheus::Registry::new();
        let exporter = crate::telemetry::prometheus_reader(&registry).unwrap();
        let sdk = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(exporter)
            .build();
        let meter = sdk.meter_with_scope(scope.clone());
        let size = meter
            .u64_histogram(SIZE.name)
            .with_unit(SIZE.unit)
            .with_description(SIZE.description)
            .with_boundaries(SIZE.bounds.to_vec())
            .build();
        let duration = meter
            .f64_histogram(DURATION.name)
            .with_unit(DURATION.unit)
            .with_description(DURATION.description)
            .with_boundaries(DURATION.bounds.to_vec())
            .build();
        let route_kv = |r: usize| KeyValue::new("http.route", ROUTES[r].as_str());
        let size_kvs = |r: usize, d: Direction| {
            [
                route_kv(r),
                KeyValue::new("network.io.direction", d.as_str()),
            ]
        };
        // Every point exists from the start, as the route's bound instruments made them.
        for r in 0..ROUTES.len() {
            for d in Direction::ALL {
                std::mem::forget(size.bind(&size_kvs(r, d)));
            }
            std::mem::forget(duration.bind(&[route_kv(r)]));
        }
        for (r, d, len) in SIZES {
            size.record(len, &size_kvs(r, d));
        }
        for (r, nanos) in NANOS {
            duration.record(crate::telemetry::tally::seconds(nanos), &[route_kv(r)]);
        }

        let other = SdkMeterProvider::builder().build();
        let instruments = Instruments::new(&other.meter("unused"));
        let registry_of_routes = Arc::<RouteRegistry>::default();
        let routes: Vec<_> = ROUTES
            .map(|r| Arc::new(RouteInstruments::new(&instruments, r)))
            .into_iter()
            .collect();
        for (i, r) in routes.iter().enumerate() {
            registry_of_routes
                .write()
                .unwrap()
                .insert(ROUTES[i].as_str(), r.clone());
        }
        for (r, d, len) in SIZES {
            routes[r].message(d, MessageType::Binary, len as usize);
        }
        for (r, nanos) in NANOS {
            routes[r].record_duration(nanos);
        }
        for r in &routes {
            r.collect();
        }
        let histograms =
            MessageHistograms::new(registry_of_routes, &resource, &PROMOTED_RESOURCE_KEYS);

        let theirs = render(&registry.gather());
        let ours = render(&histograms.prometheus());
        let (their_lines, their_sums) = lines(&theirs);
        let (our_lines, our_sums) = lines(&ours);
        assert!(their_lines.len() > 60, "the SDK rendered them: {theirs}");
        for (ours, theirs) in our_lines.iter().zip(&their_lines) {
            assert_eq!(ours, theirs);
        }
        assert_eq!(our_lines.len(), their_lines.len());
        assert_eq!(our_sums.len(), their_sums.len());
        for ((ours, a), (theirs, b)) in our_sums.iter().zip(&their_sums) {
            assert_eq!(ours, theirs);
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "{ours}: {a} against {b}"
            );
        }
        assert!(ours.contains(r#"cloud_region="eu-north-1""#) && !ours.contains("host_name"));
    }

    /// The OTLP request carries the same points, cumulative, with min and max.
    #[test]
    fn the_otlp_request_has_every_point_with_its_exact_values() {
        let resource = Resource::builder_empty()
            .with_attributes([KeyValue::new("service.name", "otlp")])
            .build();
        let other = SdkMeterProvider::builder().build();
        let instruments = Instruments::new(&other.meter("unused"));
        let routes = Arc::<RouteRegistry>::default();
        let echo = Arc::new(RouteInstruments::new(&instruments, ROUTES[0]));
        routes
            .write()
            .unwrap()
            .insert(ROUTES[0].as_str(), echo.clone());
        for len in [10, 100, 1000] {
            echo.message(Direction::Transmit, MessageType::Text, len);
        }
        echo.record_duration(3_000);
        echo.record_duration(40_000);
        echo.collect();
        let request = MessageHistograms::new(routes, &resource, &[])
            .otlp_request()
            .expect("a route, so a request");
        let rm = &request.resource_metrics[0];
        assert!(
            rm.resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .any(|kv| kv.key == "service.name")
        );
        let sm = &rm.scope_metrics[0];
        assert_eq!(sm.scope.as_ref().unwrap().name, crate::telemetry::SCOPE);
        let histogram = |name: &str| match sm.metrics.iter().find(|m| m.name == name).unwrap().data
        {
            Some(metrics::metric::Data::Histogram(ref h)) => h.clone(),
            _ => panic!("{name} is not a histogram"),
        };
        let size = histogram(SIZE.name);
        assert_eq!(
            size.aggregation_temporality,
            metrics::AggregationTemporality::Cumulative as i32
        );
        assert_eq!(size.data_points.len(), 2, "both directions");
        let tx = size
            .data_points
            .iter()
            .find(|p| {
                p.attributes.iter().any(|kv| {
                    kv.key == "network.io.direction"
                        && format!("{:?}", kv.value).contains("transmit")
                })
            })
            .unwrap();
        assert_eq!(
            (tx.count, tx.sum, tx.min, tx.max),
            (3, Some(1110.0), Some(10.0), Some(1000.0))
        );
        assert_eq!(tx.bucket_counts, vec![1, 0, 1, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(tx.explicit_bounds, buckets::MESSAGE_BYTES.to_vec());
        assert!(tx.start_time_unix_nano > 0 && tx.time_unix_nano >= tx.start_time_unix_nano);
        let rx = size.data_points.iter().find(|p| p != &tx).unwrap();
        assert_eq!((rx.count, rx.min, rx.max), (0, None, None));
        let duration = histogram(DURATION.name);
        let p = &duration.data_points[0];
        assert_eq!((p.count, p.min, p.max), (2, Some(3e-6), Some(4e-5)));
        assert_eq!(p.sum, Some(43_000.0 / 1e9));
    }
}
