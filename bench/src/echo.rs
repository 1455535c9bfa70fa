//! `echo`: C connections, each a closed loop keeping D messages in flight. Every reply must
//! equal the message sent in that position; latency is from the send to its echo.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::cli::EchoArgs;
use crate::conn::{Connector, Ws, close_gracefully, connect_all};
use crate::hist::Latency;
use crate::payload;
use crate::report::{Report, thousands};
use crate::run::{Failures, Harness, Pacer, Window};

/// What one connection did inside the window.
#[derive(Default)]
struct ConnStats {
    msgs: u64,
    bytes: u64,
    latency: Latency,
}

pub async fn run(args: EchoArgs) -> Result<Report, String> {
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
        let ctx = Ctx {
            index: i as u32,
            size: args.size as usize,
            depth: args.depth as usize,
            window,
            timeout: common.timeout,
            failures: failures.clone(),
            counter: harness.counter.clone(),
        };
        tasks.push(tokio::spawn(echo_loop(ws, ctx, pacer)));
    }
    let mut total = ConnStats::default();
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.msgs += s.msgs;
                total.bytes += s.bytes;
                total.latency.merge(&s.latency);
            }
            Err(e) => failures.fail(format!("connection task failed: {e}")),
        }
    }
    let (edges, scrapes) = harness.finish().await;

    let mut r = Report::new("echo");
    r.set("connections", args.connections);
    r.set("size", args.size);
    r.set("depth", args.depth);
    r.line(format!(
        "echo           {} connections, {} B messages, {} in flight each",
        args.connections, args.size, args.depth
    ));
    let secs = window.measured().as_secs_f64();
    r.line(format!(
        "throughput     {} msgs/s ({} echoes checked in {secs:.1} s)",
        thousands(total.msgs as f64 / secs),
        thousands(total.msgs as f64)
    ));
    r.line(format!("latency        {}", total.latency.summary()));
    r.set("bytes", total.bytes);
    r.set("latency_us", total.latency.to_json());
    r.common(common, &window, &edges, scrapes, total.msgs, "msgs");
    if total.msgs == 0 && failures.count() == 0 {
        r.error("no echo arrived inside the measured window");
    }
    r.failures(&failures);
    Ok(r)
}

struct Ctx {
    index: u32,
    size: usize,
    depth: usize,
    window: Window,
    timeout: std::time::Duration,
    failures: Arc<Failures>,
    counter: Arc<std::sync::atomic::AtomicU64>,
}

/// One connection's closed loop. Sends are batched (fed, then one flush) and replies that are
/// already in hand are taken without waiting, so a connection with D in flight costs the
/// client about one write per batch, not per message.
async fn echo_loop(mut ws: Ws, ctx: Ctx, mut pacer: Pacer) -> ConnStats {
    let mut stats = ConnStats::default();
    let mut inflight: VecDeque<(Bytes, Instant)> = VecDeque::with_capacity(ctx.depth);
    let mut seq = 0u64;
    let fail = |msg: String| {
        ctx.failures
            .fail(format!("connection {}: {msg}", ctx.index))
    };
    'run: loop {
        if ctx.failures.stopped() {
            break;
        }
        let now = Instant::now();
        if now >= ctx.window.end {
            break;
        }
        let mut fed = false;
        while inflight.len() < ctx.depth && pacer.ready(now) {
            pacer.take();
            let msg = payload::echo_message(ctx.size, ctx.index, seq, payload::ns_at(now));
            seq += 1;
            if let Err(e) = ws.feed(Message::Binary(msg.clone())).await {
                fail(format!("send failed: {e}"));
                break 'run;
            }
            inflight.push_back((msg, now));
            fed = true;
        }
        if fed && let Err(e) = ws.flush().await {
            fail(format!("send failed: {e}"));
            break;
        }
        let Some(&(_, oldest)) = inflight.front() else {
            // Rate limited with nothing in flight: wait for the next slot.
            let until = pacer
                .next_at()
                .unwrap_or(ctx.window.end)
                .min(ctx.window.end);
            tokio::time::sleep_until(until.into()).await;
            continue;
        };
        let reply_deadline = oldest + ctx.timeout;
        let wake = match pacer.next_at() {
            Some(next) if inflight.len() < ctx.depth => next.min(reply_deadline),
            _ => reply_deadline,
        };
        let got = tokio::select! {
            biased;
            r = ws.next() => r,
            _ = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= reply_deadline {
                    fail(format!("no echo within {:?}", ctx.timeout));
                    break;
                }
                continue;
            }
            _ = ctx.failures.wait_stopped() => break,
        };
        if !take_reply(got, &mut inflight, &ctx, &mut stats) {
            break;
        }
        // Replies already received are taken without a wait (pipelined case).
        while !inflight.is_empty() {
            match ws.next().now_or_never() {
                Some(got) => {
                    if !take_reply(got, &mut inflight, &ctx, &mut stats) {
                        break 'run;
                    }
                }
                None => break,
            }
        }
    }
    // Collect what is still in flight, then close.
    while !inflight.is_empty() && !ctx.failures.stopped() {
        match tokio::time::timeout(ctx.timeout, ws.next()).await {
            Ok(got) => {
                if !take_reply(got, &mut inflight, &ctx, &mut stats) {
                    break;
                }
            }
            Err(_) => {
                fail(format!("no echo within {:?} after the run", ctx.timeout));
                break;
            }
        }
    }
    if !ctx.failures.stopped()
        && let Err(e) = close_gracefully(&mut ws, ctx.timeout).await
    {
        fail(e);
    }
    stats
}

/// Checks one reply against the oldest message in flight; false ends the connection.
fn take_reply(
    got: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    inflight: &mut VecDeque<(Bytes, Instant)>,
    ctx: &Ctx,
    stats: &mut ConnStats,
) -> bool {
    let fail = |msg: String| {
        ctx.failures
            .fail(format!("connection {}: {msg}", ctx.index));
        false
    };
    match got {
        Some(Ok(Message::Binary(b))) => {
            let Some((want, sent_at)) = inflight.pop_front() else {
                return fail(format!(
                    "a {}-byte message arrived that was never sent",
                    b.len()
                ));
            };
            if let Some(why) = payload::echo_mismatch(&want, &b) {
                return fail(why);
            }
            let now = Instant::now();
            if ctx.window.contains(now) {
                stats.msgs += 1;
                stats.bytes += b.len() as u64;
                if sent_at >= ctx.window.measure_start {
                    stats.latency.record_ns((now - sent_at).as_nanos() as u64);
                }
            }
            ctx.counter.fetch_add(1, Ordering::Relaxed);
            true
        }
        // tungstenite answers pings itself while we read.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => true,
        Some(Ok(Message::Text(t))) => fail(format!(
            "a text message arrived ({} bytes) where a binary echo was expected",
            t.len()
        )),
        Some(Ok(Message::Close(frame))) => fail(format!(
            "the server closed the connection ({})",
            frame
                .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                .unwrap_or_else(|| "no code".into())
        )),
        Some(Err(e)) => fail(format!("read failed: {e}")),
        None => fail("the connection ended".into()),
    }
}
