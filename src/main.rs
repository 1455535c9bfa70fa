//! The `wsotel` binary: configuration, telemetry, listeners, then the library's `run`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use wsotel::{Config, Telemetry, telemetry};

fn main() -> ExitCode {
    telemetry::process::mark_start();
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                err.exit();
            }
            // One clear line, not clap's usage block.
            let rendered = err.to_string();
            let line = rendered.lines().next().unwrap_or("invalid configuration");
            return fatal(line.trim_start_matches("error: "));
        }
    };
    // A key that does not load is a configuration error like any other: one line, exit 2.
    if let Err(err) = wsotel::auth::Authenticator::from_settings(&config.auth()) {
        return fatal(&format!("authentication key: {err}"));
    }
    let otlp = match telemetry::OtlpSettings::from_env() {
        Ok(s) => s,
        Err(err) => return fatal(&err),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => return fatal(&format!("cannot start the runtime: {err}")),
    };
    runtime.block_on(serve(config, otlp))
}

async fn serve(config: Config, otlp: telemetry::OtlpSettings) -> ExitCode {
    let shutdown = wsotel::shutdown_signal();
    // Built inside the runtime: the gRPC exporters need it.
    let telemetry = match Telemetry::new(&otlp) {
        Ok(t) => Arc::new(t),
        Err(err) => return fatal(&err.to_string()),
    };
    telemetry::logging::init(config.log_format, &telemetry);
    log_export_state(&otlp);
    match wsotel::limits::raise_open_file_limit() {
        Ok(limit) => tracing::info!(open_file_limit = limit as i64, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
    let ws = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(err) => return fatal(&format!("cannot listen on {}: {err}", config.listen)),
    };
    let admin = match TcpListener::bind(config.admin_listen).await {
        Ok(l) => l,
        Err(err) => return fatal(&format!("cannot listen on {}: {err}", config.admin_listen)),
    };
    tracing::info!(
        listen = %ws.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin_listen = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        version = env!("CARGO_PKG_VERSION"),
        "wsotel started"
    );
    let result = wsotel::run(ws, admin, config, telemetry.clone(), shutdown).await;
    // Logged before the flush, so the last log record is exported with the rest.
    let code = match result {
        Ok(()) => {
            tracing::info!("wsotel stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "wsotel failed");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown(TELEMETRY_SHUTDOWN);
    code
}

/// Longest the final flush of spans, logs and metrics may hold the exit.
const TELEMETRY_SHUTDOWN: Duration = Duration::from_secs(10);

/// One startup line on what is exported where.
fn log_export_state(otlp: &telemetry::OtlpSettings) {
    use telemetry::settings::Signal;
    if otlp.disabled {
        tracing::info!("OTEL_SDK_DISABLED=true: OTLP export off; /metrics and stdout logs on");
        return;
    }
    if !otlp.any() {
        tracing::info!(
            "OTLP export off (no OTEL_EXPORTER_OTLP_ENDPOINT); /metrics and stdout logs on"
        );
        return;
    }
    for signal in [Signal::Traces, Signal::Metrics, Signal::Logs] {
        match otlp.of(signal) {
            Some(e) => tracing::info!(
                signal = signal.as_str(),
                endpoint = %e.endpoint,
                protocol = e.protocol.as_str(),
                "OTLP export on"
            ),
            None => tracing::info!(signal = signal.as_str(), "OTLP export off"),
        }
    }
}

/// One clear line on stderr, exit code 2.
fn fatal(msg: &str) -> ExitCode {
    eprintln!("wsotel: error: {msg}");
    ExitCode::from(2)
}
