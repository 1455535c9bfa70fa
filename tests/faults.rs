//! A panic in one connection's handling, provoked with the test-only `fault-injection`
//! feature (`cargo test --features fault-injection --test faults`): it ends that connection
//! only, with Close 1011, is counted and logged, and frees the connection's slot.
#![cfg(feature = "fault-injection")]

mod common;

use common::otlp::{Receiver, attr, listener};
use common::process::start_with_env;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsotel::routes::PANIC_TRIGGER;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_ends_only_its_connection_and_is_counted() {
    let (l, collector) = listener().await;
    let receiver = Receiver::default();
    let _rx = receiver.serve_grpc(l);
    let server = start_with_env(
        &["--max-connections", "4"],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://{collector}"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    let url = |path: &str| server.url(path);

    let mut echo_victim = connect(&url("/ws/echo")).await;
    let mut echo_other = connect(&url("/ws/echo")).await;
    let mut room_victim = connect(&url("/ws/rooms/lobby")).await;
    let mut room_other = connect(&url("/ws/rooms/lobby")).await;

    // An echo connection panics mid-conversation.
    echo_victim.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut echo_victim).await, Message::text("before"));
    echo_victim
        .send(Message::text(PANIC_TRIGGER))
        .await
        .unwrap();
    assert_eq!(close_code(&mut echo_victim).await, Some(1011));

    // A room member panics; the room goes on without it.
    room_victim
        .send(Message::text(PANIC_TRIGGER))
        .await
        .unwrap();
    assert_eq!(close_code(&mut room_victim).await, Some(1011));

    // The two panicked connections gave their slots back: with a limit of 4, two more fit.
    for ws in [&mut echo_victim, &mut room_victim] {
        while let Some(Ok(_)) = ws.next().await {}
    }
    scrape_when(server.admin, "slots freed", |m| {
        m.sum("websocket_server_active_connections", &[]) == 2.0
    })
    .await;
    // (The gauge drops just before the slot is released: retry a 503 for a moment.)
    let mut newcomer = connect_retrying(&url("/ws/rooms/lobby")).await;
    let mut echo_late = connect_retrying(&url("/ws/echo")).await;
    assert_eq!(
        refused_status(url("/ws/echo")).await,
        503,
        "and the limit still holds"
    );

    // Everyone else is unharmed.
    for i in 0..50 {
        echoes(&mut echo_other, &format!("still here {i}")).await;
    }
    echoes(&mut echo_late, "late").await;
    newcomer.send(Message::text("hello room")).await.unwrap();
    assert_eq!(
        next_data(&mut room_other).await,
        Message::text("hello room")
    );

    let m = scrape(server.admin).await;
    let body = &m.text;
    let panics = |route: &str| {
        m.sum(
            "websocket_server_errors_total",
            &[("error_type", "panic"), ("http_route", route)],
        )
    };
    assert_eq!(panics("/ws/echo"), 1.0, "{body}");
    assert_eq!(panics("/ws/rooms/{room}"), 1.0, "{body}");
    assert_eq!(
        m.sum("websocket_server_active_connections", &[]),
        4.0,
        "two panicked out of six opened: {body}"
    );
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[
                ("websocket_close_reason", "internal_error"),
                ("websocket_close_initiator", "server")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[
                ("http_route", "/ws/echo"),
                ("network_io_direction", "transmit"),
                ("websocket_message_type", "close")
            ]
        ),
        1.0,
        "the 1011 is counted as sent"
    );
    assert_eq!(m.sum("websocket_server_rooms", &[]), 1.0, "lobby lives on");

    for ws in [
        &mut echo_other,
        &mut echo_late,
        &mut room_other,
        &mut newcomer,
    ] {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    server.sigterm();
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "the server survived both panics");

    // Each panic is logged where it happened, then by the connection it ended.
    let hooked: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("panicked") && l.contains("panic.location=src/routes.rs"))
        .collect();
    assert_eq!(hooked.len(), 2, "{lines:#?}");
    assert!(hooked.iter().all(|l| l.contains("fault injected")));
    let closed: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("connection handler panicked: closing with 1011"))
        .collect();
    assert_eq!(closed.len(), 2, "{lines:#?}");
    assert!(closed.iter().all(|l| l.contains("connection.id=")));
    assert!(
        !lines.iter().any(|l| l.contains("connection task panicked")),
        "the panic never escaped the connection's handler"
    );

    // Their connection spans (flushed at exit) end with error status and the reason.
    let connections: Vec<_> = receiver
        .spans()
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "websocket.connection")
        .collect();
    assert_eq!(connections.len(), 6, "{connections:#?}");
    let failed: Vec<_> = connections
        .iter()
        .filter(|s| s.status.as_ref().is_some_and(|st| st.code == 2))
        .collect();
    assert_eq!(failed.len(), 2, "two with error status: {connections:#?}");
    for s in failed {
        assert_eq!(
            attr(&s.attributes, "websocket.close.reason").as_deref(),
            Some("internal_error")
        );
        assert_eq!(
            attr(&s.attributes, "websocket.close.code").as_deref(),
            Some("1011")
        );
        assert_eq!(
            attr(&s.attributes, "websocket.close.initiator").as_deref(),
            Some("server")
        );
    }
}

/// Connects, retrying a 503 (connection limit) for up to 5 s.
async fn connect_retrying(url: &str) -> Client {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r))
                if r.status() == 503 && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect {url}: {e}"),
        }
    }
}
