//! Holds the rendered `/metrics` against docs/metrics.md: every documented instrument is
//! exposed with its documented type, and nothing undocumented is exposed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A documented instrument: OTel name, Prometheus family, Prometheus type, and the Prometheus
/// labels its attributes become.
type Row = (String, String, String, BTreeSet<String>);

/// The attribute cell's names as Prometheus labels: the backticked names outside parentheses
/// (what is inside them describes values), dots made underscores.
fn labels_of(cell: &str) -> BTreeSet<String> {
    let mut depth = 0;
    let outside: String = cell
        .chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => return depth == 0,
            }
            false
        })
        .collect();
    outside
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| name.replace('.', "_"))
        .collect()
}

/// Instruments that exist only with `--nats-url` (tests/backplane.rs holds them).
fn backplane_only(otel: &str) -> bool {
    otel.starts_with("websocket.server.backplane.")
}

/// The rows of the doc's instrument table.
fn documented() -> Vec<Row> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let mut rows = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !cells[1].starts_with('`') || !cells[2].starts_with('`') {
            continue;
        }
        let otel = cells[1].trim_matches('`').to_owned();
        let prom = cells[2].trim_matches('`').to_owned();
        let kind = cells[3];
        let prom_type = if kind.starts_with("Histogram") {
            "histogram"
        } else if kind.contains("gauge") || kind.starts_with("Gauge") {
            "gauge"
        } else if kind.starts_with("Counter") {
            "counter"
        } else {
            panic!("unknown kind {kind:?} for {otel}")
        };
        rows.push((otel, prom, prom_type.to_owned(), labels_of(cells[5])));
    }
    rows
}

#[tokio::test]
async fn metrics_endpoint_matches_the_documented_catalog() {
    let rows = documented();
    assert!(
        rows.len() >= 19,
        "the doc table lists every instrument ({} found)",
        rows.len()
    );
    let server = TestServer::start_with(|c| c.ping_interval = Duration::from_millis(50)).await;

    // Exercise every instrument once: a room session, an echo with a ping round trip, a close
    // and a rejection.
    let mut room = connect(&server.url("/ws/rooms/catalog")).await;
    let mut echo = connect(&server.url("/ws/echo")).await;
    echo.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut echo).await, Message::text("hi"));
    assert_eq!(
        refused_status(server.url("/ws/rooms/no%20spaces")).await,
        400
    );
    let reader = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, echo.next()).await {}
        echo
    });
    server
        .metrics_when("a ping round trip", |m| {
            m.has("websocket_server_ping_duration_seconds_count")
        })
        .await;
    let mut echo = reader.await.unwrap();
    echo.close(None).await.unwrap();
    while let Some(Ok(_)) = echo.next().await {}
    let m = server
        .metrics_when("one connection closed", |m| {
            m.has("websocket_server_connection_duration_seconds_count")
        })
        .await;

    let doc: BTreeMap<&str, &str> = rows
        .iter()
        .map(|(_, p, t, _)| (p.as_str(), t.as_str()))
        .collect();
    for (otel, prom, kind, _) in rows.iter().filter(|r| !backplane_only(&r.0)) {
        assert_eq!(
            m.types.get(prom).map(String::as_str),
            Some(kind.as_str()),
            "{otel} is documented as `{prom}` ({kind}); /metrics has {:?}",
            m.types.get(prom)
        );
    }
    for (family, kind) in &m.types {
        if family == "target_info" {
            continue;
        }
        assert_eq!(
            doc.get(family.as_str()),
            Some(&kind.as_str()),
            "`{family}` ({kind}) is exposed but not documented in docs/metrics.md"
        );
    }
    // Every label on a series is a documented attribute of its instrument (or the scope, a
    // promoted resource attribute, or a histogram's `le`).
    let common: BTreeSet<String> = [
        "otel_scope_name",
        "otel_scope_version",
        "service_instance_id",
        "cloud_region",
        "le",
    ]
    .map(String::from)
    .into();
    for (otel, prom, _, attributes) in &rows {
        let family = m.samples.iter().filter(|s| {
            s.name == *prom
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| s.name.strip_suffix(suffix) == Some(prom.as_str()))
        });
        for sample in family {
            for label in sample.labels.keys() {
                assert!(
                    attributes.contains(label) || common.contains(label),
                    "{otel}: label `{label}` on /metrics is not among its documented attributes \
                     {attributes:?} in docs/metrics.md"
                );
            }
        }
    }
    let lifetime = &rows
        .iter()
        .find(|r| r.1 == "websocket_server_connection_duration_seconds")
        .unwrap()
        .3;
    assert!(
        lifetime.contains("websocket_close_initiator"),
        "the parser reads attributes: {lifetime:?}"
    );

    // Every series carries the scope.
    assert!(
        m.samples
            .iter()
            .filter(|s| s.name != "target_info")
            .all(|s| s.labels.get("otel_scope_name").map(String::as_str) == Some("wsotel"))
    );
    room.close(None).await.unwrap();
}
