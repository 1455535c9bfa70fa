//! OTLP export from the real binary to a real OTLP receiver (tonic gRPC services generated from
//! the official proto definitions, and HTTP/protobuf), during scripted sessions.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::otlp::*;
use common::process::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type Series = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Normalises `le` so both paths print bucket bounds alike.
fn key(name: &str, labels: &BTreeMap<String, String>) -> (String, BTreeMap<String, String>) {
    let mut l = labels.clone();
    if let Some(le) = l.get_mut("le")
        && le != "+Inf"
    {
        *le = le.parse::<f64>().unwrap().to_string();
    }
    (name.to_owned(), l)
}

/// The wsotel-scope series of a `/metrics` scrape, without the labels only Prometheus adds.
fn prometheus_series(m: &Metrics) -> Series {
    m.samples
        .iter()
        .filter(|s| s.labels.get("otel_scope_name").map(String::as_str) == Some("wsotel"))
        .map(|s| {
            let mut l = s.labels.clone();
            for k in [
                "otel_scope_name",
                "otel_scope_version",
                "service_instance_id",
                "cloud_region",
            ] {
                l.remove(k);
            }
            (key(&s.name, &l), s.value)
        })
        .collect()
}

/// Runs a traced echo session: `n` text messages of 50 B, closed with 1000.
async fn echo_session(ws_addr: std::net::SocketAddr, n: usize) {
    let req = with_headers(
        &format!("ws://{ws_addr}/ws/echo"),
        &[
            ("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")),
            ("user-agent", "otlp-test/1.0".into()),
        ],
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    for i in 0..n {
        echoes(&mut ws, &format!("{i:0>50}")).await;
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

/// Waits until `closed` connections have ended.
async fn idle(admin: std::net::SocketAddr, closed: f64) -> Metrics {
    scrape_when(admin, "connections did not close", |m| {
        m.sum("websocket_server_connection_duration_seconds_count", &[]) == closed
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exports_every_signal_linked_and_equal_to_metrics_endpoint() {
    let receiver = Receiver::default();
    let (l, addr) = listener().await;
    let _rx = receiver.serve_grpc(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
            ("OTEL_SERVICE_NAME", "otlp-test"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.instance.id=inst-42,cloud.region=r1,deployment.environment.name=test",
            ),
        ],
    );
    echo_session(server.ws, 7).await;
    let scraped = idle(server.admin, 1.0).await;
    // A refused handshake from a client that sends no User-Agent.
    let (status, _) = http_request(
        server.ws,
        &format!(
            "GET /ws/rooms/bad%20name HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            server.ws
        ),
    )
    .await;
    assert_eq!(status, 400);
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);

    // Resource.
    let metrics = receiver.last_metrics("wsotel");
    assert!(!metrics.is_empty(), "metrics arrived");
    let resource = &metrics[0].0;
    assert_eq!(
        attr(&resource.attributes, "service.name").as_deref(),
        Some("otlp-test")
    );
    assert_eq!(
        attr(&resource.attributes, "service.instance.id").as_deref(),
        Some("inst-42")
    );
    assert_eq!(
        attr(&resource.attributes, "cloud.region").as_deref(),
        Some("r1")
    );
    assert_eq!(
        attr(&resource.attributes, "deployment.environment.name").as_deref(),
        Some("test")
    );
    assert_eq!(
        attr(&resource.attributes, "service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );

    // Every catalog metric over OTLP has the values /metrics showed (the final export happens at
    // shutdown, after the scrape; nothing but the scrape itself happened in between).
    let prom = prometheus_series(&scraped);
    let mut otlp = Series::new();
    for (_, m) in &metrics {
        for (name, labels, value) in as_prometheus(m) {
            otlp.insert(key(&name, &labels), value);
        }
    }
    let comparable = |name: &str, labels: &BTreeMap<String, String>| {
        // Process metrics move on their own; the admin listener's own requests continued after
        // the scrape.
        let ws_route = labels
            .get("http_route")
            .is_some_and(|r| r.starts_with("/ws/"));
        let admin_request = name.starts_with("http_server_request_duration") && !ws_route;
        !name.starts_with("process_") && !admin_request
    };
    let mut compared = 0;
    for ((name, labels), value) in &prom {
        if !comparable(name, labels) {
            continue;
        }
        let got = otlp.get(&(name.clone(), labels.clone()));
        assert_eq!(
            got,
            Some(value),
            "{name}{labels:?}: /metrics {value}, OTLP {got:?}"
        );
        compared += 1;
    }
    assert!(compared > 100, "compared {compared} series");
    for name in [
        "process.cpu.time",
        "process.memory.usage",
        "process.memory.virtual",
        "process.unix.file_descriptor.count",
        "process.thread.count",
        "process.uptime",
    ] {
        assert!(
            metrics.iter().any(|(_, m)| m.name == name),
            "{name} over OTLP"
        );
    }
    let echo_rx = &(
        "websocket_server_messages_total".to_string(),
        BTreeMap::from([
            ("http_route".to_string(), "/ws/echo".to_string()),
            ("network_io_direction".to_string(), "receive".to_string()),
            ("websocket_message_type".to_string(), "text".to_string()),
        ]),
    );
    assert_eq!(otlp.get(echo_rx), Some(&7.0));

    // Spans.
    let spans = receiver.spans();
    let upgrade = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("an upgrade span");
    assert_eq!(upgrade.name, "GET /ws/echo");
    assert_eq!(hex(&upgrade.trace_id), CLIENT_TRACE, "the client's trace");
    assert_eq!(
        hex(&upgrade.parent_span_id),
        CLIENT_SPAN,
        "the client's span is the parent"
    );
    let a = |k: &str| attr(&upgrade.attributes, k);
    assert_eq!(a("http.request.method").as_deref(), Some("GET"));
    assert_eq!(a("http.route").as_deref(), Some("/ws/echo"));
    assert_eq!(a("url.scheme").as_deref(), Some("http"));
    assert_eq!(a("http.response.status_code").as_deref(), Some("101"));
    assert_eq!(a("client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(a("user_agent.original").as_deref(), Some("otlp-test/1.0"));
    assert_eq!(a("error.type"), None, "a 101 is no error");

    // The refused one says why on its own span (so `{ span.error.type != nil }` finds it), and
    // has no empty User-Agent.
    let refused = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "GET /ws/rooms/{room}")
        .expect("the refused upgrade's span");
    let r = |k: &str| attr(&refused.attributes, k);
    assert_eq!(r("error.type").as_deref(), Some("invalid_room"));
    assert_eq!(r("http.response.status_code").as_deref(), Some("400"));
    assert_eq!(
        refused.status.as_ref().map(|s| s.code),
        Some(2),
        "error status"
    );
    assert_eq!(
        r("user_agent.original"),
        None,
        "no User-Agent, no attribute"
    );

    let conn = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "websocket.connection")
        .expect("a connection span");
    assert_eq!(
        conn.parent_span_id, upgrade.span_id,
        "child of the upgrade span"
    );
    assert_eq!(conn.trace_id, upgrade.trace_id);
    let c = |k: &str| attr(&conn.attributes, k);
    assert_eq!(c("websocket.close.code").as_deref(), Some("1000"));
    assert_eq!(c("websocket.close.reason").as_deref(), Some("normal"));
    assert_eq!(c("websocket.close.initiator").as_deref(), Some("client"));
    assert_eq!(c("websocket.messages.received").as_deref(), Some("7"));
    assert_eq!(c("websocket.messages.sent").as_deref(), Some("7"));
    assert_eq!(c("websocket.bytes.received").as_deref(), Some("350"));
    assert_eq!(c("websocket.bytes.sent").as_deref(), Some("350"));

    let messages: Vec<_> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "websocket.message")
        .collect();
    assert_eq!(messages.len(), 7, "ratio 1.0: one span per message");
    for m in &messages {
        assert!(m.parent_span_id.is_empty(), "message spans are roots");
        assert_ne!(m.trace_id, conn.trace_id, "each in a trace of its own");
        assert_eq!(m.links.len(), 1);
        assert_eq!(
            m.links[0].span_id, conn.span_id,
            "linked to the connection span"
        );
        assert_eq!(m.links[0].trace_id, conn.trace_id);
        assert_eq!(
            attr(&m.attributes, "websocket.operation").as_deref(),
            Some("echo")
        );
        assert_eq!(
            attr(&m.attributes, "websocket.message.size").as_deref(),
            Some("50")
        );
    }

    // Logs: the closing record carries the connection span's ids.
    let logs = receiver.log_records();
    let closed = logs
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.body.as_ref().map(any_text).as_deref() == Some("connection closed"))
        .expect("a connection closed log record");
    assert_eq!(closed.trace_id, conn.trace_id);
    assert_eq!(closed.span_id, conn.span_id);
    assert_eq!(
        attr(&closed.attributes, "websocket.close.reason").as_deref(),
        Some("normal")
    );
    assert_eq!(
        attr(&closed.attributes, "websocket.close.initiator").as_deref(),
        Some("client")
    );
    assert_eq!(
        attr(&closed.attributes, "websocket.messages.received").as_deref(),
        Some("7")
    );
    let bodies: Vec<String> = logs
        .iter()
        .filter_map(|(_, l)| l.body.as_ref().map(any_text))
        .collect();
    assert!(bodies.iter().any(|b| b == "wsotel started"), "{bodies:?}");
    assert!(
        bodies.iter().any(|b| b == "all connections drained"),
        "shutdown logs flushed: {bodies:?}"
    );
    assert!(
        logs.iter().all(|(_, l)| !attr(&l.attributes, "target")
            .unwrap_or_default()
            .starts_with("h2")),
        "exporter crates stay out of the exported logs"
    );
}

/// Message spans are encoded and sent by wsotel itself (not the SDK): over HTTP as well as
/// gRPC, every one arrives, linked to its connection span, under the same resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_carries_every_message_span() {
    let receiver = Receiver::default();
    let (l, addr) = listener().await;
    let _rx = receiver.serve_http(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
    );
    echo_session(server.ws, 9).await;
    idle(server.admin, 1.0).await;
    // Before shutdown: the export thread's one-second schedule sends them.
    let message_spans = |r: &Receiver| {
        r.spans()
            .into_iter()
            .filter(|(_, s)| s.name == "websocket.message")
            .collect::<Vec<_>>()
    };
    eventually("nine message spans over HTTP", || {
        message_spans(&receiver).len() == 9
    })
    .await;
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);

    let spans = receiver.spans();
    let (conn_resource, conn) = spans
        .iter()
        .find(|(_, s)| s.name == "websocket.connection")
        .expect("a connection span");
    let messages = message_spans(&receiver);
    assert_eq!(messages.len(), 9, "and no more at shutdown");
    let mut ids = std::collections::HashSet::new();
    for (resource, m) in &messages {
        assert_eq!(
            resource, conn_resource,
            "the same resource as the SDK's spans"
        );
        assert!(ids.insert(m.span_id.clone()), "distinct span ids");
        assert_eq!(m.trace_id.len(), 16);
        assert_eq!(m.links.len(), 1);
        assert_eq!(m.links[0].trace_id, conn.trace_id);
        assert_eq!(m.links[0].span_id, conn.span_id);
        assert!(m.start_time_unix_nano > 0 && m.start_time_unix_nano <= m.end_time_unix_nano);
        assert!(
            m.start_time_unix_nano >= conn.start_time_unix_nano
                && m.end_time_unix_nano <= conn.end_time_unix_nano,
            "within the connection's life"
        );
        assert_eq!(
            attr(&m.attributes, "websocket.message.size").as_deref(),
            Some("50")
        );
        assert_eq!(
            attr(&m.attributes, "http.route").as_deref(),
            Some("/ws/echo")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_works_and_ratio_zero_makes_no_message_spans() {
    let receiver = Receiver::default();
    let (l, addr) = listener().await;
    let _rx = receiver.serve_http(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    );
    echo_session(server.ws, 5).await;
    idle(server.admin, 1.0).await;
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);

    let spans = receiver.spans();
    assert!(
        spans.iter().any(|(_, s)| s.name == "GET /ws/echo"),
        "the sampled parent keeps the upgrade span"
    );
    assert!(spans.iter().any(|(_, s)| s.name == "websocket.connection"));
    assert_eq!(
        spans
            .iter()
            .filter(|(_, s)| s.name == "websocket.message")
            .count(),
        0,
        "ratio 0: none"
    );
    let metrics = receiver.last_metrics("wsotel");
    let sent: f64 = metrics
        .iter()
        .flat_map(|(_, m)| as_prometheus(m))
        .filter(|(n, l, _)| {
            n == "websocket_server_messages_total"
                && l.get("network_io_direction").map(String::as_str) == Some("transmit")
                && l.get("websocket_message_type").map(String::as_str) == Some("text")
        })
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(sent, 5.0);
    // The per-message histograms travel in a request of their own (wsotel writes them, not
    // the SDK): over HTTP too, with the resource, exact.
    let (resource, size) = metrics
        .iter()
        .find(|(_, m)| m.name == "websocket.server.message.size")
        .expect("the size histogram was exported over HTTP");
    assert!(
        resource
            .attributes
            .iter()
            .any(|kv| kv.key == "service.instance.id"),
        "with the resource"
    );
    let transmit: Vec<_> = as_prometheus(size)
        .into_iter()
        .filter(|(_, l, _)| {
            l.get("network_io_direction").map(String::as_str) == Some("transmit")
                && l.get("http_route").map(String::as_str) == Some("/ws/echo")
        })
        .map(|(n, l, v)| (n, l.get("le").cloned(), v))
        .collect();
    for (name, le, want) in [
        ("websocket_server_message_size_bytes_count", None, 5.0),
        ("websocket_server_message_size_bytes_sum", None, 250.0),
        (
            "websocket_server_message_size_bytes_bucket",
            Some("16"),
            0.0,
        ),
        (
            "websocket_server_message_size_bytes_bucket",
            Some("64"),
            5.0,
        ),
    ] {
        let got = transmit
            .iter()
            .find(|(n, l, _)| n == name && l.as_deref() == le)
            .map(|(_, _, v)| *v);
        assert_eq!(got, Some(want), "{name} le={le:?}");
    }
    assert!(
        receiver
            .log_records()
            .iter()
            .any(|(_, l)| l.body.as_ref().map(any_text).as_deref() == Some("connection closed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_at_start_then_up_export_resumes() {
    // Reserve a port, then free it so nothing listens there at first.
    let (l, addr) = listener().await;
    drop(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
        ],
    );
    // Serving is unaffected while the collector is away.
    echo_session(server.ws, 20).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    echo_session(server.ws, 3).await;

    let receiver = Receiver::default();
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _rx = receiver.serve_grpc(l);
    // Cumulative counts survive the outage: the first exports after it carry all 23.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while received_text(&receiver) != 23.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "export did not resume: {}",
            received_text(&receiver)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "no crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_collector_errors_are_rate_limited() {
    let (l, addr) = listener().await;
    drop(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "200"),
        ],
    );
    for _ in 0..5 {
        echo_session(server.ws, 10).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    server.sigterm();
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
    // The SDK's export errors and wsotel's own (the per-message histograms' request, target
    // `wsotel_export`) share one budget.
    let sdk_lines: Vec<_> = lines
        .iter()
        .filter(|l| {
            (l.contains("WARN") || l.contains("ERROR"))
                && (l.contains("opentelemetry") || l.contains("wsotel_export"))
        })
        .collect();
    assert!(!sdk_lines.is_empty(), "the failure is reported: {lines:#?}");
    assert!(
        sdk_lines.len() <= 2,
        "at most about once a minute, got {}: {sdk_lines:#?}",
        sdk_lines.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_collector_drops_counted_serving_unaffected_exit_bounded() {
    // A collector that accepts TCP and never answers: every export waits out its timeout.
    let (l, addr) = listener().await;
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            sockets.push(s);
        }
    });
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
    );
    // 24,000 sampled messages (16 in flight) while nothing drains the message span queue
    // (8192): the export thread takes the first 2048 at its early wake and waits out the
    // timeout on them, then at most one more queue's worth; the rest are dropped.
    let mut ws = connect(&format!("ws://{}/ws/echo", server.ws)).await;
    let started = std::time::Instant::now();
    let n = 24_000;
    for batch in 0..n / 16 {
        for i in 0..16 {
            ws.feed(Message::text(format!("{}", batch * 16 + i)))
                .await
                .unwrap();
        }
        ws.flush().await.unwrap();
        for i in 0..16 {
            assert_eq!(
                next_data(&mut ws).await,
                Message::text(format!("{}", batch * 16 + i))
            );
        }
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "serving went on: {n} echoes in {took:?}"
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let m = scrape(server.admin).await;
    let messages = (
        "otel_component_name",
        "batching_span_processor/websocket.message",
    );
    let dropped = m.sum(
        "otel_sdk_processor_span_processed_total",
        &[("error_type", "queue_full"), messages],
    );
    assert!(
        dropped >= (n - 2048 - 2 * 8192) as f64,
        "dropped message spans are counted: {dropped}\n{}",
        m.text
    );
    let handed_on = m.sum("otel_sdk_processor_span_processed_total", &[messages])
        - dropped
        - m.sum(
            "otel_sdk_processor_span_processed_total",
            &[("error_type", "already_shutdown"), messages],
        );
    assert!(
        (2048.0..=n as f64 - dropped).contains(&handed_on),
        "the early wake's batch was handed to the exporter: {handed_on}\n{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[
                ("network_io_direction", "transmit"),
                ("websocket_message_type", "text")
            ]
        ),
        n as f64
    );

    let stop = std::time::Instant::now();
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        stop.elapsed() < Duration::from_secs(14),
        "shutdown is bounded: {:?}",
        stop.elapsed()
    );
    held.abort();
}

