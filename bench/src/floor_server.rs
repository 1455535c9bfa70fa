//! `floor-server`: a plain axum 0.8 WebSocket echo server with no telemetry at all, the floor
//! `scripts/bench` measures wsotel against (its `axum-plain` server).
//!
//! It is what an application would write with axum's own `WebSocketUpgrade` and nothing else:
//! `GET /ws/echo` sends every text and binary message back with `socket.send` (one write per
//! reply), and everything else is left to axum and tungstenite (pongs to pings, the reply to a
//! close). The settings wsotel itself uses are copied so the comparison is of what wsotel adds
//! and not of configuration: a 1 KiB read buffer, an 8 KiB write buffer, messages and frames up
//! to 64 KiB (see `READ_BUFFER` and `WRITE_BUFFER` in `src/layer.rs`), `TCP_NODELAY` on every
//! accepted socket, and tokio's default multi-threaded runtime (`Runtime::new()`, one worker per
//! core). No metrics endpoint, no logs, no spans, no limits, no heartbeat: nothing to scrape.

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::cli::FloorArgs;

/// tungstenite's read buffer: wsotel's `READ_BUFFER`.
const READ_BUFFER: usize = 1024;
/// Written frames are collected up to this size before a write is forced: wsotel's
/// `WRITE_BUFFER`.
const WRITE_BUFFER: usize = 8 * 1024;
/// Largest message and frame: wsotel's default `--max-message-size`.
const MAX_MESSAGE: usize = 64 * 1024;

/// Serves until SIGTERM or SIGINT. Prints `floor-server listening on <addr>` once bound.
pub async fn run(args: FloorArgs) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    println!("floor-server listening on {addr}");
    let app = Router::new().route("/ws/echo", get(upgrade));
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::select! {
        served = axum::serve(listener, app) => served.map_err(|e| e.to_string()),
        // Open connections are dropped with the runtime: nothing to flush.
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(echo)
}

/// Sends every data message back until the client closes or the connection fails. Control
/// frames are answered inside `recv` (a ping's pong, a close's reply).
async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        if matches!(msg, Message::Text(_) | Message::Binary(_)) && socket.send(msg).await.is_err() {
            break;
        }
    }
}
