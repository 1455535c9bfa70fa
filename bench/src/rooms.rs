//! `rooms`: R rooms of M members; the first P members of each room publish at a set rate and
//! every member checks each message it receives: intact, from its own room, never its own,
//! and in order per publisher (a gap is a lost message). Reports deliveries per second, the
//! share of expected deliveries that arrived, and publish-to-delivery latency.
//!
//! With `--flooders N`, N abusive clients join the first room and send text messages as fast as
//! the socket takes them, reconnecting whenever they are closed: the report adds what they sent,
//! how often the server closed them, and how much of the flood reached the members, next to the
//! well-behaved members' own delivery and latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::RoomsArgs;
use crate::conn::{Connector, Ws, close_gracefully, connect_many};
use crate::hist::Latency;
use crate::payload;
use crate::report::{Report, thousands};
use crate::run::{Failures, Harness, Pacer, Window};

/// Publish rate over all publishers when `--rate` is not given.
const DEFAULT_RATE: f64 = 1000.0;
/// How long members keep reading after the publishers stop.
const DRAIN: Duration = Duration::from_secs(1);
/// Pause between the last join and the first publication, so every member is in its room.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Default)]
struct MemberStats {
    published: u64,
    published_in_window: u64,
    delivered: u64,
    delivered_in_window: u64,
    gaps: u64,
    latency: Latency,
    /// Deliveries from a publisher on another instance (`--also-url`), and their latency.
    cross_delivered: u64,
    cross_latency: Latency,
    /// Flood messages received (text).
    flood_received: u64,
}

#[derive(Default)]
struct FloodStats {
    /// Messages written to the socket.
    sent: u64,
    /// Times the server closed (or cut) the flooder.
    closed: u64,
    /// Close codes seen, by code.
    codes: std::collections::BTreeMap<u16, u64>,
}

/// The URL of room `name`: `{room}` in `url` replaced, or `/<name>` appended.
pub fn room_url(url: &str, name: &str) -> String {
    if url.contains("{room}") {
        url.replace("{room}", name)
    } else {
        format!("{}/{name}", url.trim_end_matches('/'))
    }
}

