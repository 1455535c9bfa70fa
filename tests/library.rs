//! wsotel as a library: small axum applications built on the public API, served in process
//! with `axum::serve`, driven by real WebSocket clients, their telemetry read back with exact
//! values. What an embedder can get wrong (a handler that returns early, panics, closes from
//! another task, a missing layer) is answered here, and counted.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as ClientMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsotel::{CloseReason, Message, RejectReason, Telemetry, WebSocketUpgrade, WebSockets};

/// An application served in process: its address, telemetry and instrumentation.
struct App {
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    sockets: WebSockets,
}

impl App {
    /// Serves `routes` (which get `sockets`' layer) with connect info, on loopback port 0.
    async fn serve(
        configure: impl FnOnce(wsotel::WebSocketsBuilder) -> wsotel::WebSocketsBuilder,
        routes: Router,
    ) -> Self {
        let telemetry = Arc::new(Telemetry::standalone().unwrap());
        let sockets = configure(WebSockets::builder(&telemetry)).build();
        let app = routes.layer(sockets.layer());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap()
        });
        App {
            addr,
            telemetry,
            sockets,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn metrics(&self) -> Metrics {
        Metrics::parse(&self.telemetry.render_prometheus().unwrap())
    }

    /// `/metrics` once no connection is open any more.
    async fn idle(&self) -> Metrics {
        for _ in 0..500 {
            if self.sockets.open_connections() == 0 {
                return self.metrics();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "connections still open: {}",
            self.sockets.open_connections()
        );
    }
}

fn sum(m: &Metrics, name: &str, route: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("http_route", route)];
    all.extend_from_slice(labels);
    m.sum(name, &all)
}

fn closed(m: &Metrics, route: &str, reason: &str, initiator: &str) -> f64 {
    sum(
        m,
        "websocket_server_connection_duration_seconds_count",
        route,
        &[
            ("websocket_close_reason", reason),
            ("websocket_close_initiator", initiator),
        ],
    )
}

#[tokio::test]
async fn a_handler_that_returns_closes_with_1000_and_is_counted() {
    async fn once(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|mut socket| async move {
            if let Some(msg) = socket.recv().await {
                socket.send(msg).await.unwrap();
            }
            // Returning drops the socket while it is open.
        })
    }
    let app = App::serve(|b| b, Router::new().route("/once", get(once))).await;
    let mut client = connect(&app.url("/once")).await;
    client.send(ClientMessage::text("only")).await.unwrap();
    assert_eq!(next_data(&mut client).await, ClientMessage::text("only"));
    assert_eq!(close_code(&mut client).await, Some(1000));

    let m = app.idle().await;
    let r = "/once";
    assert_eq!(
        sum(&m, "websocket_server_accepted_connections_total", r, &[]),
        1.0
    );
    assert_eq!(sum(&m, "websocket_server_active_connections", r, &[]), 0.0);
    let text = ("websocket_message_type", "text");
    let close = ("websocket_message_type", "close");
    let rx = ("network_io_direction", "receive");
    let tx = ("network_io_direction", "transmit");
    assert_eq!(
        sum(&m, "websocket_server_messages_total", r, &[rx, text]),
        1.0
    );
    assert_eq!(
        sum(&m, "websocket_server_messages_total", r, &[tx, text]),
        1.0
    );
    assert_eq!(
        sum(&m, "websocket_server_messages_total", r, &[tx, close]),
        1.0
    );
    assert_eq!(sum(&m, "websocket_server_io_bytes_total", r, &[rx]), 4.0);
    assert_eq!(closed(&m, r, "normal", "server"), 1.0);
    assert_eq!(sum(&m, "websocket_server_errors_total", r, &[]), 0.0);
}

