//! `otlp-sink`: an OTLP/gRPC receiver that accepts traces, metrics and logs, counts them and
//! throws them away: the cheapest real endpoint for a server's full-telemetry benchmark runs,
//! so the server pays for encoding and sending its telemetry and nothing waits on storage.
//!
//! It can also play a faulty collector for `scripts/bench-faults`: `--delay` answers every
//! export late, `--blackhole` accepts connections and never reads or answers.
//!
//! The receiver itself is the workspace crate `otlp-receiver` (the one wsotel's tests use), in
//! its counting-only mode, which counts spans, points and records by walking each request's
//! protobuf without building messages: the sink shares the machine's cores with the client and
//! the server, and a full decode took ~4% of a core from them at 17,000 spans a second.

use otlp_receiver::Receiver;
use serde_json::json;
use tokio::net::TcpListener;

use crate::cli::SinkArgs;

/// Serves until SIGTERM/SIGINT (or `--duration`), then prints what arrived.
pub async fn run(args: SinkArgs) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let sink = Receiver {
        delay: args.delay.unwrap_or_default(),
        discard: true,
        ..Receiver::default()
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
    let held = if args.blackhole {
        otlp_receiver::blackhole(listener, stop).await
    } else {
        sink.serve_grpc_until(listener, stop)
            .await
            .map_err(|e| format!("OTLP server failed: {e}"))?;
        0
    };
    let c = sink.counts();
    let summary = json!({
        "mode": "otlp-sink",
        "listen": addr.to_string(),
        "blackhole": args.blackhole,
        "delay_ms": args.delay.map(|d| d.as_millis() as u64),
        "connections_held": held,
        "trace_requests": c.trace_requests,
        "spans": c.spans,
        "metric_requests": c.metric_requests,
        "metric_points": c.metric_points,
        "log_requests": c.log_requests,
        "log_records": c.log_records,
    });
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(out, "{summary}");
    } else {
        let _ = writeln!(
            out,
            "otlp-sink received {} spans, {} metric points, {} log records",
            c.spans, c.metric_points, c.log_records
        );
    }
    Ok(())
}
