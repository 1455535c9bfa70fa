//! wsotel: a WebSocket server whose every connection and message is measured with
//! OpenTelemetry.
//!
//! The binary is a thin wrapper: it parses [`Config`], builds [`Telemetry`], binds the two
//! listeners and calls [`run`]. Tests and embedders call the very same `run`.
#![warn(missing_docs, clippy::print_stdout)]

pub mod admin;
pub mod auth;
pub mod backplane;
pub mod config;
pub mod connection;
pub mod handshake;
pub mod http_metrics;
pub mod limits;
#[cfg(feature = "pprof")]
pub mod profiling;
pub mod rooms;
pub mod server;
pub mod sources;
pub mod telemetry;
pub mod upgrade;
pub mod wire;

pub use config::Config;
pub use server::{ServerError, run};
pub use telemetry::Telemetry;

/// Registers SIGINT and SIGTERM handlers now, and returns a future that resolves when either
/// arrives. Registering up front (not on first poll) means a signal that arrives while the
/// server is still starting is not lost to the default handler. Must be called inside the Tokio
/// runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            },
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM/SIGINT");
                std::future::pending::<()>().await
            }
        }
    }
}