/// What one client counted: data messages and payload bytes each way, and the server's Close.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    sent: u64,
    sent_bytes: u64,
    received: u64,
    received_bytes: u64,
    close: Option<u16>,
}

/// An echo client keeping 16 messages in flight (written together, then read back) until the
/// server's Close arrives.
async fn pipelined_echo(url: String, size: usize) -> Tally {
    let mut ws = connect(&url).await;
    let mut t = Tally::default();
    'session: loop {
        for _ in 0..16 {
            ws.feed(Message::binary(vec![b'e'; size])).await.unwrap();
        }
        ws.flush().await.unwrap();
        t.sent += 16;
        t.sent_bytes += 16 * size as u64;
        for _ in 0..16 {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    t.received += 1;
                    t.received_bytes += b.len() as u64;
                }
                Some(Ok(Message::Close(frame))) => {
                    t.close = frame.map(|f| u16::from(f.code));
                    break 'session;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // Reading on flushes the client's reply to the Close, then sees the end of the stream.
    while let Some(Ok(_)) = ws.next().await {}
    t
}

/// A room member publishing a message every 2 ms while it reads everything the room sends it,
/// until the server's Close.
async fn room_member(url: String, size: usize) -> Tally {
    let ws = connect(&url).await;
    let (mut tx, mut rx) = ws.split();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let closed = closed.clone();
        async move {
            let (mut sent, mut bytes) = (0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            while !closed.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                if tx.send(Message::text("r".repeat(size))).await.is_err() {
                    break; // the Close arrived: nothing was written
                }
                sent += 1;
                bytes += size as u64;
            }
            (sent, bytes)
        }
    });
    let mut t = Tally::default();
    while let Some(msg) = rx.next().await {
        match msg {
            Ok(Message::Text(s)) => {
                t.received += 1;
                t.received_bytes += s.len() as u64;
            }
            Ok(Message::Close(frame)) => {
                t.close = frame.map(|f| u16::from(f.code));
                closed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    (t.sent, t.sent_bytes) = writer.await.unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_final_export_equals_client_totals() {
    let (l, addr) = listener().await;
    let receiver = Receiver::default();
    let _rx = receiver.serve_grpc(l);
    let server = start_with_env(
        // The echo load starves the test's own room readers of CPU at times: a deep queue
        // keeps them members (the slow-consumer kick is tested in tests/server.rs).
        &["--outbound-queue", "16384"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            // Longer than the test: the counts checked come from the final flush at exit.
            ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
        ],
    );
    const ECHO: usize = 40;
    const MEMBERS: usize = 8;
    let mut echo = Vec::new();
    for _ in 0..ECHO {
        echo.push(tokio::spawn(pipelined_echo(
            format!("ws://{}/ws/echo", server.ws),
            100,
        )));
    }
    let mut room = Vec::new();
    for _ in 0..MEMBERS {
        room.push(tokio::spawn(room_member(
            format!("ws://{}/ws/rooms/shutdown-load", server.ws),
            40,
        )));
    }
    // Full load for a while, then SIGTERM in the middle of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.sigterm();
    let mut echo_total = Tally::default();
    for t in echo {
        let t = t.await.unwrap();
        assert_eq!(t.close, Some(1001), "every client gets Close 1001");
        echo_total.sent += t.sent;
        echo_total.sent_bytes += t.sent_bytes;
        echo_total.received += t.received;
        echo_total.received_bytes += t.received_bytes;
    }
    let mut room_total = Tally::default();
    for t in room {
        let t = t.await.unwrap();
        assert_eq!(t.close, Some(1001), "every member gets Close 1001");
        room_total.sent += t.sent;
        room_total.sent_bytes += t.sent_bytes;
        room_total.received += t.received;
        room_total.received_bytes += t.received_bytes;
    }
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        lines.iter().any(|l| l.contains("all connections drained")),
        "no connection task outlived the drain: {lines:#?}"
    );
    eprintln!("echo clients: {echo_total:?}\nroom members: {room_total:?}");
    assert!(echo_total.sent > 1000, "under load: {echo_total:?}");
    assert!(room_total.received > 100, "under load: {room_total:?}");

    // The last export, made at exit, holds exactly what the clients counted.
    let last = receiver.last_metrics("wsotel");
    let series: Vec<_> = last.iter().flat_map(|(_, m)| as_prometheus(m)).collect();
    let sum = |name: &str, want: &[(&str, &str)]| -> f64 {
        series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    for (route, kind, t, members) in [
        ("/ws/echo", "binary", echo_total, ECHO),
        ("/ws/rooms/{room}", "text", room_total, MEMBERS),
    ] {
        let messages = |dir: &str, kind: &str| {
            sum(
                "websocket_server_messages_total",
                &[
                    ("http_route", route),
                    ("network_io_direction", dir),
                    ("websocket_message_type", kind),
                ],
            )
        };
        let bytes = |dir: &str| {
            sum(
                "websocket_server_io_bytes_total",
                &[("http_route", route), ("network_io_direction", dir)],
            )
        };
        assert_eq!(messages("receive", kind), t.sent as f64, "{route} {t:?}");
        assert_eq!(
            messages("transmit", kind),
            t.received as f64,
            "{route} {t:?}"
        );
        assert_eq!(bytes("receive"), t.sent_bytes as f64, "{route}");
        assert_eq!(bytes("transmit"), t.received_bytes as f64, "{route}");
        assert_eq!(messages("transmit", "close"), members as f64, "{route}");
        assert_eq!(messages("receive", "close"), members as f64, "{route}");
        assert_eq!(
            sum(
                "websocket_server_connection_duration_seconds_count",
                &[
                    ("http_route", route),
                    ("websocket_close_reason", "server_shutdown")
                ]
            ),
            members as f64,
            "{route}"
        );
        assert_eq!(
            sum(
                "websocket_server_active_connections",
                &[("http_route", route)]
            ),
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_collector_loses_nothing_within_its_queues() {
    // Every export is answered 1.5 s late, well inside the 5 s export timeout.
    let (l, addr) = listener().await;
    let receiver = Receiver {
        delay: Duration::from_millis(1500),
        ..Receiver::default()
    };
    let _rx = receiver.serve_grpc(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "5000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
    );
    // Serving does not wait on the exports: three sessions go through while they are pending
    // (each echo must come back within next_data's 10 s).
    for _ in 0..3 {
        echo_session(server.ws, 400).await;
    }
    // 1,200 sampled messages fit the 2,048-span queue: every one arrives, late.
    let message_spans = |r: &Receiver| {
        r.spans()
            .iter()
            .filter(|(_, s)| s.name == "websocket.message")
            .count()
    };
    eventually("every message span", || message_spans(&receiver) == 1200).await;
    eventually("the counts", || received_text(&receiver) == 1200.0).await;
    let closed = |r: &Receiver| {
        r.log_records()
            .iter()
            .filter(|(_, l)| l.body.as_ref().map(any_text).as_deref() == Some("connection closed"))
            .count()
    };
    eventually("every closing log", || closed(&receiver) == 3).await;
    let m = scrape(server.admin).await;
    assert_eq!(
        m.sum(
            "otel_sdk_processor_span_processed_total",
            &[("error_type", "queue_full")]
        ),
        0.0,
        "nothing dropped: {}",
        m.text
    );
    assert_eq!(message_spans(&receiver), 1200, "no duplicates either");

    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
}

/// The wsotel-scope text messages received, from the latest metrics export.
fn received_text(r: &Receiver) -> f64 {
    r.last_metrics("wsotel")
        .iter()
        .flat_map(|(_, m)| as_prometheus(m))
        .filter(|(n, l, _)| {
            n == "websocket_server_messages_total"
                && l.get("network_io_direction").map(String::as_str) == Some("receive")
                && l.get("websocket_message_type").map(String::as_str) == Some("text")
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Message spans have a gRPC connection of their own (module `message_spans`): when the
/// collector restarts between two exports, the next batch goes to the new one, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_spans_survive_a_collector_restart() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let first = Receiver::default();
    let first_process = first.serve_grpc_process(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
    );
    let message_spans = |r: &Receiver| {
        r.spans()
            .iter()
            .filter(|(_, s)| s.name == "websocket.message")
            .count()
    };
    echo_session(server.ws, 10).await;
    eventually("the first 10", || message_spans(&first) == 10).await;

    // The collector dies (listener and connections closed at once) and is back on the same
    // port before the next message.
    tokio::task::spawn_blocking(move || first_process.kill())
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = Receiver::default();
    let _second_task = second.serve_grpc(l);
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_session(server.ws, 6).await;
    eventually("the next 6, at the new collector", || {
        message_spans(&second) == 6
    })
    .await;

    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(message_spans(&first), 10);
    assert_eq!(message_spans(&second), 6, "none twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_collector_exports_resume_with_cumulative_counts() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let first = Receiver::default();
    let first_process = first.serve_grpc_process(l);
    let server = start_with_env(
        &["--log-format", "json"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
        ],
    );
    echo_session(server.ws, 10).await;
    eventually("the first 10", || received_text(&first) == 10.0).await;

    // The collector dies (listener and connections closed at once) while traffic goes on.
    tokio::task::spawn_blocking(move || first_process.kill())
        .await
        .unwrap();
    echo_session(server.ws, 5).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    echo_session(server.ws, 7).await;

    // Back on the same port: exports resume, and the cumulative counts include what happened
    // while it was away.
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = Receiver::default();
    let _second_task = second.serve_grpc(l);
    eventually("all 22 after the restart", || {
        received_text(&second) == 22.0
    })
    .await;
    assert_eq!(received_text(&first), 10.0, "the first saw only its share");

    server.sigterm();
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);

    // Stdout JSON lines of a connection carry its span's ids: those of a connection span that
    // reached one of the two receivers (the ones ended during the outage were lost with it).
    let connection_spans: std::collections::HashSet<(String, String)> = first
        .spans()
        .into_iter()
        .chain(second.spans())
        .filter(|(_, s)| s.name == "websocket.connection")
        .map(|(_, s)| (hex(&s.trace_id), hex(&s.span_id)))
        .collect();
    let closed: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection closed")
        .collect();
    assert_eq!(closed.len(), 3, "{lines:#?}");
    let ids: Vec<(String, String)> = closed
        .iter()
        .map(|v| {
            (
                v["trace_id"].as_str().unwrap_or_default().to_owned(),
                v["span_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        ids.iter().all(|(t, s)| t.len() == 32 && s.len() == 16),
        "{closed:#?}"
    );
    assert!(
        ids.iter().any(|id| connection_spans.contains(id)),
        "the closing lines' ids are the connection spans' ids: {ids:?} vs {connection_spans:?}"
    );
}

/// The point of `metric` whose attributes include `want`, from one export.
fn histogram_point(
    m: &opentelemetry_proto::tonic::metrics::v1::Metric,
    want: &[(&str, &str)],
) -> Option<opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint> {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let Some(Data::Histogram(h)) = &m.data else {
        panic!("{} is not a histogram", m.name)
    };
    h.data_points
        .iter()
        .find(|p| {
            want.iter()
                .all(|(k, v)| attr(&p.attributes, k).as_deref() == Some(*v))
        })
        .cloned()
}

/// Per-message instruments are tallied per thread and handed to the SDK at each collection:
/// OTLP exports every 100 ms and `/metrics` scrapes in between collect while an echo session of
/// payloads of many sizes runs. Every export reads a count that never goes back, and after the
/// close the exports and the scrape hold exactly the session: its count, its sum, every bucket,
/// its smallest and its largest payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_during_a_session_never_lose_or_repeat_a_message() {
    let (l, addr) = listener().await;
    let receiver = Receiver::default();
    let _rx = receiver.serve_grpc(l);
    let server = start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
        ],
    );
    let sizes: Vec<usize> = (0..600).map(|i| 7 + (i * 337) % 3000).collect();
    let mut ws = connect(&server.url("/ws/echo")).await;
    let started = std::time::Instant::now();
    for (i, &size) in sizes.iter().enumerate() {
        ws.send(Message::binary(vec![b'b'; size])).await.unwrap();
        match next_data(&mut ws).await {
            Message::Binary(b) => assert_eq!(b.len(), size),
            other => panic!("unexpected {other:?}"),
        }
        if i % 50 == 0 {
            scrape(server.admin).await;
        }
        // Paced, so the session spans a dozen exports.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!("session: {:?}", started.elapsed());
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let scraped = idle(server.admin, 1.0).await;
    // Two exports that start after the close.
    let exported = receiver.counts().metric_requests;
    eventually("two exports after the close", || {
        receiver.counts().metric_requests >= exported + 2
    })
    .await;

    let route = ("http.route", "/ws/echo");
    let history = receiver.metric_history("wsotel", "websocket.server.message.size");
    let counts: Vec<u64> = history
        .iter()
        .filter_map(|m| histogram_point(m, &[route, ("network.io.direction", "receive")]))
        .map(|p| p.count)
        .collect();
    assert!(
        counts.len() >= 5,
        "several exports during the session: {counts:?}"
    );
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "a count went back: {counts:?}"
    );
    assert!(
        counts.iter().any(|&c| c > 0 && c < sizes.len() as u64),
        "an export landed mid-session: {counts:?}"
    );

    let bounds = wsotel::telemetry::instruments::buckets::MESSAGE_BYTES;
    let mut buckets = vec![0u64; bounds.len() + 1];
    for &s in &sizes {
        buckets[bounds.partition_point(|&b| b < s as f64)] += 1;
    }
    let total: usize = sizes.iter().sum();
    for dir in ["receive", "transmit"] {
        let last = history.last().unwrap();
        let p = histogram_point(last, &[route, ("network.io.direction", dir)]).unwrap();
        assert_eq!(p.count, sizes.len() as u64, "{dir}");
        assert_eq!(p.sum, Some(total as f64), "{dir}");
        assert_eq!(p.bucket_counts, buckets, "{dir}");
        assert_eq!(p.min, Some(*sizes.iter().min().unwrap() as f64), "{dir}");
        assert_eq!(p.max, Some(*sizes.iter().max().unwrap() as f64), "{dir}");
        let labels = [("http_route", "/ws/echo"), ("network_io_direction", dir)];
        assert_eq!(
            scraped.sum("websocket_server_message_size_bytes_count", &labels),
            sizes.len() as f64
        );
        assert_eq!(
            scraped.sum("websocket_server_message_size_bytes_sum", &labels),
            total as f64
        );
        assert_eq!(
            scraped.sum("websocket_server_io_bytes_total", &labels),
            total as f64
        );
    }
    let durations = receiver.metric_history("wsotel", "websocket.server.message.duration");
    let p = histogram_point(durations.last().unwrap(), &[route]).unwrap();
    assert_eq!(p.count, sizes.len() as u64);
    assert_eq!(p.bucket_counts.iter().sum::<u64>(), sizes.len() as u64);
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
}
