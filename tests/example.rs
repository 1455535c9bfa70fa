//! The chat example (examples/chat.rs), an application built only on wsotel's public API, run
//! as a process with real WebSocket clients: exact values on its `/metrics` and over OTLP to a
//! real OTLP receiver.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::otlp::*;
use common::process::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The example's binary, built by `cargo test` with the tests (beside the test binaries'
/// `deps/`); built here if it is missing.
fn chat_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("chat");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "chat"])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --example chat failed");
    }
    assert!(bin.exists(), "no chat example at {}", bin.display());
    bin
}

/// Starts the chat example on a kernel-chosen port, exporting to the OTLP receiver at `otlp`.
fn start_chat(otlp: SocketAddr) -> Running {
    let mut cmd = Command::new(chat_binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("CHAT_LISTEN", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_BLRP_SCHEDULE_DELAY", "100")
        .env("OTEL_SERVICE_NAME", "chat-example");
    start_command_until(cmd, "chat started")
}

/// The sum over an OTLP metric's points whose attributes include `labels` (named as on
/// `/metrics`: `http_route`).
fn otlp_sum(receiver: &Receiver, name: &str, labels: &[(&str, &str)]) -> f64 {
    receiver
        .last_metrics("wsotel")
        .iter()
        .filter(|(_, m)| m.name == name)
        .flat_map(|(_, m)| as_prometheus(m))
        .filter(|(series, l, _)| {
            !series.ends_with("_bucket")
                && !series.ends_with("_sum")
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_example_is_measured_like_the_server() {
    let (listener, otlp) = listener().await;
    let receiver = Receiver::default();
    let _server = receiver.serve_grpc(listener);
    let chat = start_chat(otlp);
    let url = chat.url("/chat");

    let mut alice = connect(&url).await;
    let mut bob = connect(&url).await;
    let mut carol = connect(&url).await;
    metrics_when_active(&chat, 3).await;

    // Alice sends 37 messages of 100 bytes; Bob and Carol each get all 37.
    let payload = "x".repeat(100);
    for _ in 0..37 {
        alice.send(Message::text(payload.clone())).await.unwrap();
    }
    for member in [&mut bob, &mut carol] {
        for _ in 0..37 {
            assert_eq!(next_data(member).await, Message::text(payload.clone()));
        }
    }
    // A page on another site may not open the chat.
    let mut evil = "ws://x/chat".into_client_request().unwrap();
    *evil.uri_mut() = url.parse().unwrap();
    evil.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(evil).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");

    for ws in [&mut alice, &mut bob, &mut carol] {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let m = metrics_when_active(&chat, 0).await;

    let route = ("http_route", "/chat");
    let sum = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![route];
        all.extend_from_slice(labels);
        m.sum(name, &all)
    };
    let text = ("websocket_message_type", "text");
    let rx = ("network_io_direction", "receive");
    let tx = ("network_io_direction", "transmit");
    assert_eq!(sum("websocket_server_accepted_connections_total", &[]), 3.0);
    assert_eq!(sum("websocket_server_active_connections", &[]), 0.0);
    assert_eq!(sum("websocket_server_messages_total", &[rx, text]), 37.0);
    assert_eq!(sum("websocket_server_messages_total", &[tx, text]), 74.0);
    assert_eq!(sum("websocket_server_io_bytes_total", &[rx]), 3700.0);
    assert_eq!(sum("websocket_server_io_bytes_total", &[tx]), 7400.0);
    assert_eq!(
        sum("websocket_server_message_size_bytes_count", &[rx]),
        37.0
    );
    assert_eq!(
        sum("websocket_server_message_duration_seconds_count", &[]),
        37.0
    );
    assert_eq!(
        sum(
            "websocket_server_connection_duration_seconds_count",
            &[
                ("websocket_close_reason", "normal"),
                ("websocket_close_initiator", "client")
            ]
        ),
        3.0
    );
    assert_eq!(
        sum(
            "websocket_server_rejected_connections_total",
            &[("error_type", "origin_denied")]
        ),
        1.0
    );
    assert_eq!(sum("websocket_server_errors_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "http_server_request_duration_seconds_count",
            &[route, ("http_response_status_code", "101")]
        ),
        3.0
    );

    // The same values over OTLP.
    eventually("OTLP metrics with the 37 messages", || {
        otlp_sum(&receiver, "websocket.server.messages", &[route, rx, text]) == 37.0
            && otlp_sum(&receiver, "websocket.server.io", &[route, tx]) == 7400.0
            && otlp_sum(&receiver, "websocket.server.active_connections", &[route]) == 0.0
    })
    .await;

    chat.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || chat.wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "the example exits 0 on SIGTERM");

    // Three connection spans and three closing log lines, exported at exit.
    let connections: Vec<_> = receiver
        .spans()
        .into_iter()
        .filter(|(_, s)| s.name == "websocket.connection")
        .collect();
    assert_eq!(connections.len(), 3, "{connections:#?}");
    for (resource, span) in &connections {
        assert_eq!(
            attr(&resource.attributes, "service.name").as_deref(),
            Some("chat-example")
        );
        assert_eq!(
            attr(&span.attributes, "http.route").as_deref(),
            Some("/chat")
        );
        assert_eq!(
            attr(&span.attributes, "websocket.close.reason").as_deref(),
            Some("normal")
        );
    }
    let received: Vec<i64> = connections
        .iter()
        .map(|(_, s)| {
            attr(&s.attributes, "websocket.messages.received")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(received.iter().sum::<i64>(), 37, "{received:?}");
    let closed: Vec<_> = receiver
        .log_records()
        .into_iter()
        .filter(|(_, l)| l.body.as_ref().map(any_text).as_deref() == Some("connection closed"))
        .collect();
    assert_eq!(closed.len(), 3);
    let sent: i64 = closed
        .iter()
        .map(|(_, l)| {
            attr(&l.attributes, "websocket.messages.sent")
                .unwrap()
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(sent, 74);
    assert!(
        closed.iter().all(|(_, l)| l.trace_id.len() == 16),
        "the closing lines carry the connection span's trace id"
    );
}

/// The chat's `/metrics` once it holds `n` open connections.
async fn metrics_when_active(chat: &Running, n: usize) -> Metrics {
    scrape_when(chat.ws, &format!("{n} open connections"), |m| {
        m.sum(
            "websocket_server_active_connections",
            &[("http_route", "/chat")],
        ) == n as f64
    })
    .await
}
