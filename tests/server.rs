//! Integration tests: the real `run`, real WebSocket clients, exact metric values.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn echo_session_counts_exactly() {
    let server = TestServer::start().await;
    let mut ws = connect(&server.url(ECHO)).await;

    let text = "x".repeat(100);
    for _ in 0..37 {
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text(text.clone()));
    }
    let blob = vec![7u8; 1000];
    for _ in 0..5 {
        ws.send(Message::binary(blob.clone())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::binary(blob.clone()));
    }
    for _ in 0..2 {
        ws.send(Message::Ping(vec![1, 2, 3, 4].into()))
            .await
            .unwrap();
    }
    // While open: one active connection, counters already exact.
    let m = server
        .metrics_when("42 messages received", |m| {
            m.sum(
                "websocket_server_messages_total",
                &[ECHO_ROUTE, RX, mtype("ping")],
            ) == 2.0
        })
        .await;
    assert_eq!(
        m.sum("websocket_server_active_connections", &[ECHO_ROUTE]),
        1.0
    );

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    let m = server.idle().await;
    let msgs = |l: &[(&str, &str)]| m.sum("websocket_server_messages_total", l);
    assert_eq!(msgs(&[ECHO_ROUTE, RX, mtype("text")]), 37.0);
    assert_eq!(msgs(&[ECHO_ROUTE, TX, mtype("text")]), 37.0);
    assert_eq!(msgs(&[ECHO_ROUTE, RX, mtype("binary")]), 5.0);
    assert_eq!(msgs(&[ECHO_ROUTE, TX, mtype("binary")]), 5.0);
    assert_eq!(msgs(&[ECHO_ROUTE, RX, mtype("ping")]), 2.0);
    assert_eq!(msgs(&[ECHO_ROUTE, TX, mtype("pong")]), 2.0);
    assert_eq!(msgs(&[ECHO_ROUTE, RX, mtype("close")]), 1.0);
    assert_eq!(msgs(&[ECHO_ROUTE, TX, mtype("close")]), 1.0);
    assert_eq!(
        m.sum("websocket_server_io_bytes_total", &[ECHO_ROUTE, RX]),
        8700.0
    );
    assert_eq!(
        m.sum("websocket_server_io_bytes_total", &[ECHO_ROUTE, TX]),
        8700.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_message_size_bytes_count",
            &[ECHO_ROUTE, RX]
        ),
        42.0
    );
    assert_eq!(
        m.sum("websocket_server_message_size_bytes_sum", &[ECHO_ROUTE, TX]),
        8700.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_message_size_bytes_bucket",
            &[ECHO_ROUTE, RX, ("le", "256")]
        ),
        37.0,
        "the 37 text messages of 100 B fall at or under 256 B, the binary ones above"
    );
    assert_eq!(
        m.sum(
            "websocket_server_message_duration_seconds_count",
            &[ECHO_ROUTE]
        ),
        42.0
    );
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[ECHO_ROUTE]),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_active_connections", &[ECHO_ROUTE]),
        0.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[ECHO_ROUTE, reason("normal")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_connection_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(m.sum("websocket_server_errors_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "http_server_request_duration_seconds_count",
            &[
                ECHO_ROUTE,
                ("http_response_status_code", "101"),
                ("http_request_method", "GET")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn abrupt_reset_counts_client_aborted() {
    let server = TestServer::start().await;
    let mut ws = connect(&server.url(ECHO)).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("hello"));
    server
        .metrics_when("one active", |m| {
            m.sum("websocket_server_active_connections", &[]) == 1.0
        })
        .await;
    if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        #[allow(deprecated)] // SO_LINGER 0 is exactly what makes close send RST here
        tcp.set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(ws);
    let m = server.idle().await;
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[ECHO_ROUTE, reason("client_aborted")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_connection_duration_seconds_count", &[]),
        1.0
    );
}

#[tokio::test]
async fn room_fan_out_reaches_every_other_member() {
    let server = TestServer::start().await;
    let url = server.url("/ws/rooms/lobby");
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    let mut c = connect(&url).await;
    let mut elsewhere = connect(&server.url("/ws/rooms/other")).await;
    let m = server
        .metrics_when("four members", |m| {
            m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == 4.0
        })
        .await;
    assert_eq!(m.sum("websocket_server_rooms", &[]), 2.0);

    for i in 0..4 {
        a.send(Message::text(format!("from a {i}"))).await.unwrap();
    }
    b.send(Message::binary(vec![1u8; 10])).await.unwrap();
    // Each sender's messages arrive in order; senders interleave freely.
    let mut at_b = Vec::new();
    for _ in 0..4 {
        at_b.push(next_data(&mut b).await);
    }
    let mut at_c = Vec::new();
    for _ in 0..5 {
        at_c.push(next_data(&mut c).await);
    }
    let from_a: Vec<Message> = (0..4)
        .map(|i| Message::text(format!("from a {i}")))
        .collect();
    assert_eq!(at_b, from_a);
    assert_eq!(
        at_c.iter()
            .filter(|m| m.is_text())
            .cloned()
            .collect::<Vec<_>>(),
        from_a
    );
    assert_eq!(at_c.iter().filter(|m| m.is_binary()).count(), 1);
    assert_eq!(next_data(&mut a).await, Message::binary(vec![1u8; 10]));
    // Nothing crossed into the other room, and nothing echoed back to its sender.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), next_data(&mut elsewhere))
            .await
            .is_err()
    );

    for mut ws in [a, b, c, elsewhere] {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let m = server.idle().await;
    let msgs = |l: &[(&str, &str)]| m.sum("websocket_server_messages_total", l);
    assert_eq!(msgs(&[ROOMS_ROUTE, RX, mtype("text")]), 4.0);
    assert_eq!(msgs(&[ROOMS_ROUTE, RX, mtype("binary")]), 1.0);
    assert_eq!(
        msgs(&[ROOMS_ROUTE, TX, mtype("text")]),
        8.0,
        "one per recipient"
    );
    assert_eq!(msgs(&[ROOMS_ROUTE, TX, mtype("binary")]), 2.0);
    let text_bytes = (0..4).map(|i| format!("from a {i}").len()).sum::<usize>() as f64;
    assert_eq!(
        m.sum("websocket_server_io_bytes_total", &[ROOMS_ROUTE, RX]),
        text_bytes + 10.0
    );
    assert_eq!(
        m.sum("websocket_server_io_bytes_total", &[ROOMS_ROUTE, TX]),
        2.0 * (text_bytes + 10.0)
    );
    assert_eq!(m.sum("websocket_server_rooms", &[]), 0.0);
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "websocket_server_accepted_connections_total",
            &[ROOMS_ROUTE]
        ),
        4.0
    );
}

#[tokio::test]
async fn heartbeat_measures_round_trips_and_ends_silent_peers() {
    let server = TestServer::start_with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.pong_timeout = Duration::from_millis(300);
    })
    .await;
    // A live client: reading lets tungstenite answer the server's pings.
    let mut live = connect(&server.url(ECHO)).await;
    let reader = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, live.next()).await {}
        live
    });
    // A silent client: never reads, so never pongs.
    let silent = connect(&server.url(ECHO)).await;

    let m = server
        .metrics_when("the silent peer timed out", |m| {
            m.sum(
                "websocket_server_connection_duration_seconds_count",
                &[reason("heartbeat_timeout")],
            ) == 1.0
        })
        .await;
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[ECHO_ROUTE, ("error_type", "heartbeat_timeout")]
        ),
        1.0
    );
    let mut live = reader.await.unwrap();
    let m = server.metrics().await;
    assert!(
        m.sum("websocket_server_ping_duration_seconds_count", &[]) >= 3.0,
        "{}",
        m.text
    );
    assert!(
        m.sum(
            "websocket_server_messages_total",
            &[ECHO_ROUTE, TX, mtype("ping")]
        ) >= 4.0
    );
    assert_eq!(
        m.sum("websocket_server_ping_duration_seconds_count", &[]),
        m.sum(
            "websocket_server_messages_total",
            &[ECHO_ROUTE, RX, mtype("pong")]
        ),
        "every pong answered a ping"
    );
    assert_eq!(
        m.sum("websocket_server_active_connections", &[]),
        1.0,
        "the live one stays"
    );
    live.close(None).await.unwrap();
    drop(silent);
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let server = TestServer::start_with(|c| c.max_message_size = 1024).await;
    let mut ws = connect(&server.url(ECHO)).await;
    ws.send(Message::binary(vec![0u8; 1024])).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(vec![0u8; 1024]));
    ws.send(Message::binary(vec![0u8; 1025])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));
    let m = server.idle().await;
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[reason("message_too_big")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[ECHO_ROUTE, ("error_type", "message_too_big")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[ECHO_ROUTE, TX, mtype("close")]
        ),
        1.0
    );
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = TestServer::start().await;
    let mut ws = connect(&server.url(ECHO)).await;
    let frame = Frame::message(vec![0xff, 0xfe, 0x41], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1007));
    let m = server.idle().await;
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[reason("invalid_payload")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[("error_type", "invalid_utf8")]
        ),
        1.0
    );
}

