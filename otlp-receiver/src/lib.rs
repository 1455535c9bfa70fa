//! An OTLP receiver that speaks the real protocol: tonic gRPC services generated from the
//! official opentelemetry-proto definitions, and an HTTP/protobuf endpoint decoding the same
//! messages.
//!
//! One receiver for two users:
//!
//! - wsotel's tests (`tests/common/otlp.rs` re-exports this crate): a [`Receiver`] stores every
//!   request it gets, and the accessors ([`Receiver::spans`], [`Receiver::log_records`],
//!   [`Receiver::last_metrics`], [`as_prometheus`]) read them back for assertions.
//! - the load client's `otlp-sink` (`wsotel-bench otlp-sink`): a [`Receiver`] with
//!   [`discard`](Receiver::discard) set only counts what arrives ([`Receiver::counts`]), the
//!   cheapest real endpoint for a full-telemetry benchmark run.
//!
//! Either can play a faulty collector: [`delay`](Receiver::delay) answers every gRPC export late,
//! [`Receiver::serve_grpc_process`] can be killed like a collector process, and [`blackhole`]
//! accepts connections and never reads or answers them.
#![warn(missing_docs)]

mod counting;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Every trace export request.
    pub traces: Vec<ExportTraceServiceRequest>,
    /// Every metrics export request.
    pub metrics: Vec<ExportMetricsServiceRequest>,
    /// Every logs export request.
    pub logs: Vec<ExportLogsServiceRequest>,
}

/// How much arrived, per signal: export requests and the items in them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Trace export requests.
    pub trace_requests: u64,
    /// Spans in them.
    pub spans: u64,
    /// Metrics export requests.
    pub metric_requests: u64,
    /// Data points in them, over every metric kind.
    pub metric_points: u64,
    /// Logs export requests.
    pub log_requests: u64,
    /// Log records in them.
    pub log_records: u64,
}

/// The live counters behind [`Counts`], shared by every clone of a [`Receiver`]; read them with
/// [`Receiver::counts`].
#[derive(Debug, Default)]
pub struct Counters {
    trace_requests: AtomicU64,
    spans: AtomicU64,
    metric_requests: AtomicU64,
    metric_points: AtomicU64,
    log_requests: AtomicU64,
    log_records: AtomicU64,
}

/// An OTLP receiver. Clones share what was received; build it with `Receiver::default()` (it
/// stores everything, answers at once) or set the public fields.
#[derive(Clone, Default)]
pub struct Receiver {
    /// Every request received, unless [`discard`](Receiver::discard) is set.
    pub received: Arc<Mutex<Received>>,
    /// A slow collector: each gRPC export is stored at once and answered this much later
    /// (zero: at once). HTTP exports are always answered at once.
    pub delay: Duration,
    /// Count every export, keep none of it (the bench's sink: memory stays flat however long the
    /// run); [`received`](Receiver::received) then stays empty. Over gRPC the requests are then
    /// counted by walking their encoding, not decoded into messages (it costs the machine's
    /// other processes less CPU).
    pub discard: bool,
    /// What arrived, counted whether or not it is kept.
    pub counters: Arc<Counters>,
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

impl Receiver {
    async fn answer_late(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    fn take_traces(&self, req: ExportTraceServiceRequest) {
        let spans: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        add(&self.counters.trace_requests, 1);
        add(&self.counters.spans, spans);
        if !self.discard {
            self.received.lock().unwrap().traces.push(req);
        }
    }

    fn take_metrics(&self, req: ExportMetricsServiceRequest) {
        use metric::Data;
        let points: usize = req
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| match &m.data {
                Some(Data::Gauge(g)) => g.data_points.len(),
                Some(Data::Sum(s)) => s.data_points.len(),
                Some(Data::Histogram(h)) => h.data_points.len(),
                Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
                Some(Data::Summary(s)) => s.data_points.len(),
                None => 0,
            })
            .sum();
        add(&self.counters.metric_requests, 1);
        add(&self.counters.metric_points, points);
        if !self.discard {
            self.received.lock().unwrap().metrics.push(req);
        }
    }

    fn take_logs(&self, req: ExportLogsServiceRequest) {
        let records: usize = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        add(&self.counters.log_requests, 1);
        add(&self.counters.log_records, records);
        if !self.discard {
            self.received.lock().unwrap().logs.push(req);
        }
    }