pub async fn run(args: RoomsArgs) -> Result<Report, String> {
    let common = &args.common;
    let publishers = args.publishers.min(args.members);
    let run_tag = std::process::id();
    let instances: Vec<&String> = std::iter::once(&common.url)
        .chain(args.also_url.iter())
        .collect();
    let mut urls = Vec::new();
    for room in 0..args.rooms {
        let name = format!("{}-{run_tag}-{room}", args.room_prefix);
        for member in 0..args.members {
            urls.push(room_url(
                instances[member as usize % instances.len()],
                &name,
            ));
        }
    }
    let connector =
        Connector::new(&urls[0], common.source_ips.unwrap_or(0), common.timeout).await?;
    let failures = Arc::new(Failures::default());
    // A connector resolves its server once: one per instance, each connecting its members,
    // then the connections back in member order.
    let n = instances.len();
    let mut slots: Vec<Option<Ws>> = (0..urls.len()).map(|_| None).collect();
    for (k, instance) in instances.iter().enumerate() {
        let here: Vec<usize> = (0..urls.len())
            .filter(|i| (i % args.members as usize) % n == k)
            .collect();
        let conn = if k == 0 {
            connector.clone()
        } else {
            Connector::new(instance, common.source_ips.unwrap_or(0), common.timeout).await?
        };
        let opened = connect_many(
            &conn,
            here.iter().map(|&i| urls[i].clone()).collect(),
            256,
            &failures,
        )
        .await?;
        for (i, ws) in here.into_iter().zip(opened) {
            slots[i] = Some(ws);
        }
    }
    let conns: Vec<Ws> = slots
        .into_iter()
        .map(|s| s.expect("every member connected"))
        .collect();
    tokio::time::sleep(SETTLE).await;
    let harness = Harness::start(common, "deliveries")?;
    let window = harness.window;
    let total_rate = common.rate.unwrap_or(DEFAULT_RATE);
    let npub = (args.rooms * publishers) as f64;
    let flood_url = room_url(&common.url, &format!("{}-{run_tag}-0", args.room_prefix));
    let flooders: Vec<_> = (0..args.flooders)
        .map(|i| {
            tokio::spawn(flood_loop(
                connector.clone(),
                flood_url.clone(),
                u64::from(i),
                args.size as usize,
                window,
                failures.clone(),
            ))
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let room = i as u32 / args.members;
        let member = i as u32 % args.members;
        let phase = (room * publishers + member) as f64 / npub;
        let ctx = MemberCtx {
            room,
            member,
            publisher: member < publishers,
            publishers,
            size: args.size as usize,
            window,
            timeout: common.timeout,
            failures: failures.clone(),
            counter: harness.counter.clone(),
            flooded: args.flooders > 0,
            instances: instances.len() as u32,
        };
        let pacer = Pacer::new(Some(total_rate / npub), window.start, phase);
        tasks.push(tokio::spawn(member_loop(ws, ctx, pacer)));
    }
    let mut total = MemberStats::default();
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.published += s.published;
                total.published_in_window += s.published_in_window;
                total.delivered += s.delivered;
                total.delivered_in_window += s.delivered_in_window;
                total.gaps += s.gaps;
                total.latency.merge(&s.latency);
                total.cross_delivered += s.cross_delivered;
                total.cross_latency.merge(&s.cross_latency);
                total.flood_received += s.flood_received;
            }
            Err(e) => failures.fail(format!("member task failed: {e}")),
        }
    }
    let mut flood = FloodStats::default();
    for t in flooders {
        match t.await {
            Ok(f) => {
                flood.sent += f.sent;
                flood.closed += f.closed;
                for (code, n) in f.codes {
                    *flood.codes.entry(code).or_default() += n;
                }
            }
            Err(e) => failures.fail(format!("flooder task failed: {e}")),
        }
    }
    let (edges, scrapes) = harness.finish().await;
    let expected = total.published * (args.members as u64 - 1);
    let ratio = if expected > 0 {
        total.delivered as f64 / expected as f64
    } else {
        0.0
    };
    let secs = window.measured().as_secs_f64();
    let mut r = Report::new("rooms");
    r.set("rooms", args.rooms);
    r.set("members", args.members);
    r.set("publishers", publishers);
    r.set("size", args.size);
    r.set("publish_rate", total_rate);
    r.set("published", total.published_in_window);
    r.set("published_per_s", total.published_in_window as f64 / secs);
    r.set("published_total", total.published);
    r.set("delivered_total", total.delivered);
    r.set("expected_total", expected);
    r.set("delivery_ratio", (ratio * 1e6).round() / 1e6);
    r.set("lost_in_sequence", total.gaps);
    r.set("latency_us", total.latency.to_json());
    if instances.len() > 1 {
        r.set("instances", instances.len());
        r.set("cross_delivered_total", total.cross_delivered);
        r.set("cross_latency_us", total.cross_latency.to_json());
        r.line(format!(
            "instances      {}: {} deliveries crossed instances, latency {}",
            instances.len(),
            thousands(total.cross_delivered as f64),
            total.cross_latency.summary()
        ));
    }
    if args.flooders > 0 {
        r.set("flooders", args.flooders);
        r.set("flood_sent", flood.sent);
        r.set("flood_received", total.flood_received);
        r.set("flooder_closed", flood.closed);
        r.set(
            "flooder_close_codes",
            flood
                .codes
                .iter()
                .map(|(c, n)| format!("{c}x{n}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        r.line(format!(
            "flood          {} abuser(s): {} sent, closed {} times ({}), {} flood messages reached members",
            args.flooders,
            thousands(flood.sent as f64),
            flood.closed,
            flood
                .codes
                .iter()
                .map(|(c, n)| format!("{n} x {c}"))
                .collect::<Vec<_>>()
                .join(", "),
            thousands(total.flood_received as f64),
        ));
    }
    r.line(format!(
        "rooms          {} rooms x {} members, {} publisher(s) each, {} B, {} publishes/s in all",
        args.rooms, args.members, publishers, args.size, total_rate
    ));
    r.line(format!(
        "delivered      {} msgs/s ({:.4}% of {} expected over the run; {} gaps in sequence)",
        thousands(total.delivered_in_window as f64 / secs),
        ratio * 100.0,
        thousands(expected as f64),
        total.gaps
    ));
    r.line(format!(
        "latency        {} (publish to delivery)",
        total.latency.summary()
    ));
    r.common(
        common,
        &window,
        &edges,
        scrapes,
        total.delivered_in_window,
        "deliveries",
    );
    if total.delivered == 0 && failures.count() == 0 {
        r.error("no publication was delivered");
    }
    r.failures(&failures);
    Ok(r)
}

struct MemberCtx {
    room: u32,
    member: u32,
    publisher: bool,
    publishers: u32,
    size: usize,
    window: Window,
    timeout: Duration,
    failures: Arc<Failures>,
    counter: Arc<AtomicU64>,
    /// Flooders are in the run: text messages are theirs, counted, not a failure.
    flooded: bool,
    /// Instances the members are spread over (member i on instance i mod N).
    instances: u32,
}

