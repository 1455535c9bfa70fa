//! `rooms`: R rooms of M members; the first P members of each room publish at a set rate and
//! every member checks each message it receives: intact, from its own room, never its own,
//! and in order per publisher (a gap is a lost message). Reports deliveries per second (and per
//! server CPU-second with `--server-pid`), the share of expected deliveries that arrived, and
//! publish-to-delivery latency. Missing deliveries are counted exactly: after the drain each
//! member closes and keeps reading until the server answers its Close, counting what still
//! arrives as late, so `missing_total` is what the server never sent. The server is only a
//! relay of payload bytes (timestamps are the client's own clock), so any room server that
//! sends each message to the room's other members can be measured, e.g. the Go hub of
//! `../shared/anchors/hub-go` next to wsotel (`scripts/bench-rooms`).
//!
//! With `--allow-closes` a member the server closes is counted and the run goes on (a server
//! that drops slow members is measured instead of failing the run).
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
use crate::conn::{Connector, Ws, close_gracefully, close_reading, connect_many};
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
    /// Publications that arrived during the closing handshake, after the drain.
    late: u64,
    gaps: u64,
    latency: Latency,
    /// Deliveries from a publisher on another instance (`--also-url`), and their latency.
    cross_delivered: u64,
    cross_latency: Latency,
    /// Flood messages received (text).
    flood_received: u64,
    /// The server closed this member (with `--allow-closes`): its Close code, 1006 without one.
    closed: Option<u16>,
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
            allow_closes: args.allow_closes,
        };
        let pacer = Pacer::new(Some(total_rate / npub), window.start, phase);
        tasks.push(tokio::spawn(member_loop(ws, ctx, pacer)));
    }
    let mut total = MemberStats::default();
    let mut closed = std::collections::BTreeMap::<u16, u64>::new();
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.published += s.published;
                total.published_in_window += s.published_in_window;
                total.delivered += s.delivered;
                total.delivered_in_window += s.delivered_in_window;
                total.late += s.late;
                total.gaps += s.gaps;
                total.latency.merge(&s.latency);
                total.cross_delivered += s.cross_delivered;
                total.cross_latency.merge(&s.cross_latency);
                total.flood_received += s.flood_received;
                if let Some(code) = s.closed {
                    *closed.entry(code).or_default() += 1;
                }
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
    // Exact: every publication sent is owed to every other member, and a member reads until
    // the server's answer to its Close, so what it never read the server never sent.
    let missing = expected.saturating_sub(total.delivered + total.late);
    let members_closed: u64 = closed.values().sum();
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
    r.set("late_total", total.late);
    r.set("missing_total", missing);
    r.set("members_closed", members_closed);
    r.set("member_close_codes", codes_json(&closed));
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
        "missing        {} (never sent by the server); {} arrived late, during the closing handshake",
        thousands(missing as f64),
        thousands(total.late as f64)
    ));
    if members_closed > 0 {
        r.line(format!(
            "closed         the server closed {members_closed} member(s): {}",
            closed
                .iter()
                .map(|(c, n)| format!("{n} x {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
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
    if members_closed == u64::from(args.rooms * args.members) {
        r.error("the server closed every member: nothing left to measure");
    }
    r.failures(&failures);
    Ok(r)
}

/// `{"1008": 2}`: how many members were closed with each code.
fn codes_json(codes: &std::collections::BTreeMap<u16, u64>) -> serde_json::Value {
    codes
        .iter()
        .map(|(c, n)| (c.to_string(), serde_json::Value::from(*n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
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
    /// A member the server closes is counted, not a failure (`--allow-closes`).
    allow_closes: bool,
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

/// What one member has received so far, and the checks on each publication.
struct Receiver<'a> {
    ctx: &'a MemberCtx,
    stats: MemberStats,
    /// The last sequence number seen from each publisher.
    last: Vec<Option<u64>>,
    measure_start_ns: u64,
}

impl Receiver<'_> {
    /// Checks and counts one binary message: intact, from this room, from another member that
    /// publishes, and after that publisher's previous one. `late`: it arrived during the
    /// closing handshake, after the drain (counted apart, so nothing the server sent is lost
    /// from the count).
    fn publication(&mut self, b: &[u8], late: bool) -> Result<(), String> {
        let ctx = self.ctx;
        let m = payload::check_room_message(b, ctx.room)?;
        if m.publisher == ctx.member {
            return Err("its own publication came back (rooms send to the other members)".into());
        }
        let Some(slot) = self.last.get_mut(m.publisher as usize) else {
            return Err(format!(
                "a publication from member {}, which does not publish",
                m.publisher
            ));
        };
        let stats = &mut self.stats;
        match *slot {
            Some(prev) if m.seq <= prev => {
                return Err(format!(
                    "publication {} of member {} arrived after {prev} (duplicate or reordered)",
                    m.seq, m.publisher
                ));
            }
            Some(prev) => stats.gaps += m.seq - prev - 1,
            None => stats.gaps += m.seq,
        }
        *slot = Some(m.seq);
        if late {
            stats.late += 1;
            return Ok(());
        }
        let now = Instant::now();
        stats.delivered += 1;
        let cross = m.publisher % ctx.instances != ctx.member % ctx.instances;
        if cross {
            stats.cross_delivered += 1;
        }
        if ctx.window.contains(now) {
            stats.delivered_in_window += 1;
            if m.ts_ns >= self.measure_start_ns {
                let ns = payload::now_ns().saturating_sub(m.ts_ns);
                stats.latency.record_ns(ns);
                if cross {
                    stats.cross_latency.record_ns(ns);
                }
            }
        }
        ctx.counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A text message: a flooder's (counted) when flooders are in the run, else a failure.
    fn text(&mut self) -> Result<(), String> {
        if self.ctx.flooded {
            self.stats.flood_received += 1;
            Ok(())
        } else {
            Err("a text message arrived".into())
        }
    }

    /// The server ended the connection (`code`: its Close code, 1006 without one). With
    /// `--allow-closes` that is counted and the member stops quietly; otherwise a failure.
    fn closed_by_server(&mut self, code: u16, why: String) -> Result<(), String> {
        if self.ctx.allow_closes {
            self.stats.closed = Some(code);
            Ok(())
        } else {
            Err(why)
        }
    }
}

/// Why a member's loop ended.
enum Ended {
    /// The drain is over: close the connection.
    Drained,
    /// The server closed it (counted), or the run stopped: nothing more to do.
    Gone,
}

async fn member_loop(mut ws: Ws, ctx: MemberCtx, mut pacer: Pacer) -> MemberStats {
    let mut rx = Receiver {
        ctx: &ctx,
        stats: MemberStats::default(),
        last: vec![None; ctx.publishers as usize],
        measure_start_ns: ctx.window.measure_start_ns(),
    };
    let fail = |msg: String| {
        ctx.failures
            .fail(format!("room {} member {}: {msg}", ctx.room, ctx.member))
    };
    let ended = match member_run(&mut ws, &mut rx, &mut pacer).await {
        Ok(ended) => ended,
        Err(e) => {
            fail(e);
            Ended::Gone
        }
    };
    if matches!(ended, Ended::Drained)
        && !ctx.failures.stopped()
        && let Err(e) = close_counting(&mut ws, &mut rx).await
    {
        fail(e);
    }
    rx.stats
}

/// Publishes (if a publisher) and receives until the drain after the window is over.
async fn member_run(
    ws: &mut Ws,
    rx: &mut Receiver<'_>,
    pacer: &mut Pacer,
) -> Result<Ended, String> {
    let ctx = rx.ctx;
    let drain_until = ctx.window.end + DRAIN;
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if ctx.failures.stopped() {
            return Ok(Ended::Gone);
        }
        if now >= drain_until {
            return Ok(Ended::Drained);
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
                        rx.closed_by_server(1006, format!("publish failed: {e}"))?;
                        return Ok(Ended::Gone);
                    }
                    rx.stats.published += 1;
                    if ctx.window.contains(now) {
                        rx.stats.published_in_window += 1;
                    }
                }
                continue;
            }
            _ = ctx.failures.wait_stopped() => return Ok(Ended::Gone),
        };
        match got {
            Some(Ok(Message::Binary(b))) => rx.publication(&b, false)?,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Text(_))) => rx.text()?,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                let why = format!(
                    "the server closed the connection ({})",
                    frame
                        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_else(|| "no code".into())
                );
                rx.closed_by_server(code, why)?;
                return Ok(Ended::Gone);
            }
            Some(Err(e)) => {
                rx.closed_by_server(1006, format!("read failed: {e}"))?;
                return Ok(Ended::Gone);
            }
            None => {
                rx.closed_by_server(1006, "the connection ended".into())?;
                return Ok(Ended::Gone);
            }
        }
    }
}

