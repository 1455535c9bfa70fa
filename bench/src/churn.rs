//! `churn`: C loops of connect, one message (its echo checked), normal close, repeat.
//! Reports completed connections per second and the time one whole cycle takes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::ChurnArgs;
use crate::conn::{Connector, close_gracefully};
use crate::hist::Latency;
use crate::payload;
use crate::report::{Report, thousands};
use crate::run::{Failures, Harness, Pacer, Window};

/// Source addresses when `--source-ips` is not given: every cycle leaves a socket in
/// TIME_WAIT, and a long churn run would exhaust the ports of a single source address.
const DEFAULT_SOURCES: u16 = 64;

#[derive(Default)]
struct LoopStats {
    cycles: u64,
    cycles_total: u64,
    latency: Latency,
}

pub async fn run(args: ChurnArgs) -> Result<Report, String> {
    let common = &args.common;
    let connector = Arc::new(
        Connector::new(
            &common.url,
            common.source_ips.unwrap_or(DEFAULT_SOURCES),
            common.timeout,
        )
        .await?,
    );
    let failures = Arc::new(Failures::default());
    let harness = Harness::start(common, "conns")?;
    let window = harness.window;
    let per_loop_rate = common.rate.map(|r| r / args.connections as f64);
    let next_index = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let pacer = Pacer::new(
            per_loop_rate,
            window.start,
            i as f64 / args.connections as f64,
        );
        tasks.push(tokio::spawn(churn_loop(
            connector.clone(),
            common.url.clone(),
            args.size as usize,
            window,
            common.timeout,
            pacer,
            failures.clone(),
            harness.counter.clone(),
            next_index.clone(),
        )));
    }
    let mut total = LoopStats::default();
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.cycles += s.cycles;
                total.cycles_total += s.cycles_total;
                total.latency.merge(&s.latency);
            }
            Err(e) => failures.fail(format!("churn task failed: {e}")),
        }
    }
    let (edges, scrapes) = harness.finish().await;
    let secs = window.measured().as_secs_f64();
    let mut r = Report::new("churn");
    r.set("connections", args.connections);
    r.set("size", args.size);
    r.set("source_ips", connector.source_count());
    r.set("conns_total", total.cycles_total);
    r.set("cycle_latency_us", total.latency.to_json());
    r.line(format!(
        "churn          {} concurrent loops of connect, one {} B message, close",
        args.connections, args.size
    ));
    r.line(format!(
        "throughput     {} connections/s ({} in {secs:.1} s)",
        thousands(total.cycles as f64 / secs),
        thousands(total.cycles as f64)
    ));
    r.line(format!("cycle time     {}", total.latency.summary()));
    r.common(common, &window, &edges, scrapes, total.cycles, "conns");
    if total.cycles == 0 && failures.count() == 0 {
        r.error("no connection cycle completed inside the measured window");
    }
    r.failures(&failures);
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn churn_loop(
    connector: Arc<Connector>,
    url: String,
    size: usize,
    window: Window,
    timeout: Duration,
    mut pacer: Pacer,
    failures: Arc<Failures>,
    counter: Arc<AtomicU64>,
    next_index: Arc<AtomicU64>,
) -> LoopStats {
    let mut stats = LoopStats::default();
    loop {
        if failures.stopped() || Instant::now() >= window.end {
            break;
        }
        if pacer.limited() {
            let next = pacer.next_at().unwrap_or(window.end);
            if next >= window.end {
                break;
            }
            tokio::time::sleep_until(next.into()).await;
            pacer.take();
        }
        let index = next_index.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let cycle = tokio::select! {
            r = one_cycle(&connector, &url, size, index, timeout) => r,
            _ = failures.wait_stopped() => break,
        };
        if let Err(e) = cycle {
            failures.fail(format!("connection {index}: {e}"));
            break;
        }
        let t1 = Instant::now();
        stats.cycles_total += 1;
        if window.contains(t1) {
            stats.cycles += 1;
            if t0 >= window.measure_start {
                stats.latency.record_ns((t1 - t0).as_nanos() as u64);
            }
        }
        counter.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

/// Connect, send one message, check its echo, close normally.
async fn one_cycle(
    connector: &Connector,
    url: &str,
    size: usize,
    index: u64,
    timeout: Duration,
) -> Result<(), String> {
    let mut ws = connector
        .connect(url, index)
        .await
        .map_err(|e| e.to_string())?;
    let msg = payload::echo_message(size, index as u32, index, payload::now_ns());
    ws.send(Message::Binary(msg.clone()))
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    loop {
        let got = tokio::time::timeout(timeout, ws.next())
            .await
            .map_err(|_| format!("no echo within {timeout:?}"))?;
        match got {
            Some(Ok(Message::Binary(b))) => {
                if let Some(why) = payload::echo_mismatch(&msg, &b) {
                    return Err(why);
                }
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(other)) => return Err(format!("expected the echo, got {other:?}")),
            Some(Err(e)) => return Err(format!("read failed: {e}")),
            None => return Err("the connection ended before the echo".into()),
        }
    }
    close_gracefully(&mut ws, timeout).await
}