/// One abusive client: floods the first room until the run ends, reconnecting after every
/// close (a rate-limited one is closed quickly; an unlimited one is never closed).
async fn flood_loop(
    connector: Connector,
    url: String,
    index: u64,
    size: usize,
    window: Window,
    failures: Arc<Failures>,
) -> FloodStats {
    let mut stats = FloodStats::default();
    let text: String = "f".repeat(size);
    let mut attempt = 0u64;
    while Instant::now() < window.end && !failures.stopped() {
        attempt += 1;
        let mut ws = match connector
            .connect(&url, 1_000_000 + index * 1000 + attempt)
            .await
        {
            Ok(ws) => ws,
            Err(_) => {
                // Refused (a limit) or timed out: try again shortly, as an abuser would.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let ended = loop {
            if Instant::now() >= window.end {
                break None;
            }
            // Send in batches of 64, flushed together, reading nothing back but the Close.
            let mut sent = true;
            for _ in 0..64 {
                if ws.feed(Message::text(text.clone())).await.is_err() {
                    sent = false;
                    break;
                }
                stats.sent += 1;
            }
            if !sent || ws.flush().await.is_err() {
                break Some(None);
            }
            if let Some(Some(msg)) = ws.next().now_or_never() {
                match msg {
                    Ok(Message::Close(frame)) => break Some(frame.map(|f| u16::from(f.code))),
                    Ok(_) => {}
                    Err(_) => break Some(None),
                }
            }
        };
        match ended {
            None => {
                let _ = close_gracefully(&mut ws, Duration::from_secs(2)).await;
            }
            Some(code) => {
                stats.closed += 1;
                *stats.codes.entry(code.unwrap_or(1006)).or_default() += 1;
            }
        }
    }
    stats
}

async fn member_loop(mut ws: Ws, ctx: MemberCtx, mut pacer: Pacer) -> MemberStats {
    let mut stats = MemberStats::default();
    let mut last: Vec<Option<u64>> = vec![None; ctx.publishers as usize];
    let mut seq = 0u64;
    let measure_start_ns = ctx.window.measure_start_ns();
    let drain_until = ctx.window.end + DRAIN;
    let fail = |msg: String| {
        ctx.failures
            .fail(format!("room {} member {}: {msg}", ctx.room, ctx.member))
    };
    loop {
        let now = Instant::now();
        if ctx.failures.stopped() || now >= drain_until {
            break;
        }
        let publishing = ctx.publisher && now < ctx.window.end;
        let wake = if publishing {
            pacer.next_at().unwrap_or(now).min(ctx.window.end)
        } else {
            drain_until
        };
        let got = tokio::select! {
            biased;
            r = ws.next() => r,
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if publishing && pacer.ready(now) && now < ctx.window.end {
                    pacer.take();
                    let msg = payload::room_message(ctx.size, ctx.room, ctx.member, seq, payload::ns_at(now));
                    seq += 1;
                    if let Err(e) = ws.send(Message::Binary(msg)).await {
                        fail(format!("publish failed: {e}"));
                        break;
                    }
                    stats.published += 1;
                    if ctx.window.contains(now) {
                        stats.published_in_window += 1;
                    }
                }
                continue;
            }
            _ = ctx.failures.wait_stopped() => break,
        };
        match got {
            Some(Ok(Message::Binary(b))) => {
                let m = match payload::check_room_message(&b, ctx.room) {
                    Ok(m) => m,
                    Err(why) => {
                        fail(why);
                        break;
                    }
                };
                if m.publisher == ctx.member {
                    fail("its own publication came back (rooms send to the other members)".into());
                    break;
                }
                let Some(slot) = last.get_mut(m.publisher as usize) else {
                    fail(format!(
                        "a publication from member {}, which does not publish",
                        m.publisher
                    ));
                    break;
                };
                match *slot {
                    Some(prev) if m.seq <= prev => {
                        fail(format!(
                            "publication {} of member {} arrived after {prev} (duplicate or reordered)",
                            m.seq, m.publisher
                        ));
                        break;
                    }
                    Some(prev) => stats.gaps += m.seq - prev - 1,
                    None => stats.gaps += m.seq,
                }
                *slot = Some(m.seq);
                let now = Instant::now();
                stats.delivered += 1;
                let cross = m.publisher % ctx.instances != ctx.member % ctx.instances;
                if cross {
                    stats.cross_delivered += 1;
                }
                if ctx.window.contains(now) {
                    stats.delivered_in_window += 1;
                    if m.ts_ns >= measure_start_ns {
                        let ns = payload::now_ns().saturating_sub(m.ts_ns);
                        stats.latency.record_ns(ns);
                        if cross {
                            stats.cross_latency.record_ns(ns);
                        }
                    }
                }
                ctx.counter.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Text(_))) if ctx.flooded => stats.flood_received += 1,
            Some(Ok(Message::Text(_))) => {
                fail("a text message arrived".into());
                break;
            }
            Some(Ok(Message::Close(frame))) => {
                fail(format!(
                    "the server closed the connection ({})",
                    frame
                        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_else(|| "no code".into())
                ));
                break;
            }
            Some(Err(e)) => {
                fail(format!("read failed: {e}"));
                break;
            }
            None => {
                fail("the connection ended".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_urls() {
        assert_eq!(room_url("ws://h:1/ws/rooms", "a"), "ws://h:1/ws/rooms/a");
        assert_eq!(room_url("ws://h:1/ws/rooms/", "a"), "ws://h:1/ws/rooms/a");
        assert_eq!(room_url("ws://h:1/r/{room}/x", "a"), "ws://h:1/r/a/x");
    }
}