#[tokio::test]
async fn a_panicking_handler_ends_only_its_connection() {
    async fn boom(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|mut socket| async move {
            while let Some(msg) = socket.recv().await {
                if msg.to_text().unwrap() == "panic" {
                    panic!("the application's bug");
                }
                socket.send(msg).await.unwrap();
            }
        })
    }
    let app = App::serve(|b| b, Router::new().route("/boom", get(boom))).await;
    let mut healthy = connect(&app.url("/boom")).await;
    let mut doomed = connect(&app.url("/boom")).await;
    doomed.send(ClientMessage::text("panic")).await.unwrap();
    assert_eq!(close_code(&mut doomed).await, Some(1011));
    healthy
        .send(ClientMessage::text("still here"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut healthy).await,
        ClientMessage::text("still here")
    );
    let m = app.metrics();
    let r = "/boom";
    assert_eq!(sum(&m, "websocket_server_active_connections", r, &[]), 1.0);
    assert_eq!(
        sum(
            &m,
            "websocket_server_errors_total",
            r,
            &[("error_type", "panic")]
        ),
        1.0
    );
    assert_eq!(closed(&m, r, "internal_error", "server"), 1.0);
    healthy.close(None).await.unwrap();
    while let Some(Ok(_)) = healthy.next().await {}
    let m = app.idle().await;
    assert_eq!(closed(&m, r, "normal", "client"), 1.0);
}

#[tokio::test]
async fn a_closer_from_another_task_closes_with_its_reason() {
    async fn kick(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|mut socket| async move {
            let closer = socket.closer();
            let kicker = closer.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                kicker.close(CloseReason::SlowConsumer);
                kicker.close(CloseReason::RateLimited);
            });
            while socket.recv().await.is_some() {}
            assert!(closer.is_closed());
            assert!(socket.send(Message::text("late")).await.is_err());
        })
    }
    let app = App::serve(|b| b, Router::new().route("/kick", get(kick))).await;
    let mut client = connect(&app.url("/kick")).await;
    match next_data(&mut client).await {
        ClientMessage::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1008);
            assert_eq!(
                frame.reason.as_str(),
                "slow consumer",
                "the first reason wins"
            );
        }
        other => panic!("expected Close 1008, got {other:?}"),
    }
    while let Some(Ok(_)) = client.next().await {}
    let m = app.idle().await;
    let r = "/kick";
    assert_eq!(closed(&m, r, "slow_consumer", "server"), 1.0);
    assert_eq!(
        sum(
            &m,
            "websocket_server_errors_total",
            r,
            &[("error_type", "slow_consumer")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "websocket_server_messages_total",
            r,
            &[
                ("network_io_direction", "receive"),
                ("websocket_message_type", "close")
            ]
        ),
        1.0,
        "the client's reply to the Close"
    );
}

#[tokio::test]
async fn refusals_are_answered_counted_and_named() {
    async fn guarded(ws: WebSocketUpgrade, headers: axum::http::HeaderMap) -> Response {
        if !headers.contains_key("x-ticket") {
            return ws.reject(RejectReason::TokenMissing, StatusCode::UNAUTHORIZED);
        }
        ws.on_upgrade(|mut socket| async move { while socket.recv().await.is_some() {} })
    }
    let app = App::serve(
        |b| b.max_connections(1).route("/guarded"),
        Router::new().route("/guarded", get(guarded)),
    )
    .await;
    let request = |ticket: bool, origin: Option<&str>| {
        let mut r = app.url("/guarded").into_client_request().unwrap();
        if ticket {
            r.headers_mut().insert("x-ticket", "1".parse().unwrap());
        }
        if let Some(o) = origin {
            r.headers_mut().insert("origin", o.parse().unwrap());
        }
        r
    };
    assert_eq!(refused_status(request(false, None)).await, 401);
    assert_eq!(
        refused_status(request(true, Some("https://evil.example"))).await,
        403
    );
    let (mut first, _) = tokio_tungstenite::connect_async(request(true, None))
        .await
        .unwrap();
    assert_eq!(
        refused_status(request(true, None)).await,
        503,
        "one at most"
    );

    // Shutdown: the open connection gets 1001, new ones 503.
    app.sockets.shutdown();
    assert_eq!(close_code(&mut first).await, Some(1001));
    tokio::time::timeout(Duration::from_secs(5), app.sockets.drained())
        .await
        .expect("drained");
    assert_eq!(refused_status(request(true, None)).await, 503);

    let m = app.metrics();
    let r = "/guarded";
    let rejected = |reason: &str| {
        sum(
            &m,
            "websocket_server_rejected_connections_total",
            r,
            &[("error_type", reason)],
        )
    };
    assert_eq!(rejected("token_missing"), 1.0);
    assert_eq!(rejected("origin_denied"), 1.0);
    assert_eq!(rejected("connection_limit"), 1.0);
    assert_eq!(rejected("shutting_down"), 1.0);
    assert_eq!(closed(&m, r, "server_shutdown", "server"), 1.0);
    assert_eq!(
        m.sum(
            "http_server_request_duration_seconds_count",
            &[("http_route", r), ("http_response_status_code", "503")]
        ),
        2.0
    );
}