#[tokio::test]
async fn client_close_codes_map_to_bounded_reasons() {
    let server = TestServer::start().await;
    for code in [1001u16, 4000, 4001, 3999, 1011] {
        let mut ws = connect(&server.url(ECHO)).await;
        ws.close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        }))
        .await
        .unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let m = server.idle().await;
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[reason("going_away")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[reason("other")]
        ),
        3.0
    );
    // A client closing with 1011 is its own business: `internal_error`, but from the client,
    // never mistaken for a server fault.
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[
                reason("internal_error"),
                ("websocket_close_initiator", "client")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[("websocket_close_initiator", "server")]
        ),
        0.0
    );
    assert_eq!(m.sum("websocket_server_errors_total", &[]), 0.0);
    let reasons: std::collections::BTreeSet<_> = m
        .matching("websocket_server_connection_duration_seconds_count", &[])
        .map(|s| s.labels["websocket_close_reason"].clone())
        .collect();
    assert_eq!(
        reasons.len(),
        3,
        "client codes must not add series: {reasons:?}"
    );
}

#[tokio::test]
async fn handshake_rejections_answer_and_count() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 2;
        c.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    // Invalid room names: 400 before the upgrade.
    assert_eq!(
        refused_status(server.url("/ws/rooms/bad%20name")).await,
        400
    );
    assert_eq!(
        refused_status(server.url(&format!("/ws/rooms/{}", "r".repeat(65)))).await,
        400
    );
    // Cross-site Origin: 403. Same-host and allow-listed origins pass.
    let origin = |o: String| with_headers(&server.url(ECHO), &[("origin", o)]);
    assert_eq!(
        refused_status(origin("https://evil.example".into())).await,
        403
    );
    let (mut same_host, _) =
        tokio_tungstenite::connect_async(origin(format!("http://{}", server.ws)))
            .await
            .unwrap();
    let (mut listed, _) = tokio_tungstenite::connect_async(origin("https://app.example".into()))
        .await
        .unwrap();
    // Two open: the third gets 503.
    assert_eq!(refused_status(server.url(ECHO)).await, 503);
    // A plain GET without upgrade headers.
    let (status, _) = http_get(server.ws, ECHO).await;
    assert!(status == 400 || status == 426, "plain GET got {status}");
    // Wrong Sec-WebSocket-Version.
    let (status, _) = http_request(
        server.ws,
        &format!(
            "GET /ws/echo HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.ws
        ),
    )
    .await;
    assert_eq!(status, 426, "bad version");
    // A subprotocol the server does not speak: refused where it can be counted (a 101 without
    // it would make a browser abort the connection at once).
    let req = with_headers(
        &server.url(ECHO),
        &[("sec-websocket-protocol", "chat.v1".into())],
    );
    assert_eq!(refused_status(req).await, 400);

    let m = server.metrics().await;
    let rejected = |r: &'static str| {
        m.sum(
            "websocket_server_rejected_connections_total",
            &[("error_type", r)],
        )
    };
    assert_eq!(rejected("invalid_room"), 2.0);
    assert_eq!(rejected("origin_denied"), 1.0);
    assert_eq!(rejected("connection_limit"), 1.0);
    assert_eq!(rejected("bad_request"), 2.0);
    assert_eq!(rejected("unsupported_subprotocol"), 1.0);
    // Saturation: the limit and the usage against it, for utilisation alerts.
    assert_eq!(m.sum("websocket_server_connection_limit", &[]), 2.0);
    assert_eq!(m.sum("websocket_server_active_connections", &[]), 2.0);
    assert_eq!(
        m.sum("websocket_server_pending_connections_limit", &[]),
        1024.0
    );
    assert_eq!(
        m.sum("process_unix_file_descriptor_limit", &[]),
        wsotel::limits::open_file_limit().unwrap() as f64
    );
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[]),
        2.0
    );
    for ws in [&mut same_host, &mut listed] {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    server.idle().await;
    // A freed slot is usable again.
    let mut again = connect(&server.url(ECHO)).await;
    again.close(None).await.unwrap();
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut s = tokio::net::TcpStream::connect(server.ws).await.unwrap();
    s.write_all(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server must hang up on a trickled handshake"
    );
    server
        .metrics_when("handshake timeout counted", |m| {
            m.sum(
                "websocket_server_rejected_connections_total",
                &[("error_type", "handshake_timeout")],
            ) == 1.0
        })
        .await;
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_others_are_unaffected() {
    let server = TestServer::start_with(|c| {
        c.outbound_queue = 8;
        // 600 messages in ~0.2 s: this test is about the slow reader, not the publisher's rate
        // (tests/security.rs holds that).
        c.publish_rate = 0;
    })
    .await;
    let url = server.url("/ws/rooms/busy");
    // The slow member: a tiny receive buffer and it never reads.
    let stream = connect_small_buffer(server.ws).await;
    let (slow, _) = tokio_tungstenite::client_async(url.clone(), stream)
        .await
        .unwrap();
    let mut publisher = connect(&url).await;
    let mut reader = connect(&url).await;
    server
        .metrics_when("three members", |m| {
            m.sum("websocket_server_active_connections", &[]) == 3.0
        })
        .await;

    let payload = vec![9u8; 32 * 1024];
    let total = 600;
    let got = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            match next_data(&mut reader).await {
                Message::Binary(b) => {
                    assert_eq!(b.len(), 32 * 1024);
                    n += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (reader, n)
    });
    for _ in 0..total {
        publisher
            .send(Message::binary(payload.clone()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let (mut reader, n) = got.await.unwrap();
    assert_eq!(n, total, "the fast member got every message");

    let m = server
        .metrics_when("slow consumer gone", |m| {
            m.sum(
                "websocket_server_connection_duration_seconds_count",
                &[reason("slow_consumer")],
            ) == 1.0
        })
        .await;
    assert!(
        m.sum(
            "websocket_server_dropped_messages_total",
            &[ROOMS_ROUTE, ("reason", "slow_consumer")]
        ) >= 1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[("error_type", "slow_consumer")]
        ),
        1.0
    );
    assert_eq!(m.sum("websocket_server_active_connections", &[]), 2.0);
    // Every message the publisher sent is accounted for: delivered to a recipient or dropped.
    let delivered = m.sum(
        "websocket_server_messages_total",
        &[ROOMS_ROUTE, TX, mtype("binary")],
    );
    let dropped = m.sum("websocket_server_dropped_messages_total", &[ROOMS_ROUTE]);
    assert_eq!(
        delivered + dropped,
        2.0 * total as f64,
        "two recipients per message"
    );
    publisher.close(None).await.unwrap();
    reader.close(None).await.unwrap();
    drop(slow);
}

// ---- write coalescing (`--room-write-delay`) ---------------------------------------------

const COALESCE_PUBLISHERS: usize = 3;
const COALESCE_BURST: usize = 80;
const COALESCE_SIZE: usize = 48;

/// Publisher `p`'s message number `seq`: who and which, then filler.
fn coalesce_payload(p: usize, seq: usize) -> Vec<u8> {
    let mut v = vec![0xA0 | p as u8; COALESCE_SIZE];
    v[0] = p as u8;
    v[1..3].copy_from_slice(&(seq as u16).to_be_bytes());
    v
}

/// Reads every other publisher's burst: each message intact, each publisher's in order, never
/// the member's own (`me`).
async fn read_bursts(mut ws: Client, me: Option<usize>) -> Client {
    let mut next = [0usize; COALESCE_PUBLISHERS];
    let others = COALESCE_PUBLISHERS - usize::from(me.is_some());
    for _ in 0..others * COALESCE_BURST {
        let Message::Binary(b) = next_data(&mut ws).await else {
            panic!("only binary messages are published");
        };
        let (p, seq) = (b[0] as usize, u16::from_be_bytes([b[1], b[2]]) as usize);
        assert_ne!(Some(p), me, "a member never gets its own message");
        assert_eq!(
            seq, next[p],
            "publisher {p}'s messages in the order it sent them"
        );
        assert_eq!(b.as_ref(), coalesce_payload(p, seq), "intact");
        next[p] += 1;
    }
    for (p, n) in next.iter().enumerate() {
        let want = if Some(p) == me { 0 } else { COALESCE_BURST };
        assert_eq!(*n, want, "all of publisher {p}'s burst");
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_room_writes_deliver_every_burst_complete_and_in_order() {
    // A long window, so nearly every write is a coalesced one; 3 bursts of 80 at once stay
    // under the 256-message queue.
    let server = TestServer::start_with(|c| c.room_write_delay = Duration::from_millis(20)).await;
    let url = server.url("/ws/rooms/coalesce");
    const LISTENERS: usize = 3;
    let mut publishers = Vec::new();
    for _ in 0..COALESCE_PUBLISHERS {
        publishers.push(connect(&url).await);
    }
    let mut listeners = Vec::new();
    for _ in 0..LISTENERS {
        listeners.push(connect(&url).await);
    }
    let members = COALESCE_PUBLISHERS + LISTENERS;
    server
        .metrics_when("every member in", |m| {
            m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == members as f64
        })
        .await;

    let mut readers = Vec::new();
    for ws in listeners {
        readers.push(tokio::spawn(read_bursts(ws, None)));
    }
    // Every publisher writes its whole burst at once (one TCP write), all at the same time.
    for (p, mut ws) in publishers.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            for seq in 0..COALESCE_BURST {
                ws.feed(Message::binary(coalesce_payload(p, seq)))
                    .await
                    .unwrap();
            }
            ws.flush().await.unwrap();
            read_bursts(ws, Some(p)).await
        }));
    }
    for reader in readers {
        bye(reader.await.unwrap()).await;
    }

    let m = server.idle().await;
    let published = (COALESCE_PUBLISHERS * COALESCE_BURST) as f64;
    let deliveries = published * (members - 1) as f64;
    let msgs = |l: &[(&str, &str)]| m.sum("websocket_server_messages_total", l);
    assert_eq!(msgs(&[ROOMS_ROUTE, RX, mtype("binary")]), published);
    assert_eq!(msgs(&[ROOMS_ROUTE, TX, mtype("binary")]), deliveries);
    let bytes = |l: &[(&str, &str)]| m.sum("websocket_server_io_bytes_total", l);
    assert_eq!(bytes(&[ROOMS_ROUTE, RX]), published * COALESCE_SIZE as f64);
    assert_eq!(bytes(&[ROOMS_ROUTE, TX]), deliveries * COALESCE_SIZE as f64);
    assert_eq!(
        m.sum(
            "websocket_server_message_size_bytes_count",
            &[ROOMS_ROUTE, TX]
        ),
        deliveries
    );
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[ROOMS_ROUTE, reason("normal")]
        ),
        members as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalescing_member_writes_early_when_its_queue_is_half_full() {
    // A 100 ms window and a 16-message queue: a message every 2 ms would fill the queue well
    // within one window. The room wakes the member at 8 queued, so it keeps up.
    let server = TestServer::start_with(|c| {
        c.room_write_delay = Duration::from_millis(100);
        c.outbound_queue = 16;
        c.publish_rate = 0;
    })
    .await;
    let url = server.url("/ws/rooms/hurry");
    let mut publisher = connect(&url).await;
    let mut listener = connect(&url).await;
    server
        .metrics_when("two members", |m| {
            m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == 2.0
        })
        .await;
    let total = 64;
    let reader = tokio::spawn(async move {
        for i in 0..total {
            assert_eq!(
                next_data(&mut listener).await,
                Message::binary(vec![i as u8; 32])
            );
        }
        listener
    });
    for i in 0..total {
        publisher
            .send(Message::binary(vec![i as u8; 32]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let listener = reader.await.unwrap();
    bye(publisher).await;
    bye(listener).await;
    let m = server.idle().await;
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[error_type("slow_consumer")]
        ),
        0.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[ROOMS_ROUTE, TX, mtype("binary")]
        ),
        total as f64
    );
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_held_write_and_counts_what_it_held() {
    let mut server =
        TestServer::start_with(|c| c.room_write_delay = Duration::from_millis(100)).await;
    let url = server.url("/ws/rooms/held");
    let mut publisher = connect(&url).await;
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    server
        .metrics_when("three members", |m| {
            m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == 3.0
        })
        .await;
    // The first goes out at once; the rest find the members' last write recent and wait.
    publisher.send(Message::text("first")).await.unwrap();
    assert_eq!(next_data(&mut a).await, Message::text("first"));
    assert_eq!(next_data(&mut b).await, Message::text("first"));
    let sent = 11;
    for i in 1..sent {
        publisher
            .send(Message::text(format!("m{i}")))
            .await
            .unwrap();
    }
    server
        .metrics_when("all published", |m| {
            m.sum(
                "websocket_server_messages_total",
                &[ROOMS_ROUTE, RX, mtype("text")],
            ) == sent as f64
        })
        .await;
    server.begin_shutdown();
    for ws in [&mut publisher, &mut a, &mut b] {
        assert_eq!(close_code(ws).await, Some(1001));
        finish(ws).await;
    }
    tokio::time::timeout(Duration::from_secs(5), &mut server.handle)
        .await
        .expect("run returns after the drain")
        .unwrap()
        .unwrap();
    // Each message is delivered or counted as dropped with the connection, never both, never
    // neither: how many of each depends on when the drain caught the held write.
    let m = server.rendered();
    let delivered = m.sum(
        "websocket_server_messages_total",
        &[ROOMS_ROUTE, TX, mtype("text")],
    );
    let dropped = m.sum(
        "websocket_server_dropped_messages_total",
        &[ROOMS_ROUTE, ("reason", "connection_closed")],
    );
    assert_eq!(
        delivered + dropped,
        2.0 * sent as f64,
        "two recipients each"
    );
    assert_eq!(
        m.sum("websocket_server_dropped_messages_total", &[]),
        dropped
    );
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[reason("server_shutdown")]
        ),
        3.0
    );
}

