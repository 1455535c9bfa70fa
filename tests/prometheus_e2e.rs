//! End to end with a real Prometheus (Debian's `prometheus` package, installed by
//! `scripts/test`): it scrapes the real binary during a scripted session, and PromQL must
//! return exactly what the clients did. `promtool check metrics` lints the exposition.
//!
//! Without `prometheus` and `promtool` on PATH these tests fail, loudly: they are not skipped.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn require(tool: &str) -> PathBuf {
    on_path(tool).unwrap_or_else(|| {
        panic!(
            "`{tool}` is not installed: run scripts/test (it installs Debian's prometheus package)"
        )
    })
}

/// A real Prometheus on a temp dir, scraping `target` every second.
pub struct Prometheus {
    child: Child,
    pub addr: std::net::SocketAddr,
    _dir: Scratch,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Self {
        let bin = require("prometheus");
        let dir = Scratch::at(std::env::temp_dir().join(format!(
            "wsotel-prom-{}-{}",
            std::process::id(),
            target.port()
        )));
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: wsotel\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let config = dir.file("prometheus.yml", config.as_bytes());
        // Prometheus cannot report a port it chose itself: take a free one.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(self.addr).await {
                drop(s);
                if http_get(self.addr, "/-/ready").await.0 == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs an instant query; returns `(labels, value)` for each series.
    async fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={q}")).await;
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{promql}: {body}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["metric"].clone(),
                    r["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    async fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await;
        assert!(r.len() <= 1, "{promql} returned {} series", r.len());
        r.first().map(|(_, v)| *v)
    }

    /// Polls `promql` until it equals `want` (at most 30 s).
    async fn until(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.scalar(promql).await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: want {want}, last {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_exact_session_values() {
    let server = start_with_env(
        &[],
        &[
            ("OTEL_SERVICE_NAME", "e2e-svc"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "cloud.region=eu-test-1,deployment.environment.name=ci",
            ),
        ],
    );
    let prom = Prometheus::start(server.admin);
    prom.ready().await;

    // The scripted session: 37 text messages of 100 B echoed; a room of three where one
    // member sends 5 binary messages of 64 B; everyone closes normally.
    let mut echo = connect(&server.url(ECHO)).await;
    for _ in 0..37 {
        echoes(&mut echo, &"e".repeat(100)).await;
    }
    let room = server.url("/ws/rooms/e2e");
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(connect(&room).await);
    }
    for _ in 0..5 {
        members[0]
            .send(Message::binary(vec![1u8; 64]))
            .await
            .unwrap();
    }
    for m in &mut members[1..] {
        for _ in 0..5 {
            assert_eq!(next_data(m).await, Message::binary(vec![1u8; 64]));
        }
    }
    prom.until("sum(websocket_server_active_connections)", 4.0)
        .await;
    assert_eq!(prom.scalar("sum(websocket_server_rooms)").await, Some(1.0));
    for mut ws in std::iter::once(echo).chain(members) {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    prom.until("sum(websocket_server_active_connections)", 0.0)
        .await;
    prom.until(r#"sum(websocket_server_connection_duration_seconds_count{websocket_close_reason="normal"})"#, 4.0)
        .await;

    let exact = [
        (
            r#"sum(websocket_server_messages_total{http_route="/ws/echo",network_io_direction="receive",websocket_message_type="text"})"#,
            37.0,
        ),
        (
            r#"sum(websocket_server_messages_total{http_route="/ws/echo",network_io_direction="transmit",websocket_message_type="text"})"#,
            37.0,
        ),
        (
            r#"sum(websocket_server_io_bytes_total{http_route="/ws/echo",network_io_direction="transmit"})"#,
            3700.0,
        ),
        (
            r#"sum(websocket_server_message_size_bytes_count{http_route="/ws/echo",network_io_direction="receive"})"#,
            37.0,
        ),
        (
            r#"sum(websocket_server_messages_total{http_route="/ws/rooms/{room}",network_io_direction="receive",websocket_message_type="binary"})"#,
            5.0,
        ),
        (
            r#"sum(websocket_server_messages_total{http_route="/ws/rooms/{room}",network_io_direction="transmit",websocket_message_type="binary"})"#,
            10.0,
        ),
        (
            r#"sum(websocket_server_io_bytes_total{http_route="/ws/rooms/{room}",network_io_direction="transmit"})"#,
            640.0,
        ),
        (r#"sum(websocket_server_accepted_connections_total)"#, 4.0),
        (r#"sum(websocket_server_rooms)"#, 0.0),
        (r#"sum(websocket_server_dropped_messages_total)"#, 0.0),
        (r#"sum(websocket_server_errors_total)"#, 0.0),
        (
            r#"sum(websocket_server_message_duration_seconds_count)"#,
            42.0,
        ),
        (
            r#"sum(http_server_request_duration_seconds_count{http_response_status_code="101"})"#,
            4.0,
        ),
        (r#"up{job="wsotel"}"#, 1.0),
        (
            r#"count(target_info{service_name="e2e-svc",cloud_region="eu-test-1",deployment_environment_name="ci"})"#,
            1.0,
        ),
        // The promoted resource attributes label every series.
        (
            r#"count(websocket_server_messages_total{cloud_region="eu-test-1",service_instance_id=~".+"}) == count(websocket_server_messages_total)"#,
            20.0,
        ),
    ];
    for (q, want) in exact {
        assert_eq!(prom.scalar(q).await, Some(want), "{q}");
    }
    assert!(
        prom.scalar("sum(process_memory_usage_bytes)")
            .await
            .unwrap()
            > 1e6
    );
    assert!(prom.scalar(r#"histogram_quantile(0.5, sum by (le) (websocket_server_message_duration_seconds_bucket))"#).await.unwrap() < 0.1);
    server.sigterm();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_passes() {
    let promtool = require("promtool");
    let server = start(&[]);
    // Some traffic so histograms and per-reason series exist.
    let mut ws = connect(&server.url(ECHO)).await;
    ws.send(Message::text("lint me")).await.unwrap();
    next_data(&mut ws).await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let body = scrape_when(
        server.admin,
        "the closed connection shows up in /metrics",
        |m| {
            m.text
                .contains("websocket_server_connection_duration_seconds_bucket")
        },
    )
    .await
    .text;

    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 0 is clean; 3 is lint warnings only. The only warnings allowed are the semantic
    // conventions' own `.count` names (see docs/metrics.md); 1 (a parse error) never.
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            for line in report.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    (line.starts_with("process_unix_file_descriptor_count")
                        || line.starts_with("process_thread_count"))
                        && line.contains("should not have \"_count\" suffix"),
                    "unexpected promtool finding: {line}\n{report}"
                );
            }
        }
        other => panic!("promtool check metrics exited {other:?}:\n{report}"),
    }
}