#[tokio::test]
async fn a_route_without_the_layer_is_a_clear_500() {
    let app = Router::new().route(
        "/bare",
        get(|ws: WebSocketUpgrade| async move { ws.on_upgrade(|_socket| async {}) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let status = refused_status(format!("ws://{addr}/bare")).await;
    assert_eq!(status, 500);
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_cut_and_the_round_trips_are_measured() {
    async fn quiet(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|mut socket| async move { while socket.recv().await.is_some() {} })
    }
    let app = App::serve(
        |b| {
            b.ping_interval(Duration::from_millis(100))
                .pong_timeout(Duration::from_millis(200))
        },
        Router::new().route("/quiet", get(quiet)),
    )
    .await;
    // A client that reads answers pings; one that never reads never answers, and is cut once
    // its pong is overdue.
    let mut live = connect(&app.url("/quiet")).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                msg = live.next() => if !matches!(msg, Some(Ok(_))) { panic!("the reading client was cut") },
            }
        }
        live.close(None).await.unwrap();
        while let Some(Ok(_)) = live.next().await {}
    });
    let silent = connect(&app.url("/quiet")).await;
    let r = "/quiet";
    let mut m = app.metrics();
    for _ in 0..500 {
        if closed(&m, r, "heartbeat_timeout", "server") > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = app.metrics();
    }
    assert_eq!(closed(&m, r, "heartbeat_timeout", "server"), 1.0);
    assert_eq!(
        sum(
            &m,
            "websocket_server_errors_total",
            r,
            &[("error_type", "heartbeat_timeout")]
        ),
        1.0
    );
    assert!(
        m.sum("websocket_server_ping_duration_seconds_count", &[]) >= 1.0,
        "round trips of the reading client"
    );
    drop(silent);
    stop.send(()).unwrap();
    reader.await.unwrap();
    let m = app.idle().await;
    assert_eq!(sum(&m, "websocket_server_active_connections", r, &[]), 0.0);
    assert_eq!(closed(&m, r, "normal", "client"), 1.0);
}

#[tokio::test]
async fn a_handler_that_only_sends_sees_the_shutdown_at_its_next_write() {
    async fn ticker(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|mut socket| async move {
            let mut n = 0u64;
            loop {
                n += 1;
                if socket.send(Message::text(n.to_string())).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The write that saw the shutdown ended the connection; `recv` finishes the close.
            assert!(socket.recv().await.is_none());
        })
    }
    let app = App::serve(|b| b, Router::new().route("/ticker", get(ticker))).await;
    let mut client = connect(&app.url("/ticker")).await;
    assert_eq!(next_data(&mut client).await, ClientMessage::text("1"));
    app.sockets.shutdown();
    assert_eq!(close_code(&mut client).await, Some(1001));
    tokio::time::timeout(Duration::from_secs(5), app.sockets.drained())
        .await
        .expect("drained: the sender saw the shutdown");
    let m = app.metrics();
    let r = "/ticker";
    assert_eq!(closed(&m, r, "server_shutdown", "server"), 1.0);
    let sent = sum(
        &m,
        "websocket_server_messages_total",
        r,
        &[
            ("network_io_direction", "transmit"),
            ("websocket_message_type", "text"),
        ],
    );
    assert!(sent >= 1.0, "{sent}");
    assert_eq!(
        sum(
            &m,
            "websocket_server_dropped_messages_total",
            r,
            &[("reason", "connection_closed")]
        ),
        1.0,
        "the tick refused by the shutdown"
    );
}

