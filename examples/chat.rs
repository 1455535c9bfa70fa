//! A chat server in a few dozen lines, built only on wsotel's public API: every message a
//! member of `/chat` sends goes to every other member, and `/echo` sends each message back (the
//! route the Autobahn conformance suite drives). `/metrics`, `/healthz` and `/readyz` are
//! served on the same listener. `CHAT_LISTEN` sets the address, `CHAT_MAX_MESSAGE_SIZE` the
//! largest message in bytes (64 KiB by default).
//!
//! ```text
//! CHAT_LISTEN=127.0.0.1:8090 OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \
//!     cargo run --example chat
//! ```
//!
//! It gets what wsotel's own routes get: the metric catalog, connection and message spans,
//! logs with trace ids, heartbeats, limits and close reasons, configured by the same `OTEL_*`
//! variables.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use tokio::sync::broadcast;
use wsotel::config::LogFormat;
use wsotel::telemetry::DropReason;
use wsotel::{CloseReason, Message, Telemetry, WebSocket, WebSocketUpgrade, WebSockets};

/// Every message sent to the chat, with its sender's connection id.
type Hub = broadcast::Sender<(u64, Message)>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = Arc::new(Telemetry::from_env()?);
    wsotel::telemetry::logging::init(LogFormat::Text, &telemetry);
    let mut sockets = WebSockets::builder(&telemetry)
        .route("/chat")
        .route("/echo");
    if let Ok(max) = std::env::var("CHAT_MAX_MESSAGE_SIZE") {
        sockets = sockets.max_message_size(max.parse()?);
    }
    let sockets = sockets.build();
    let (hub, _) = broadcast::channel::<(u64, Message)>(256);
    let app = Router::new()
        .route("/chat", get(chat))
        .route("/echo", get(echo))
        .with_state(hub)
        .layer(sockets.layer())
        .merge(wsotel::admin::router(telemetry.clone(), &sockets));

    let addr = std::env::var("CHAT_LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "chat started");
    let shutdown = {
        let sockets = sockets.clone();
        let signal = wsotel::shutdown_signal();
        async move {
            signal.await;
            // New upgrades get 503; every member is closed with 1001.
            sockets.shutdown();
        }
    };
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), sockets.drained()).await;
    tracing::info!("chat stopped");
    telemetry.shutdown(Duration::from_secs(10));
    Ok(())
}

async fn chat(State(hub): State<Hub>, ws: WebSocketUpgrade) -> Response {
    ws.operation("broadcast")
        .on_upgrade(move |socket| member(socket, hub))
}

async fn echo(ws: WebSocketUpgrade) -> Response {
    ws.operation("echo").on_upgrade(|mut socket| async move {
        while let Some(msg) = socket.recv().await {
            if socket.send(msg).await.is_err() {
                // The next `recv` finishes the close and returns `None`.
                continue;
            }
        }
    })
}

/// One member: what it sends goes to the hub, what the others send comes back from it. A
/// member too slow to keep up with the hub is closed as a slow consumer (1008).
async fn member(mut ws: WebSocket, hub: Hub) {
    let me = ws.id();
    let mut others = hub.subscribe();
    loop {
        tokio::select! {
            msg = ws.recv() => {
                let Some(msg) = msg else { break };
                let listeners = hub.send((me, msg)).unwrap_or(0);
                ws.delivered_to(listeners.saturating_sub(1));
            }
            heard = others.recv() => match heard {
                Ok((from, msg)) if from != me => {
                    // A failed send ends the connection; the next `recv` finishes its close.
                    let _ = ws.send(msg).await;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    ws.dropped(DropReason::SlowConsumer, missed);
                    ws.close(CloseReason::SlowConsumer).await;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
}
