//! The discarding receiver's gRPC services: they count what a request carries by walking its
//! protobuf encoding, without building the messages.
//!
//! The bench's sink shares two cores with the load client and the server under test. Decoding
//! every request into the generated types (a `String` per attribute key and value) cost ~4%
//! of a core at 17,000 spans a second, CPU the client and the server then lacked. Walking the
//! bytes reads the same request to its last byte (a malformed one is refused) and allocates
//! nothing. A unit test holds the counts to those of the full decode.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use prost::bytes::Buf;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::{Receiver, add};

/// One signal's request shape: where its items sit, and which counters they go to.
pub(crate) trait Signal: Send + Sync + 'static {
    /// The gRPC service name.
    const NAME: &'static str;
    /// Field numbers from the request down to the counted item; at each level, any of them.
    const PATH: &'static [&'static [u32]];
    fn counters(r: &Receiver) -> (&AtomicU64, &AtomicU64);
}

pub(crate) struct Traces;
pub(crate) struct Metrics;
pub(crate) struct Logs;

impl Signal for Traces {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    // ExportTraceServiceRequest.resource_spans / ResourceSpans.scope_spans / ScopeSpans.spans
    const PATH: &'static [&'static [u32]] = &[&[1], &[2], &[2]];
    fn counters(r: &Receiver) -> (&AtomicU64, &AtomicU64) {
        (&r.counters.trace_requests, &r.counters.spans)
    }
}

impl Signal for Metrics {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    // .../ScopeMetrics.metrics / Metric.{gauge 5, sum 7, histogram 9, exponential_histogram
    // 10, summary 11} / *.data_points
    const PATH: &'static [&'static [u32]] = &[&[1], &[2], &[2], &[5, 7, 9, 10, 11], &[1]];
    fn counters(r: &Receiver) -> (&AtomicU64, &AtomicU64) {
        (&r.counters.metric_requests, &r.counters.metric_points)
    }
}

impl Signal for Logs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    // .../ResourceLogs.scope_logs / ScopeLogs.log_records
    const PATH: &'static [&'static [u32]] = &[&[1], &[2], &[2]];
    fn counters(r: &Receiver) -> (&AtomicU64, &AtomicU64) {
        (&r.counters.log_requests, &r.counters.log_records)
    }
}

/// Counts the items at `path` in the protobuf message `m`; `None` if it is malformed.
pub(crate) fn count(mut m: &[u8], path: &[&[u32]]) -> Option<usize> {
    let Some((fields, rest)) = path.split_first() else {
        return Some(0);
    };
    let mut n = 0;
    while !m.is_empty() {
        let key = varint(&mut m)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                varint(&mut m)?;
            }
            1 => m = m.get(8..)?,
            5 => m = m.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut m)?).ok()?;
                let body = m.get(..len)?;
                m = &m[len..];
                if fields.contains(&field) {
                    n += if rest.is_empty() {
                        1
                    } else {
                        count(body, rest)?
                    };
                }
            }
            _ => return None,
        }
    }
    Some(n)
}

fn varint(m: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = m.split_first()?;
        *m = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Decodes a request into its item count; encodes the (empty) response.
struct Counter<S>(PhantomData<S>);

impl<S: Signal> Codec for Counter<S> {
    type Encode = ();
    type Decode = usize;
    type Encoder = Counter<S>;
    type Decoder = Counter<S>;
    fn encoder(&mut self) -> Self::Encoder {
        Counter(PhantomData)
    }
    fn decoder(&mut self) -> Self::Decoder {
        Counter(PhantomData)
    }
}

impl<S: Signal> Encoder for Counter<S> {
    type Item = ();
    type Error = Status;
    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // Every Export*ServiceResponse without a partial success is the empty message.
        Ok(())
    }
}

impl<S: Signal> Decoder for Counter<S> {
    type Item = usize;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<usize>, Status> {
        let n = {
            let bytes = src.chunk();
            if bytes.len() != src.remaining() {
                return Err(Status::internal("a request in more than one chunk"));
            }
            count(bytes, S::PATH)
                .ok_or_else(|| Status::invalid_argument("malformed OTLP request"))?
        };
        src.advance(src.remaining());
        Ok(Some(n))
    }
}

/// One signal's service for the tonic router.
pub(crate) struct Service<S> {
    receiver: Receiver,
    signal: PhantomData<S>,
}