/// Ends a member with a normal Close and reads until the server's Close: publications still
/// arriving are what the server had queued for this member before it answered, counted as late
/// deliveries. With them, delivered + late is everything the server sent the member, and what
/// the report calls missing is exactly what it never sent.
async fn close_counting(ws: &mut Ws, rx: &mut Receiver<'_>) -> Result<(), String> {
    let timeout = rx.ctx.timeout;
    close_reading(ws, timeout, |msg| match msg {
        Message::Binary(b) => rx.publication(&b, true),
        Message::Text(_) => rx.text(),
        _ => Ok(()),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Mode};
    use clap::Parser;
    use std::sync::Mutex;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// A relay member: its join order and its outbound queue.
    type Joined = (usize, mpsc::UnboundedSender<Message>);

    /// What the relay below did: deliveries it dropped and deliveries it wrote.
    #[derive(Default)]
    struct Relayed {
        dropped: AtomicU64,
        written: AtomicU64,
    }

    /// A one-room relay for the tests: every binary message to every other member, except that
    /// every `drop_every`-th delivery is dropped, and the `close_at`-th member to join is sent a
    /// Close (1008) once `close_after` deliveries have been written to it.
    async fn relay(drop_every: u64, close_at: usize, close_after: u64) -> (String, Arc<Relayed>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws/rooms", listener.local_addr().unwrap());
        let relayed = Arc::new(Relayed::default());
        let members: Arc<Mutex<Vec<Joined>>> = Arc::default();
        let counted = relayed.clone();
        tokio::spawn(async move {
            // Deliveries considered so far (every `drop_every`-th is dropped).
            let seen = Arc::new(AtomicU64::new(0));
            for id in 0.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                let (mut sink, mut stream) = ws.split();
                let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
                members.lock().unwrap().push((id, tx));
                let relayed = counted.clone();
                tokio::spawn(async move {
                    let mut written = 0;
                    while let Some(m) = rx.recv().await {
                        if id == close_at && written == close_after {
                            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: 1008.into(),
                                reason: "slow".into(),
                            };
                            let _ = sink.send(Message::Close(Some(frame))).await;
                            return;
                        }
                        if sink.send(m).await.is_err() {
                            return;
                        }
                        written += 1;
                        relayed.written.fetch_add(1, Ordering::Relaxed);
                    }
                });
                let (members, relayed, seen) = (members.clone(), counted.clone(), seen.clone());
                tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        if !m.is_binary() {
                            continue;
                        }
                        for (other, tx) in members.lock().unwrap().iter() {
                            if *other == id {
                                continue;
                            }
                            if seen.fetch_add(1, Ordering::Relaxed) % drop_every == drop_every - 1 {
                                relayed.dropped.fetch_add(1, Ordering::Relaxed);
                            } else {
                                let _ = tx.send(m.clone());
                            }
                        }
                    }
                    // Gone: its writer ends, and with both halves dropped the TCP connection
                    // closes (a client waits for that after the closing handshake).
                    members.lock().unwrap().retain(|(other, _)| *other != id);
                });
            }
        });
        (url, relayed)
    }

    fn rooms_args(url: &str, extra: &[&str]) -> RoomsArgs {
        let mut argv = vec![
            "wsotel-bench",
            "rooms",
            "--url",
            url,
            "--rooms",
            "1",
            "--members",
            "6",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().mode {
            Mode::Rooms(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn field(r: &Report, key: &str) -> u64 {
        r.get(key)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("{key}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_deliveries_are_counted_exactly() {
        let (url, relayed) = relay(7, usize::MAX, 0).await;
        let r = run(rooms_args(&url, &[])).await.unwrap();
        r.print(true);
        assert!(r.ok());
        let (expected, missing) = (field(&r, "expected_total"), field(&r, "missing_total"));
        assert!(expected > 0);
        assert_eq!(missing, relayed.dropped.load(Ordering::Relaxed));
        assert_eq!(missing, expected - relayed.written.load(Ordering::Relaxed));
        assert_eq!(field(&r, "members_closed"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_the_server_closes_is_counted_with_allow_closes() {
        // The fourth member to join (not a publisher) is closed after 20 deliveries.
        let (url, relayed) = relay(u64::MAX, 3, 20).await;
        let r = run(rooms_args(&url, &["--allow-closes"])).await.unwrap();
        r.print(true);
        assert!(r.ok());
        assert_eq!(field(&r, "members_closed"), 1);
        assert_eq!(
            r.get("member_close_codes"),
            Some(&serde_json::json!({"1008": 1}))
        );
        assert_eq!(
            field(&r, "missing_total"),
            field(&r, "expected_total") - relayed.written.load(Ordering::Relaxed)
        );
        // Without the flag, the same close fails the run.
        let (url, _) = relay(u64::MAX, 3, 20).await;
        assert!(!run(rooms_args(&url, &[])).await.unwrap().ok());
    }

    #[test]
    fn room_urls() {
        assert_eq!(room_url("ws://h:1/ws/rooms", "a"), "ws://h:1/ws/rooms/a");
        assert_eq!(room_url("ws://h:1/ws/rooms/", "a"), "ws://h:1/ws/rooms/a");
        assert_eq!(room_url("ws://h:1/r/{room}/x", "a"), "ws://h:1/r/a/x");
    }
}
