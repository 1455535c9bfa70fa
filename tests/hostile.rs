//! Hostile input, byte by byte: handcrafted handshakes and frames over raw TCP. Each gets its
//! RFC 6455 close code or HTTP status, the right reason label and metric, and the server keeps
//! serving everyone else.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Writes one frame. `mask: None` sends it unmasked (illegal from a client).
async fn frame(s: &mut TcpStream, first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    s.write_all(&client_frame(first_byte, payload, mask))
        .await
        .unwrap();
}

const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

/// Reads server frames until a Close; returns its code (None when the TCP connection ends
/// without one).
async fn server_close(s: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).await.is_err() {
                return None;
            }
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    s.read_exact(&mut l).await.ok()?;
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    s.read_exact(&mut l).await.ok()?;
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("server answers within 10 s")
}

/// Reads until the server closes TCP: `Ok` when it ends with a FIN, `Err` on a reset.
async fn read_to_end(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the server closes within 10 s")
}

#[tokio::test]
async fn malformed_frames_get_rfc_close_codes() {
    let server = TestServer::start_with(|c| c.max_message_size = 1024).await;
    // A bystander that must be unaffected by everything below.
    let mut bystander = connect(&server.url("/ws/echo")).await;

    // (first byte, payload, mask, expected close code, expected reason label)
    type Case = (
        &'static str,
        u8,
        Vec<u8>,
        Option<[u8; 4]>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "unmasked client frame",
            0x81,
            b"hi".to_vec(),
            None,
            1002,
            "protocol_error",
        ),
        (
            "reserved bits set",
            0x81 | 0x40,
            b"hi".to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "unknown data opcode",
            0x83,
            b"hi".to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "unknown control opcode",
            0x8b,
            b"hi".to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "fragmented control frame",
            0x09,
            b"hi".to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "oversized control frame",
            0x89,
            vec![0u8; 126],
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "continuation without start",
            0x80,
            b"hi".to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "message over the limit",
            0x82,
            vec![0u8; 1025],
            MASK,
            1009,
            "message_too_big",
        ),
        (
            "invalid utf-8",
            0x81,
            vec![0xc3, 0x28],
            MASK,
            1007,
            "invalid_payload",
        ),
        (
            "close with a reserved code",
            0x88,
            1005u16.to_be_bytes().to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
        (
            "close with an out-of-range code",
            0x88,
            999u16.to_be_bytes().to_vec(),
            MASK,
            1002,
            "protocol_error",
        ),
    ];
    for (i, (what, first, payload, mask, code, reason)) in cases.iter().enumerate() {
        let mut s = raw_ws(server.ws, "/ws/echo").await;
        frame(&mut s, *first, payload, *mask).await;
        assert_eq!(server_close(&mut s).await, Some(*code), "{what}");
        if *first != 0x88 {
            // Finish the closing handshake, as a browser does: the server must read this reply
            // past the frame it failed on, count it, and only then close TCP (no reset).
            frame(&mut s, 0x88, &code.to_be_bytes(), MASK).await;
            let end = read_to_end(&mut s).await;
            assert!(
                end.is_ok(),
                "{what}: the server must end with a FIN, got {end:?}"
            );
        }
        drop(s);
        let closed = i as f64 + 1.0;
        let m = server
            .metrics_when(what, |m| {
                m.sum("websocket_server_connection_duration_seconds_count", &[]) == closed
            })
            .await;
        assert!(
            m.sum(
                "websocket_server_connection_duration_seconds_count",
                &[("websocket_close_reason", reason)]
            ) >= 1.0,
            "{what}: reason {reason}\n{}",
            m.text
        );
        // The bystander still echoes.
        bystander
            .send(Message::text(format!("still here {i}")))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut bystander).await,
            Message::text(format!("still here {i}"))
        );
    }
    let m = server.metrics().await;
    let count = |r: &str| {
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[("websocket_close_reason", r)],
        )
    };
    assert_eq!(count("protocol_error"), 9.0);
    assert_eq!(count("message_too_big"), 1.0);
    assert_eq!(count("invalid_payload"), 1.0);
    // Every one of them is the server's finding, including the two Close frames whose code a
    // client may not send (tungstenite answers those with 1002 on its own).
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[("websocket_close_initiator", "server")]
        ),
        11.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[("error_type", "protocol_error")]
        ),
        9.0
    );
    // Eleven Closes each way (the bystander is still open): the server's, and the client's
    // reply read past the bad frame, or the client's own Close in the two close-code cases.
    for direction in ["transmit", "receive"] {
        assert_eq!(
            m.sum(
                "websocket_server_messages_total",
                &[
                    ("network_io_direction", direction),
                    ("websocket_message_type", "close")
                ]
            ),
            11.0,
            "{direction}\n{}",
            m.text
        );
    }
    assert_eq!(
        m.sum("websocket_server_active_connections", &[]),
        1.0,
        "only the bystander"
    );
    bystander.close(None).await.unwrap();
}

