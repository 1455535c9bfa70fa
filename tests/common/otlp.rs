//! A test-side OTLP receiver that speaks the real protocol: tonic gRPC services generated from
//! the official opentelemetry-proto definitions, and an HTTP/protobuf endpoint decoding the same
//! messages. It stores everything it receives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::net::TcpListener;

/// Everything received, in arrival order.
#[derive(Default, Debug)]
pub struct Received {
    pub traces: Vec<ExportTraceServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    pub logs: Vec<ExportLogsServiceRequest>,
}

#[derive(Clone, Default)]
pub struct Receiver {
    pub received: Arc<Mutex<Received>>,
    /// A slow collector: each gRPC export is stored at once and answered this much later.
    pub delay: Duration,
}

impl Receiver {
    async fn answer_late(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().traces.push(req.into_inner());
        self.answer_late().await;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().metrics.push(req.into_inner());
        self.answer_late().await;
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().logs.push(req.into_inner());
        self.answer_late().await;
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on `listener` until the returned task is aborted.
    pub fn serve_grpc(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let r = self.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(r.clone()))
                .add_service(MetricsServiceServer::new(r.clone()))
                .add_service(LogsServiceServer::new(r))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        })
    }

    /// Serves OTLP/gRPC on `listener` from a runtime of its own, like a collector process:
    /// [`Process::kill`] drops that runtime, closing the listener and every connection at once.
    pub fn serve_grpc_process(&self, listener: std::net::TcpListener) -> Process {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let r = self.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let _server = r.serve_grpc(TcpListener::from_std(listener).unwrap());
                let _ = stopped.await;
            });
            // Dropping the runtime drops every task: the connections close with it.
        });
        Process { stop, thread }
    }

    /// Serves OTLP/HTTP with protobuf bodies (`POST /v1/{traces,metrics,logs}`).
    pub fn serve_http(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let (t, m, l) = (self.clone(), self.clone(), self.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(move |body: Bytes| async move {
                    let req =
                        ExportTraceServiceRequest::decode(body).expect("protobuf trace request");
                    t.received.lock().unwrap().traces.push(req);
                    ExportTraceServiceResponse::default().encode_to_vec()
                }),
            )
            .route(
                "/v1/metrics",
                post(move |body: Bytes| async move {
                    let req = ExportMetricsServiceRequest::decode(body)
                        .expect("protobuf metrics request");
                    m.received.lock().unwrap().metrics.push(req);
                    ExportMetricsServiceResponse::default().encode_to_vec()
                }),
            )
            .route(
                "/v1/logs",
                post(move |body: Bytes| async move {
                    let req =
                        ExportLogsServiceRequest::decode(body).expect("protobuf logs request");
                    l.received.lock().unwrap().logs.push(req);
                    ExportLogsServiceResponse::default().encode_to_vec()
                }),
            );
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        })
    }

    /// Waits (at most 20 s) until `pred` holds on what was received.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Received) -> bool) {
        eventually(what, || pred(&self.received.lock().unwrap())).await
    }

    pub fn spans(&self) -> Vec<(Resource, Span)> {
        let r = self.received.lock().unwrap();
        r.traces
            .iter()
            .flat_map(|req| req.resource_spans.iter())
            .flat_map(|rs| {
                let res = rs.resource.clone().unwrap_or_default();
                rs.scope_spans.iter().flat_map(move |ss| {
                    ss.spans.iter().map({
                        let res = res.clone();
                        move |s| (res.clone(), s.clone())
                    })
                })
            })
            .collect()
    }

    pub fn log_records(&self) -> Vec<(Resource, LogRecord)> {
        let r = self.received.lock().unwrap();
        r.logs
            .iter()
            .flat_map(|req| req.resource_logs.iter())
            .flat_map(|rl| {
                let res = rl.resource.clone().unwrap_or_default();
                rl.scope_logs.iter().flat_map(move |sl| {
                    sl.log_records.iter().map({
                        let res = res.clone();
                        move |l| (res.clone(), l.clone())
                    })
                })
            })
            .collect()
    }

    /// The most recent export of every metric of scope `scope`, with its resource.
    pub fn last_metrics(&self, scope: &str) -> Vec<(Resource, Metric)> {
        let r = self.received.lock().unwrap();
        let mut latest: std::collections::BTreeMap<String, (Resource, Metric)> = Default::default();
        for req in &r.metrics {
            for rm in &req.resource_metrics {
                for sm in &rm.scope_metrics {
                    if sm.scope.as_ref().map(|s| s.name.as_str()) != Some(scope) {
                        continue;
                    }
                    for m in &sm.metrics {
                        latest.insert(
                            m.name.clone(),
                            (rm.resource.clone().unwrap_or_default(), m.clone()),
                        );
                    }
                }
            }
        }
        latest.into_values().collect()
    }
}

/// A receiver running as if in a process of its own.
pub struct Process {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Process {
    /// Stops it at once, like a killed collector: its port is free afterwards.
    pub fn kill(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }
}

/// Waits (at most 20 s) until `pred` holds; `pred` may read a [`Receiver`] through its
/// accessors (unlike [`Receiver::wait_for`], which holds the receiver's lock).
pub async fn eventually(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binds a loopback listener.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A string or integer attribute value, as text.
pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(any_text(v))
}

pub fn any_text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// `(Prometheus sample name, labels, value)` for each point of an OTLP metric, named the way the
/// Prometheus exporter names it, so the two paths can be compared.
pub fn as_prometheus(m: &Metric) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let base = m.name.replace('.', "_");
    let unit = match m.unit.as_str() {
        "By" => "_bytes",
        "s" => "_seconds",
        _ => "",
    };
    let labels = |attrs: &[KeyValue]| -> std::collections::BTreeMap<String, String> {
        attrs
            .iter()
            .map(|kv| {
                (
                    kv.key.replace('.', "_"),
                    kv.value.as_ref().map(any_text).unwrap_or_default(),
                )
            })
            .collect()
    };
    let number = |v: &Option<number_data_point::Value>| match v {
        Some(number_data_point::Value::AsDouble(d)) => *d,
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    };
    let mut out = Vec::new();
    match &m.data {
        Some(metric::Data::Sum(s)) => {
            let name = if s.is_monotonic {
                format!("{base}{unit}_total")
            } else {
                format!("{base}{unit}")
            };
            for p in &s.data_points {
                out.push((name.clone(), labels(&p.attributes), number(&p.value)));
            }
        }
        Some(metric::Data::Gauge(g)) => {
            for p in &g.data_points {
                out.push((
                    format!("{base}{unit}"),
                    labels(&p.attributes),
                    number(&p.value),
                ));
            }
        }
        Some(metric::Data::Histogram(h)) => {
            for p in &h.data_points {
                let l = labels(&p.attributes);
                out.push((format!("{base}{unit}_count"), l.clone(), p.count as f64));
                out.push((
                    format!("{base}{unit}_sum"),
                    l.clone(),
                    p.sum.unwrap_or(f64::NAN),
                ));
                let mut cumulative = 0u64;
                for (i, c) in p.bucket_counts.iter().enumerate() {
                    cumulative += c;
                    let mut bl = l.clone();
                    let le = p
                        .explicit_bounds
                        .get(i)
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| "+Inf".into());
                    bl.insert("le".into(), le);
                    out.push((format!("{base}{unit}_bucket"), bl, cumulative as f64));
                }
            }
        }
        other => panic!("unexpected metric data {other:?}"),
    }
    out
}