impl<S> Clone for Service<S> {
    fn clone(&self) -> Self {
        Service {
            receiver: self.receiver.clone(),
            signal: PhantomData,
        }
    }
}

impl<S> Service<S> {
    pub(crate) fn new(receiver: &Receiver) -> Self {
        Service {
            receiver: receiver.clone(),
            signal: PhantomData,
        }
    }
}

impl<S: Signal> NamedService for Service<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S: Signal> tower_service::Service<http::Request<tonic::body::Body>> for Service<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let receiver = self.receiver.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Counter::<S>(PhantomData));
            Ok(grpc.unary(Export::<S>(receiver, PhantomData), req).await)
        })
    }
}

/// The `Export` method: counts the request, answers (late, with a delay).
struct Export<S>(Receiver, PhantomData<S>);

impl<S: Signal> tonic::server::UnaryService<usize> for Export<S> {
    type Response = ();
    type Future = BoxFuture<Result<Response<()>, Status>>;

    fn call(&mut self, request: Request<usize>) -> Self::Future {
        let receiver = self.0.clone();
        Box::pin(async move {
            let (requests, items) = S::counters(&receiver);
            add(requests, 1);
            add(items, request.into_inner());
            receiver.answer_late().await;
            Ok(Response::new(()))
        })
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{self as m, metric::Data};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    use super::*;

    fn kv(k: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue("x".repeat(200))),
            }),
            ..Default::default()
        }
    }

    fn resource() -> Option<Resource> {
        Some(Resource {
            attributes: vec![kv("service.name"), kv("service.instance.id")],
            ..Default::default()
        })
    }

    #[test]
    fn counts_equal_the_full_decode() {
        let span = |i: u64| Span {
            trace_id: vec![1; 16],
            span_id: i.to_be_bytes().to_vec(),
            name: "websocket.message".into(),
            start_time_unix_nano: i,
            attributes: vec![kv("http.route"), kv("connection.id")],
            ..Default::default()
        };
        let traces = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: resource(),
                    scope_spans: vec![
                        ScopeSpans {
                            spans: (0..300).map(span).collect(),
                            ..Default::default()
                        },
                        ScopeSpans {
                            spans: (0..7).map(span).collect(),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                ResourceSpans::default(),
            ],
        };
        assert_eq!(count(&traces.encode_to_vec(), Traces::PATH), Some(307));

        let point = m::NumberDataPoint {
            attributes: vec![kv("http.route")],
            value: Some(m::number_data_point::Value::AsInt(5)),
            ..Default::default()
        };
        let metric = |data| m::Metric {
            name: "n".into(),
            data: Some(data),
            ..Default::default()
        };
        let metrics = ExportMetricsServiceRequest {
            resource_metrics: vec![m::ResourceMetrics {
                resource: resource(),
                scope_metrics: vec![m::ScopeMetrics {
                    metrics: vec![
                        metric(Data::Sum(m::Sum {
                            data_points: vec![point.clone(); 3],
                            ..Default::default()
                        })),
                        metric(Data::Gauge(m::Gauge {
                            data_points: vec![point.clone(); 2],
                        })),
                        metric(Data::Histogram(m::Histogram {
                            data_points: vec![
                                m::HistogramDataPoint {
                                    bucket_counts: vec![1, 2, 3],
                                    explicit_bounds: vec![1.0, 2.0],
                                    ..Default::default()
                                };
                                4
                            ],
                            ..Default::default()
                        })),
                        metric(Data::Summary(m::Summary {
                            data_points: vec![m::SummaryDataPoint::default(); 1],
                        })),
                        metric(Data::ExponentialHistogram(m::ExponentialHistogram {
                            data_points: vec![m::ExponentialHistogramDataPoint::default(); 6],
                            ..Default::default()
                        })),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        assert_eq!(count(&metrics.encode_to_vec(), Metrics::PATH), Some(16));

        let logs = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: resource(),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![
                        LogRecord {
                            body: Some(AnyValue {
                                value: Some(any_value::Value::StringValue("hi".into())),
                            }),
                            ..Default::default()
                        };
                        11
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        assert_eq!(count(&logs.encode_to_vec(), Logs::PATH), Some(11));

        // A request cut short is refused, not half counted.
        let bytes = traces.encode_to_vec();
        assert_eq!(count(&bytes[..bytes.len() - 1], Traces::PATH), None);
        assert_eq!(count(&[], Traces::PATH), Some(0));
    }
}