#[tokio::test]
async fn half_closed_client_is_client_aborted() {
    let server = TestServer::start().await;
    let mut s = raw_ws(server.ws, "/ws/echo").await;
    frame(&mut s, 0x81, b"ping?", MASK).await;
    s.shutdown().await.unwrap(); // FIN without a Close frame
    assert_eq!(server_close(&mut s).await, None, "the server just hangs up");
    let m = server.idle().await;
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[("websocket_close_reason", "client_aborted")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[
                ("network_io_direction", "receive"),
                ("websocket_message_type", "text")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn bad_handshakes_get_http_answers() {
    let server = TestServer::start().await;
    let ws = server.ws;
    let base = |extra: &str| {
        format!(
            "GET /ws/echo HTTP/1.1\r\nHost: {ws}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };
    // Missing Sec-WebSocket-Key.
    let (status, _) = http_request(ws, &base("")).await;

    assert_eq!(status, 400);
    // Oversized headers: refused before any handler runs.
    let huge = format!("X-Filler: {}\r\n", "a".repeat(100 * 1024));
    let (status, _) = http_request(
        ws,
        &base(&format!(
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{huge}"
        )),
    )
    .await;
    assert!(
        status == 431 || status == 400,
        "oversized headers got {status}"
    );
    // POST is not an upgrade.
    let (status, _) = http_request(
        ws,
        &format!(
            "POST /ws/echo HTTP/1.1\r\nHost: {ws}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 405);
    let m = server.metrics().await;
    assert_eq!(
        m.sum(
            "websocket_server_rejected_connections_total",
            &[("error_type", "bad_request")]
        ),
        1.0
    );
    // Still serving.
    let mut c = connect(&server.url("/ws/echo")).await;
    c.send(Message::text("ok")).await.unwrap();
    assert_eq!(next_data(&mut c).await, Message::text("ok"));
}

/// Series on `/metrics` of the wsotel scope, as `name{labels}` strings.
fn series(m: &Metrics) -> BTreeSet<String> {
    m.samples
        .iter()
        .filter(|s| s.labels.get("otel_scope_name").map(String::as_str) == Some("wsotel"))
        .filter(|s| !s.name.starts_with("process_"))
        .map(|s| format!("{}{:?}", s.name, s.labels))
        .collect()
}

async fn attack(server: &TestServer, seed: u32) {
    for i in 0..150u32 {
        let n = seed.wrapping_mul(7919).wrapping_add(i);
        // A random room name, a random user agent, a random application close code.
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                server.url(&format!("/ws/rooms/r{n:x}-{}", n % 97)),
            )
            .unwrap();
        req.headers_mut()
            .insert("user-agent", format!("bot/{n}").parse().unwrap());
        let (mut c, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        c.send(Message::text(format!("{n}"))).await.unwrap();
        let code = 3000 + (n % 2000) as u16;
        c.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: format!("reason {n}").into(),
        }))
        .await
        .unwrap();
        while let Some(Ok(_)) = c.next().await {}
        // And a rejected one with a random invalid room name.
        let _ = refused_status(server.url(&format!("/ws/rooms/bad%20{n}"))).await;
    }
}

#[tokio::test]
async fn cardinality_attack_adds_no_series() {
    let server = TestServer::start().await;
    // The scrape records itself: let its own series exist before counting.
    server.metrics().await;
    attack(&server, 1).await;
    let first = server.idle().await;
    let before = series(&first);
    attack(&server, 2).await;
    let after = series(&server.idle().await);
    let added: Vec<_> = after.difference(&before).collect();
    let gone: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && gone.is_empty(),
        "random names, codes and agents changed series: +{added:?} -{gone:?}"
    );
    assert!(after.len() < 500, "bounded: {} series", after.len());
    assert!(!first.text.contains("bot/"), "no user agent on metrics");
    assert!(!first.text.contains("r1"), "no room name on metrics");
}