    /// How much arrived so far, per signal (kept or not).
    pub fn counts(&self) -> Counts {
        let c = &*self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            trace_requests: get(&c.trace_requests),
            spans: get(&c.spans),
            metric_requests: get(&c.metric_requests),
            metric_points: get(&c.metric_points),
            log_requests: get(&c.log_requests),
            log_records: get(&c.log_records),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take_traces(req.into_inner());
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
        self.take_metrics(req.into_inner());
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
        self.take_logs(req.into_inner());
        self.answer_late().await;
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on `listener` until `stop` completes, then shuts down gracefully.
    pub async fn serve_grpc_until(
        &self,
        listener: TcpListener,
        stop: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let mut server = tonic::transport::Server::builder();
        if self.discard {
            // Only counts are wanted: walk the bytes, build nothing (module `counting`).
            server
                .add_service(counting::Service::<counting::Traces>::new(self))
                .add_service(counting::Service::<counting::Metrics>::new(self))
                .add_service(counting::Service::<counting::Logs>::new(self))
                .serve_with_incoming_shutdown(incoming, stop)
                .await
        } else {
            server
                .add_service(TraceServiceServer::new(self.clone()))
                .add_service(MetricsServiceServer::new(self.clone()))
                .add_service(LogsServiceServer::new(self.clone()))
                .serve_with_incoming_shutdown(incoming, stop)
                .await
        }
    }

    /// Serves OTLP/gRPC on `listener` until the returned task is aborted.
    ///
    /// # Panics
    ///
    /// The task panics if the server fails.
    pub fn serve_grpc(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let r = self.clone();
        tokio::spawn(async move {
            r.serve_grpc_until(listener, std::future::pending())
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

    /// Serves OTLP/HTTP with protobuf bodies (`POST /v1/{traces,metrics,logs}`) until the
    /// returned task is aborted.
    ///
    /// # Panics
    ///
    /// A request whose body is not the signal's protobuf export request panics its handler.
    pub fn serve_http(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let (t, m, l) = (self.clone(), self.clone(), self.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(move |body: Bytes| async move {
                    let req =
                        ExportTraceServiceRequest::decode(body).expect("protobuf trace request");
                    t.take_traces(req);
                    ExportTraceServiceResponse::default().encode_to_vec()
                }),
            )
            .route(
                "/v1/metrics",
                post(move |body: Bytes| async move {
                    let req = ExportMetricsServiceRequest::decode(body)
                        .expect("protobuf metrics request");
                    m.take_metrics(req);
                    ExportMetricsServiceResponse::default().encode_to_vec()
                }),
            )
            .route(
                "/v1/logs",
                post(move |body: Bytes| async move {
                    let req =
                        ExportLogsServiceRequest::decode(body).expect("protobuf logs request");
                    l.take_logs(req);
                    ExportLogsServiceResponse::default().encode_to_vec()
                }),
            );
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        })
    }

    /// Waits (at most 20 s) until `pred` holds on what was received.
    ///
    /// # Panics
    ///
    /// On the timeout, naming `what`.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Received) -> bool) {
        eventually(what, || pred(&self.received.lock().unwrap())).await
    }

    /// Every span received, with its resource, in arrival order.
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

    /// Every log record received, with its resource, in arrival order.
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

    /// Every export of metric `name` of scope `scope`, oldest first.
    pub fn metric_history(&self, scope: &str, name: &str) -> Vec<Metric> {
        let r = self.received.lock().unwrap();
        r.metrics
            .iter()
            .flat_map(|req| &req.resource_metrics)
            .flat_map(|rm| &rm.scope_metrics)
            .filter(|sm| sm.scope.as_ref().map(|s| s.name.as_str()) == Some(scope))
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == name)
            .cloned()
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

/// A receiver running as if in a process of its own ([`Receiver::serve_grpc_process`]).
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

/// A blackholed collector: accepts every connection on `listener` and never reads from it or
/// answers, holding each open until `stop` completes. Returns how many connections it held.
pub async fn blackhole(listener: TcpListener, stop: impl Future<Output = ()>) -> u64 {
    let mut sockets = Vec::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => sockets.push(socket),
                // Out of descriptors, say: do not spin on it.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
    sockets.len() as u64
}

/// Waits (at most 20 s) until `pred` holds; `pred` may read a [`Receiver`] through its
/// accessors (unlike [`Receiver::wait_for`], which holds the receiver's lock).
///
/// # Panics
///
/// On the timeout, naming `what`.
pub async fn eventually(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binds a loopback listener on a free port.
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

/// A scalar value as text (`Debug` of anything else).
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
///
/// # Panics
///
/// On a metric kind other than sum, gauge or explicit-bucket histogram.
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
