//! `otlp-sink`: an OTLP/gRPC receiver that accepts traces, metrics and logs, counts them and
//! throws them away: the cheapest real endpoint for a server's full-telemetry benchmark runs,
//! so the server pays for encoding and sending its telemetry and nothing waits on storage.
//!
//! It can also play a faulty collector for `scripts/bench-faults`: `--delay` answers every
//! export late, `--blackhole` accepts connections and never reads or answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
use serde_json::json;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::cli::SinkArgs;

/// What arrived, per signal.
#[derive(Default)]
struct Counts {
    trace_requests: AtomicU64,
    spans: AtomicU64,
    metric_requests: AtomicU64,
    metric_points: AtomicU64,
    log_requests: AtomicU64,
    log_records: AtomicU64,
}

#[derive(Clone, Default)]
struct Sink {
    counts: Arc<Counts>,
    /// How long each export waits before its answer.
    delay: Option<std::time::Duration>,
}

impl Sink {
    async fn answer_late(&self) {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.counts.trace_requests.fetch_add(1, Ordering::Relaxed);
        self.counts.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.answer_late().await;
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        let points: usize = req
            .get_ref()
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
        self.counts.metric_requests.fetch_add(1, Ordering::Relaxed);
        self.counts
            .metric_points
            .fetch_add(points as u64, Ordering::Relaxed);
        self.answer_late().await;
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        req: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let records: usize = req
            .get_ref()
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.counts.log_requests.fetch_add(1, Ordering::Relaxed);
        self.counts
            .log_records
            .fetch_add(records as u64, Ordering::Relaxed);
        self.answer_late().await;
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

/// Serves until SIGTERM/SIGINT (or `--duration`), then prints what arrived.
pub async fn run(args: SinkArgs) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let sink = Sink {
        delay: args.delay,
        ..Sink::default()
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let behaviour = match (args.blackhole, args.delay) {
            (true, _) => " (blackhole: connections accepted, never answered)".to_owned(),
            (false, Some(d)) => format!(" (every export answered after {d:?})"),
            (false, None) => String::new(),
        };
        let _ = writeln!(out, "otlp-sink listening on {addr}{behaviour}");
        let _ = out.flush();
    }
    let stop = async move {
        let limit = async {
            match args.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = limit => {}
        }
    };
    let mut held = 0u64;
    if args.blackhole {
        let mut sockets = Vec::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        sockets.push(socket);
                        held += 1;
                    }
                    // Out of descriptors, say: do not spin on it.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                },
            }
        }
    } else {
        serve(listener, sink.clone(), stop).await?;
    }
    let c = &sink.counts;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let summary = json!({
        "mode": "otlp-sink",
        "listen": addr.to_string(),
        "blackhole": args.blackhole,
        "delay_ms": args.delay.map(|d| d.as_millis() as u64),
        "connections_held": held,
        "trace_requests": get(&c.trace_requests),
        "spans": get(&c.spans),
        "metric_requests": get(&c.metric_requests),
        "metric_points": get(&c.metric_points),
        "log_requests": get(&c.log_requests),
        "log_records": get(&c.log_records),
    });
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(out, "{summary}");
    } else {
        let _ = writeln!(
            out,
            "otlp-sink received {} spans, {} metric points, {} log records",
            get(&c.spans),
            get(&c.metric_points),
            get(&c.log_records)
        );
    }
    Ok(())
}

async fn serve(
    listener: TcpListener,
    sink: Sink,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .add_service(MetricsServiceServer::new(sink.clone()))
        .add_service(LogsServiceServer::new(sink.clone()))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), stop)
        .await
        .map_err(|e| format!("OTLP server failed: {e}"))?;
    Ok(())
}