#[tokio::test]
async fn subprotocols_are_the_routes_to_choose() {
    async fn graphql(ws: WebSocketUpgrade) -> Response {
        let ws = ws.protocols(["graphql-transport-ws", "graphql-ws"]);
        let chosen = ws.protocol().unwrap_or("none");
        ws.on_upgrade(move |mut socket| async move {
            let _ = socket.send(Message::text(chosen)).await;
            while socket.recv().await.is_some() {}
        })
    }
    let app = App::serve(|b| b, Router::new().route("/graphql", get(graphql))).await;
    let offer = |protocols: &str| {
        let mut r = app.url("/graphql").into_client_request().unwrap();
        r.headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        r
    };
    // The client's first choice among those the route speaks is named in the 101.
    let (mut ws, response) =
        tokio_tungstenite::connect_async(offer("mqtt, graphql-ws, graphql-transport-ws"))
            .await
            .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "graphql-ws");
    assert_eq!(next_data(&mut ws).await, ClientMessage::text("graphql-ws"));
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    // None that the route speaks: 400, counted.
    assert_eq!(refused_status(offer("mqtt")).await, 400);
    // None offered: none named.
    let mut plain = connect(&app.url("/graphql")).await;
    assert_eq!(next_data(&mut plain).await, ClientMessage::text("none"));
    let m = app.metrics();
    assert_eq!(
        sum(
            &m,
            "websocket_server_rejected_connections_total",
            "/graphql",
            &[("error_type", "unsupported_subprotocol")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_socket_moved_to_another_task_is_counted_until_it_is_dropped() {
    async fn handoff(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|socket| async move {
            // The handler returns at once; the connection lives on in another task.
            tokio::spawn(async move {
                let mut socket = socket;
                while let Some(msg) = socket.recv().await {
                    let _ = socket.send(msg).await;
                }
            });
        })
    }
    let app = App::serve(
        |b| b.max_connections(1),
        Router::new().route("/handoff", get(handoff)),
    )
    .await;
    let mut first = connect(&app.url("/handoff")).await;
    first.send(ClientMessage::text("ping")).await.unwrap();
    assert_eq!(next_data(&mut first).await, ClientMessage::text("ping"));
    assert_eq!(app.sockets.open_connections(), 1);
    assert_eq!(
        refused_status(app.url("/handoff")).await,
        503,
        "the limit still counts it"
    );
    first.close(None).await.unwrap();
    while let Some(Ok(_)) = first.next().await {}
    let m = app.idle().await;
    assert_eq!(closed(&m, "/handoff", "normal", "client"), 1.0);
    let mut second = connect(&app.url("/handoff")).await;
    second.send(ClientMessage::text("again")).await.unwrap();
    assert_eq!(next_data(&mut second).await, ClientMessage::text("again"));
}

#[tokio::test]
async fn try_recv_takes_what_has_already_arrived_and_never_waits() {
    async fn batch(ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(|mut socket| async move {
            // Let the client's three messages arrive, then take them: one waited for, two not.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut got = Vec::new();
            if let Some(first) = socket.recv().await {
                got.push(first.into_text().unwrap().to_string());
            }
            while let Some(more) = socket.try_recv() {
                got.push(more.into_text().unwrap().to_string());
            }
            assert!(
                socket.try_recv().is_none(),
                "nothing more: it does not wait"
            );
            let _ = socket.send(Message::text(got.join(","))).await;
            while socket.recv().await.is_some() {}
        })
    }
    let app = App::serve(|b| b, Router::new().route("/batch", get(batch))).await;
    let mut client = connect(&app.url("/batch")).await;
    for word in ["a", "b", "c"] {
        client.send(ClientMessage::text(word)).await.unwrap();
    }
    assert_eq!(next_data(&mut client).await, ClientMessage::text("a,b,c"));
    client.close(None).await.unwrap();
    while let Some(Ok(_)) = client.next().await {}
    let m = app.idle().await;
    let r = "/batch";
    assert_eq!(
        sum(
            &m,
            "websocket_server_messages_total",
            r,
            &[
                ("network_io_direction", "receive"),
                ("websocket_message_type", "text")
            ]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &m,
            "websocket_server_message_duration_seconds_count",
            r,
            &[]
        ),
        3.0,
        "each message's handling ends when the next is taken, the last at close"
    );
}