#[tokio::test]
async fn drain_sends_1001_and_readyz_turns_503() {
    let mut server = TestServer::start().await;
    let (status, _) = http_get(server.admin, "/readyz").await;
    assert_eq!(status, 200);
    let mut a = connect(&server.url(ECHO)).await;
    let mut b = connect(&server.url("/ws/rooms/r1")).await;
    server
        .metrics_when("two open", |m| {
            m.sum("websocket_server_active_connections", &[]) == 2.0
        })
        .await;
    // `a` is busy first: past 16 messages a connection waits for the stop signal on a
    // standing registration (src/connection/stop.rs); `b` never sends, and waits the usual way.
    for i in 0..40 {
        a.send(Message::text(format!("busy {i}"))).await.unwrap();
        let echo = a.next().await.unwrap().unwrap();
        assert_eq!(echo, Message::text(format!("busy {i}")));
    }
    server.begin_shutdown();
    // Neither client answers yet: the drain waits for their closing handshake.
    let frame_a = tokio::time::timeout(Duration::from_secs(5), a.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&frame_a, Message::Close(Some(f)) if u16::from(f.code) == 1001),
        "{frame_a:?}"
    );
    let (status, _) = http_get(server.admin, "/readyz").await;
    assert_eq!(status, 503, "not ready while draining");
    assert_eq!(
        refused_status(server.url(ECHO)).await,
        503,
        "no new upgrades while draining"
    );
    assert_eq!(close_code(&mut b).await, Some(1001));
    while let Some(Ok(_)) = a.next().await {}
    while let Some(Ok(_)) = b.next().await {}
    tokio::time::timeout(Duration::from_secs(5), &mut server.handle)
        .await
        .expect("run returns after the drain")
        .unwrap()
        .unwrap();
    assert!(
        http_get_fails(server.admin).await,
        "the admin listener is closed after the drain"
    );
    let m = server.rendered();
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[reason("server_shutdown")]
        ),
        2.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_rejected_connections_total",
            &[("error_type", "shutting_down")]
        ),
        1.0
    );
    assert_eq!(m.sum("websocket_server_active_connections", &[]), 0.0);
}

