//! `ingest`: C connections sending as fast as they can (or at `--rate`), nothing expected back.
//!
//! wsotel has no ingest-only endpoint, so against it this mode uses `/ws/echo`: whatever comes
//! back is read (so the server is never stalled by a full socket), checked against what was
//! sent, in order, and discarded. Each connection ends with a close handshake, which a server
//! can only answer after reading every message before it: a server that drops messages
//! unread cannot finish the run early.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Error, Message};

use crate::cli::IngestArgs;
use crate::conn::{Connector, Ws, connect_all};
use crate::payload;
use crate::report::{Report, thousands};
use crate::run::{Failures, Harness, Pacer, Window};

#[derive(Default)]
struct ConnStats {
    /// Messages written inside the window.
    sent: u64,
    /// All messages written.
    sent_total: u64,
    /// Echoes read back (and checked).
    echoed: u64,
}

pub async fn run(args: IngestArgs) -> Result<Report, String> {
    let common = &args.common;
    let connector =
        Connector::new(&common.url, common.source_ips.unwrap_or(0), common.timeout).await?;
    let failures = Arc::new(Failures::default());
    let conns = connect_all(&connector, &common.url, args.connections, 256, &failures).await?;
    let harness = Harness::start(common, "msgs")?;
    let window = harness.window;
    let per_conn_rate = common.rate.map(|r| r / args.connections as f64);
    let mut tasks = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let pacer = Pacer::new(
            per_conn_rate,
            window.start,
            i as f64 / args.connections as f64,
        );
        tasks.push(tokio::spawn(ingest_conn(
            ws,
            i as u32,
            args.size as usize,
            args.batch as usize,
            window,
            common.timeout,
            pacer,
            failures.clone(),
            harness.counter.clone(),
        )));
    }
    let mut total = ConnStats::default();
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.sent += s.sent;
                total.sent_total += s.sent_total;
                total.echoed += s.echoed;
            }
            Err(e) => failures.fail(format!("connection task failed: {e}")),
        }
    }
    let (edges, scrapes) = harness.finish().await;
    let mut r = Report::new("ingest");
    r.set("connections", args.connections);
    r.set("size", args.size);
    r.set("batch", args.batch);
    r.set("sent_total", total.sent_total);
    r.set("echoed_total", total.echoed);
    let secs = window.measured().as_secs_f64();
    r.line(format!(
        "ingest         {} connections, {} B messages, {} per write",
        args.connections, args.size, args.batch
    ));
    r.line(format!(
        "throughput     {} msgs/s sent ({} in {secs:.1} s; {} echoes read back and checked)",
        thousands(total.sent as f64 / secs),
        thousands(total.sent as f64),
        thousands(total.echoed as f64)
    ));
    r.common(common, &window, &edges, scrapes, total.sent, "msgs");
    if total.sent == 0 && failures.count() == 0 {
        r.error("nothing was sent inside the measured window");
    }
    r.failures(&failures);
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn ingest_conn(
    ws: Ws,
    index: u32,
    size: usize,
    batch: usize,
    window: Window,
    timeout: Duration,
    mut pacer: Pacer,
    failures: Arc<Failures>,
    counter: Arc<AtomicU64>,
) -> ConnStats {
    let (mut sink, mut stream) = ws.split();
    let fail = |msg: String| failures.fail(format!("connection {index}: {msg}"));
    let writer = async {
        let mut stats = ConnStats::default();
        let mut seq = 0u64;
        loop {
            let now = Instant::now();
            if now >= window.end || failures.stopped() {
                break;
            }
            let mut n = 0u64;
            while (n as usize) < batch && pacer.ready(now) {
                pacer.take();
                let msg = payload::echo_message(size, index, seq, 0);
                seq += 1;
                if let Err(e) = sink.feed(Message::Binary(msg)).await {
                    fail(format!("send failed: {e}"));
                    return stats;
                }
                n += 1;
            }
            if n == 0 {
                let until = pacer.next_at().unwrap_or(window.end).min(window.end);
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            let flushed = tokio::select! {
                r = sink.flush() => r,
                _ = failures.wait_stopped() => return stats,
            };
            if let Err(e) = flushed {
                fail(format!("send failed: {e}"));
                return stats;
            }
            stats.sent_total += n;
            if window.contains(Instant::now()) {
                stats.sent += n;
            }
            counter.fetch_add(n, Ordering::Relaxed);
        }
        if !failures.stopped() {
            // Close: the server answers only after reading everything sent before it.
            let closed = tokio::time::timeout(timeout, sink.close()).await;
            match closed {
                Ok(Ok(())) | Ok(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => {}
                Ok(Err(e)) => fail(format!("sending Close failed: {e}")),
                Err(_) => fail(format!("sending Close took more than {timeout:?}")),
            }
        }
        stats
    };
    let reader = async {
        let mut echoed = 0u64;
        // Every wait is bounded: the server has `timeout` after the window to drain and close.
        let deadline = window.end + timeout * 2;
        loop {
            let got = tokio::select! {
                r = tokio::time::timeout_at(deadline.into(), stream.next()) => r,
                _ = failures.wait_stopped() => return echoed,
            };
            match got {
                Err(_) => {
                    fail(format!(
                        "the server did not answer Close within {:?} of the end",
                        timeout * 2
                    ));
                    return echoed;
                }
                Ok(Some(Ok(Message::Binary(b)))) => {
                    // The echo endpoint returns each message in order.
                    let want = payload::echo_message(size, index, echoed, 0);
                    if let Some(why) = payload::echo_mismatch(&want, &b) {
                        fail(why);
                        return echoed;
                    }
                    echoed += 1;
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Ok(Some(Ok(Message::Text(_)))) => {
                    fail("a text message arrived".into());
                    return echoed;
                }
                // The server's answer to our Close (or its own Close after the window).
                Ok(Some(Ok(Message::Close(_))))
                | Ok(None)
                | Ok(Some(Err(Error::ConnectionClosed | Error::AlreadyClosed))) => {
                    if Instant::now() < window.end {
                        fail("the server closed the connection during the run".into());
                    }
                    return echoed;
                }
                Ok(Some(Err(e))) => {
                    fail(format!("read failed: {e}"));
                    return echoed;
                }
            }
        }
    };
    let (mut stats, echoed) = tokio::join!(writer, reader);
    stats.echoed = echoed;
    stats
}
