//! wsotel: WebSocket connections measured with OpenTelemetry, as a server (`wsotel`) and as a
//! library for your own axum 0.8 application.
//!
//! # Use it in your own server
//!
//! Build [`Telemetry`] (configured by the `OTEL_*` variables: OTLP export of metrics, traces
//! and logs, and the Prometheus registry behind `/metrics`), build [`WebSockets`] from it, put
//! [`WebSockets::layer`] on the router that holds your WebSocket routes, and take a
//! [`WebSocketUpgrade`] in their handlers instead of axum's. Your handler gets a
//! [`WebSocket`]: read with [`WebSocket::recv`], write with [`WebSocket::send`]; your message
//! handling stays yours. Every connection then records what `wsotel`'s own routes record
//! (docs/metrics.md has the catalog): `websocket.server.*` counters and histograms by
//! `http.route` (the route template you registered, never the request's path), the
//! heartbeat's round trips, close reasons and who closed, errors by `error.type`, the
//! upgrade's `SERVER` span, a `websocket.connection` span per connection and sampled message
//! spans, and log lines with their trace ids. Pings, pongs, the heartbeat, write deadlines,
//! message size limits and the closing handshake (with the RFC 6455 close code for each
//! failure) are handled for you, and `active_connections` stays exact on every path out of a
//! handler, a panic included.
//!
//! ```
//! use axum::{Router, routing::get};
//! use futures_util::{SinkExt, StreamExt};
//! use wsotel::{Message, Telemetry, WebSocketUpgrade, WebSockets};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let telemetry = Telemetry::standalone()?; // or Telemetry::from_env()? for OTLP export
//! let sockets = WebSockets::builder(&telemetry).route("/shout").build();
//! let app = Router::new()
//!     .route("/shout", get(|ws: WebSocketUpgrade| async move {
//!         ws.on_upgrade(|mut socket| async move {
//!             while let Some(msg) = socket.recv().await {
//!                 let loud = msg.to_text().unwrap_or_default().to_uppercase();
//!                 if socket.send(Message::text(loud)).await.is_err() {
//!                     break;
//!                 }
//!             }
//!         })
//!     }))
//!     .layer(sockets.layer());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(async move {
//!     let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
//!     axum::serve(listener, app).await
//! });
//!
//! let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/shout")).await?;
//! client.send(Message::text("hello")).await?;
//! assert_eq!(client.next().await.unwrap()?, Message::text("HELLO"));
//! client.close(None).await?;
//! while client.next().await.is_some() {}
//! while sockets.open_connections() > 0 {
//!     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! }
//!
//! let metrics = telemetry.render_prometheus()?;
//! let line = |name: &str| metrics.lines().find(|l| l.starts_with(name)).map(str::to_owned);
//! assert!(line("websocket_server_accepted_connections_total{http_route=\"/shout\"")
//!     .is_some_and(|l| l.ends_with(" 1")));
//! assert!(metrics.lines().any(|l| l.starts_with("websocket_server_messages_total{")
//!     && l.contains("network_io_direction=\"receive\"")
//!     && l.contains("websocket_message_type=\"text\"")
//!     && l.ends_with(" 1")));
//! # Ok(()) }
//! ```
//!
//! Logs and traces go out once a subscriber has wsotel's layers: [`telemetry::logging::init`]
//! installs one (stdout lines and the OTLP export), or add
//! [`telemetry::logging::otel_layer`] to a subscriber of your own.
//!
//! examples/chat.rs is a whole application (a chat room, `/metrics` on the same listener,
//! graceful shutdown); the `wsotel` binary's own routes (`routes`) are built on this same
//! API.
//!
//! # The server
//!
//! The binary is a thin wrapper: it parses [`Config`], builds [`Telemetry`], binds the two
//! listeners and calls [`run`]. Tests and embedders call the very same `run`.
#![warn(missing_docs, clippy::print_stdout)]

pub mod admin;
pub mod auth;
pub mod backplane;
mod coalesce;
pub mod config;
mod connection;
mod http_metrics;
mod layer;
pub mod limits;
#[cfg(feature = "pprof")]
pub mod profiling;
mod rooms;
pub mod routes;
pub mod server;
pub mod sources;
pub mod telemetry;
mod upgrade;
mod wire;

pub use config::Config;
pub use connection::{Closer, ConnectionClosed, WebSocket, close_code};
pub use layer::{WebSocketLayer, WebSocketService, WebSockets, WebSocketsBuilder};
pub use server::{ServerError, run};
pub use telemetry::{CloseReason, RejectReason, Route, Telemetry};
pub use tungstenite::Message;
pub use upgrade::WebSocketUpgrade;

/// The parsers of client input that `fuzz/` drives with arbitrary bytes, reachable from its
/// crate. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::layer::origin_allowed;
    pub use crate::rooms::{MAX_ROOM_NAME, valid_room_name};
    pub use crate::wire::FrameScan;
}

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