async fn http_get_fails(addr: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn admin_endpoints() {
    let server = TestServer::start().await;
    // Spend some CPU so process.cpu.time has ticks to show.
    let spin = std::time::Instant::now();
    let mut x = 0u64;
    while spin.elapsed() < Duration::from_millis(60) {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
    }
    assert_eq!(http_get(server.admin, "/healthz").await.0, 200);
    assert_eq!(http_get(server.admin, "/readyz").await.0, 200);
    // /metrics is not on the public listener.
    assert_eq!(http_get(server.ws, "/metrics").await.0, 404);
    let m = server.metrics().await;
    assert!(m.sum("process_memory_usage_bytes", &[]) > 1e6);
    assert!(m.sum("process_unix_file_descriptor_count", &[]) >= 4.0);
    assert!(m.sum("process_thread_count", &[]) >= 1.0);
    assert!(
        m.sum("process_cpu_time_seconds_total", &[("cpu_mode", "user")])
            + m.sum("process_cpu_time_seconds_total", &[("cpu_mode", "system")])
            > 0.0,
        "{}",
        m.text
    );
    assert!(m.has("process_uptime_seconds"));
    let instance: std::collections::BTreeSet<_> = m
        .samples
        .iter()
        .filter_map(|s| s.labels.get("service_instance_id"))
        .collect();
    assert_eq!(instance.len(), 1, "one instance id on every series");
    assert!(
        m.samples
            .iter()
            .filter(|s| s.name != "target_info")
            .all(|s| s.labels.contains_key("service_instance_id")),
        "service.instance.id labels every series"
    );
    assert!(m.has("target_info"));
}

#[tokio::test]
async fn pipelined_echo_is_exact_and_in_order() {
    // Many messages in flight exercise the batched-write path (feed, flush when no more input
    // is ready); every reply must still come back, in order, and be counted once.
    let server = TestServer::start().await;
    let mut ws = connect(&server.url(ECHO)).await;
    let (mut tx, mut rx) = ws.split();
    let n = 2000;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            tx.feed(Message::text(format!("{i:08}"))).await.unwrap();
            if i % 64 == 63 {
                tx.flush().await.unwrap();
            }
        }
        tx.flush().await.unwrap();
        tx
    });
    for i in 0..n {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(msg, Message::text(format!("{i:08}")));
    }
    let tx = writer.await.unwrap();
    ws = tx.reunite(rx).unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let m = server.idle().await;
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[ECHO_ROUTE, RX, mtype("text")]
        ),
        n as f64
    );
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[ECHO_ROUTE, TX, mtype("text")]
        ),
        n as f64
    );
    assert_eq!(
        m.sum("websocket_server_io_bytes_total", &[ECHO_ROUTE, TX]),
        8.0 * n as f64
    );
}

