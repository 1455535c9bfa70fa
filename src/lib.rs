//! wsotel: a WebSocket server whose every connection and message is measured with
//! OpenTelemetry.
//!
//! The binary is a thin wrapper: it parses [`Config`], builds [`Telemetry`], binds the two
//! listeners and calls [`run`]. Tests and embedders call the very same `run`.
#![warn(missing_docs, clippy::print_stdout)]

pub mod admin;
pub mod config;
pub mod connection;
pub mod handshake;
pub mod http_metrics;
pub mod limits;
pub mod rooms;
pub mod server;
pub mod telemetry;

pub use config::Config;
pub use server::{ServerError, run};
pub use telemetry::Telemetry;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