/// The per-message instruments are tallied per thread and handed to the SDK when a reader
/// collects: a scrape taken after an echo came back counts it, once, on every instrument, and
/// closing the connection adds nothing but its Close frames and its lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scrape_counts_each_message_before_it_exactly_once() {
    // Unpaced publishers: no publish rate.
    let server = TestServer::start_with(|c| c.publish_rate = 0).await;
    // Another route busy on both worker threads meanwhile (one publisher per room, so nothing
    // queues for a reader), so collections overlap recording.
    let mut publishers = Vec::new();
    for room in ["busy-1", "busy-2"] {
        let mut ws = connect(server.url(&format!("/ws/rooms/{room}"))).await;
        publishers.push(tokio::spawn(async move {
            for _ in 0..2000 {
                ws.send(Message::text("p")).await.unwrap();
            }
            ws
        }));
    }
    let echo = |dir: &'static str| [("http_route", "/ws/echo"), ("network_io_direction", dir)];
    let mut ws = connect(server.url("/ws/echo")).await;
    let text = "x".repeat(100);
    for i in 1..=40u32 {
        echoes(&mut ws, &text).await;
        let m = server.metrics().await;
        let i = f64::from(i);
        for dir in ["receive", "transmit"] {
            let [route, direction] = echo(dir);
            let msgs = [route, direction, mtype("text")];
            assert_eq!(m.sum("websocket_server_messages_total", &msgs), i, "{dir}");
            assert_eq!(
                m.sum("websocket_server_io_bytes_total", &echo(dir)),
                100.0 * i
            );
            let size = |s: &str| format!("websocket_server_message_size_bytes_{s}");
            assert_eq!(m.sum(&size("count"), &echo(dir)), i, "{dir}");
            assert_eq!(m.sum(&size("sum"), &echo(dir)), 100.0 * i, "{dir}");
            assert_eq!(
                m.sum(&size("bucket"), &[route, direction, ("le", "64")]),
                0.0
            );
            assert_eq!(
                m.sum(&size("bucket"), &[route, direction, ("le", "256")]),
                i
            );
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    for p in publishers {
        let mut ws = p.await.unwrap();
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let before = server.idle().await;
    let after = server.metrics().await;
    for m in [&before, &after] {
        let [route, direction] = echo("receive");
        assert_eq!(
            m.sum(
                "websocket_server_messages_total",
                &[route, direction, mtype("text")]
            ),
            40.0
        );
        assert_eq!(
            m.sum(
                "websocket_server_messages_total",
                &[route, direction, mtype("close")]
            ),
            1.0
        );
        assert_eq!(
            m.sum("websocket_server_io_bytes_total", &echo("transmit")),
            4000.0
        );
        assert_eq!(
            m.sum("websocket_server_message_duration_seconds_count", &[route]),
            40.0
        );
        let room = [("http_route", "/ws/rooms/{room}"), direction];
        assert_eq!(
            m.sum(
                "websocket_server_messages_total",
                &[room[0], room[1], mtype("text")]
            ),
            4000.0
        );
    }
}
