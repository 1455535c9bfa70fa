//! One upgraded WebSocket connection: its read loop, heartbeat, outbound queue and close.
//!
//! Each connection is one task that owns its socket (no split, no lock): it waits at once for a
//! client message, a queued room message, the heartbeat deadline and its stop signal. Every
//! message is counted on the route's bound instruments as it crosses the socket; the
//! connection's own totals go on its span and its closing log line.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::rooms::Reservation;
use crate::telemetry::log_limit::LogEvent;
use crate::telemetry::logging::panic_message;
use crate::telemetry::traces::Handling;
use crate::telemetry::{
    CloseInitiator, CloseReason, Direction, DropReason, ErrorType, Events, MessageType, Route,
    RouteInstruments, Spans,
};
use crate::upgrade::Socket;
use crate::wire::{Discarded, discard_until_close};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, TraceContextExt};

/// Close codes the server sends (RFC 6455 section 7.4.1).
pub mod close_code {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: used for slow consumers.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message exceeded the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server failed.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// How long the server waits for the client's reply to a Close it sent.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// After a read error, what the client still sends is discarded until its Close: at most the
/// rest of a frame at the size limit and this much more. A client sending more than that is
/// cut off without the rest of the handshake.
const DISCARD_SLACK: u64 = 16 * 1024;

/// What a connection needs from the server, besides its socket.
pub struct ConnectionContext {
    /// Unique per process; on spans and logs only, never on metrics.
    pub id: u64,
    /// The route it came in on.
    pub route: Route,
    /// Where it records; the connection counts itself in `active_connections` (with a drop
    /// guard) as soon as it starts.
    pub events: Events,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// Heartbeat settings.
    pub ping_interval: Duration,
    /// How long a ping may go unanswered.
    pub pong_timeout: Duration,
    /// What this connection does with data messages.
    pub kind: ConnectionKind,
    /// The connection's span, made in the upgrade request's span so it is its child.
    pub span: ConnectionSpan,
    /// Where message spans are made, when traces are exported.
    pub spans: Option<Arc<Spans>>,
    /// The TCP peer (on the connection's log lines and span, never a metric).
    pub peer: SocketAddr,
    /// A write that makes no progress this long ends the connection (`write_timeout`).
    pub write_timeout: Duration,
    /// When the connection's token expires (closed with 1008 then), with authentication on.
    pub expires_at: Option<Instant>,
    /// The terms of a room member, an authenticated client or a forwarded one; `None` for a
    /// plain echo connection. Boxed, and only when needed: every idle connection pays for what
    /// its future holds inline.
    pub admission: Option<Box<Admission>>,
}

/// Who was admitted beyond the TCP peer, and on what terms.
#[derive(Debug)]
pub struct Admission {
    /// The client: the address a trusted proxy forwarded, else the TCP peer's.
    pub client: IpAddr,
    /// The token's subject, when authentication is on.
    pub subject: Option<String>,
    /// Where the client address is put in the penalty box when it exceeds the publish rate.
    pub sources: crate::sources::Sources,
    /// Whether the token lets this member send to its room (always, without authentication).
    pub may_publish: bool,
    /// Room messages per second on average (`0`: no limit).
    pub publish_rate: u32,
    /// Room messages at once above the rate.
    pub publish_burst: u32,
    /// How long the client address is refused after this connection exceeds the publish rate.
    pub rate_limit_penalty: Duration,
    /// A room member's publish bucket (made when it starts).
    publish: Option<TokenBucket>,
}

impl Admission {
    /// Terms for `client` (the publish bucket is made when the connection starts).
    pub fn new(client: IpAddr, sources: crate::sources::Sources) -> Self {
        Admission {
            client,
            subject: None,
            sources,
            may_publish: true,
            publish_rate: 0,
            publish_burst: 1,
            rate_limit_penalty: Duration::ZERO,
            publish: None,
        }
    }
}

/// A token bucket: `burst` messages at once, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            rate: f64::from(rate),
            last: now,
        }
    }

    /// Takes one token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Echo or room member.
pub enum ConnectionKind {
    /// Every data message is sent back.
    Echo,
    /// Every data message goes to the other members of the room.
    Room {
        /// The room, held (and subscribed on the backplane) since before the 101.
        reservation: Reservation,
        /// Capacity of the member's outbound queue.
        queue: usize,
    },
}

impl ConnectionKind {
    /// The room's name, for a room member.
    pub fn room(&self) -> Option<&str> {
        match self {
            ConnectionKind::Echo => None,
            ConnectionKind::Room { reservation, .. } => Some(reservation.room_name()),
        }
    }
}

/// Per-connection totals for the span and the closing log line (metrics are recorded as
/// messages cross the socket).
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// How the connection ended, who decided it, and what to send the client about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ending {
    reason: CloseReason,
    initiator: CloseInitiator,
    /// A Close frame still to send, when the server is the one closing.
    close: Option<(u16, &'static str)>,
    /// The close code of the connection, whichever side sent the first Close.
    code: Option<u16>,
}

impl Ending {
    /// The client went away without a Close (or after the closing handshake completed).
    fn peer_gone(reason: CloseReason) -> Self {
        Ending {
            reason,
            initiator: CloseInitiator::Client,
            close: None,
            code: None,
        }
    }

    /// The client closed with `code`.
    fn client_close(code: Option<u16>) -> Self {
        Ending {
            reason: CloseReason::from_client_code(code),
            initiator: CloseInitiator::Client,
            close: None,
            code,
        }
    }

    /// The server ends the connection without a closing handshake: the peer is presumed dead
    /// (heartbeat timeout) or the socket failed.
    fn cut(reason: CloseReason) -> Self {
        Ending {
            reason,
            initiator: CloseInitiator::Server,
            close: None,
            code: None,
        }
    }

    /// The server closes with `code`.
    fn server(reason: CloseReason, code: u16, text: &'static str) -> Self {
        Ending {
            reason,
            initiator: CloseInitiator::Server,
            close: Some((code, text)),
            code: Some(code),
        }
    }
}

/// The heartbeat: the server pings every interval; an unanswered ping ends the connection.
/// The same timer also ends the connection when its token expires.
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    /// Payload and send time of the ping awaiting its pong.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
    /// When the connection's token expires.
    expires_at: Option<Instant>,
}

impl Heartbeat {
    fn new(interval: Duration, timeout: Duration, expires_at: Option<Instant>) -> Self {
        Heartbeat {
            interval,
            timeout,
            next_ping: Instant::now() + interval,
            outstanding: None,
            seq: 0,
            expires_at,
        }
    }

    fn deadline(&self) -> Instant {
        let beat = self.pong_due().unwrap_or(self.next_ping);
        self.expires_at.map_or(beat, |e| e.min(beat))
    }

    /// When the outstanding ping's pong is overdue.
    fn pong_due(&self) -> Option<Instant> {
        self.outstanding.map(|(_, sent)| sent + self.timeout)
    }

    /// Whether the token has expired by `now`.
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    /// Returns the RTT when `payload` answers the outstanding ping.
    fn pong(&mut self, payload: &[u8]) -> Option<Duration> {
        let (seq, sent) = self.outstanding?;
        if payload != seq.to_be_bytes() {
            return None;
        }
        self.outstanding = None;
        let now = Instant::now();
        self.next_ping = sent + self.interval;
        if self.next_ping < now {
            self.next_ping = now;
        }
        Some(now - sent)
    }
}

/// The connection's span (when traces are exported), a child of the upgrade request's span:
/// an OpenTelemetry span the connection holds for its life, ended with the close code, reason
/// and totals (see `telemetry::traces` for why it is not a `tracing` span). Boxed: an idle
/// connection without traces pays one pointer for it.
pub type ConnectionSpan = Option<Box<opentelemetry_sdk::trace::Span>>;

/// Runs `log` with the connection span's context current, so what it logs carries the span's
/// trace and span ids (in OTel log records and JSON lines).
fn in_span<R>(span: Option<&opentelemetry_sdk::trace::Span>, log: impl FnOnce() -> R) -> R {
    let _current = span.map(|s| {
        opentelemetry::Context::new()
            .with_remote_span_context(s.span_context().clone())
            .attach()
    });
    log()
}

/// Serves one upgraded connection until it closes; returns why it ended.
///
/// The connection span is *not* made current on every poll: that would cost a thread-local
/// push and pop per wake-up, per message. It is made current only around what the connection
/// logs, so its log records still carry its ids.
///
/// Both arguments come boxed and are moved out at once: an async function keeps its arguments'
/// slots for its whole life, so unboxed they would be paid twice by every idle connection (once
/// as the argument, once where they are moved to).
pub async fn serve(socket: Box<Socket>, ctx: Box<ConnectionContext>) -> CloseReason {
    // Moved out in blocks of their own, so each box is freed at once (a box moved out of stays
    // allocated until its binding goes out of scope: here, the end of the connection).
    let socket: Socket = {
        let boxed = socket;
        *boxed
    };
    let ctx: ConnectionContext = {
        let boxed = ctx;
        *boxed
    };
    let ConnectionContext {
        id,
        route,
        events,
        shutdown,
        ping_interval,
        pong_timeout,
        kind,
        mut span,
        spans,
        peer,
        write_timeout,
        expires_at,
        mut admission,
    } = ctx;
    let guard = events.connection_opened(route);
    let mut link = Link {
        socket,
        events: &events,
        route: guard.instruments(),
        totals: Totals::default(),
        closes_received: 0,
        span: span.as_deref(),
        // Room members get a token of their own, so the room can kick them as slow
        // consumers; echo connections share the server's (no allocation per connection).
        stop: match kind {
            ConnectionKind::Echo => shutdown.clone(),
            ConnectionKind::Room { .. } => shutdown.child_token(),
        },
        heartbeat: Heartbeat::new(ping_interval, pong_timeout, expires_at),
        write_timeout,
    };
    if let Some(a) = admission.as_mut() {
        a.publish = (a.publish_rate > 0 && matches!(kind, ConnectionKind::Room { .. }))
            .then(|| TokenBucket::new(a.publish_rate, a.publish_burst, Instant::now()));
    }
    let client = |a: &Option<Box<Admission>>| a.as_ref().map_or(peer.ip(), |a| a.client);
    let subject = |a: &Option<Box<Admission>>| a.as_ref().and_then(|a| a.subject.clone());

    let (membership, mut rx) = match kind {
        ConnectionKind::Echo => (None, None),
        ConnectionKind::Room { reservation, queue } => {
            let (tx, rx) = mpsc::channel(queue);
            (Some(reservation.join(id, tx, link.stop.clone())), Some(rx))
        }
    };
    if events.log_allowed(LogEvent::ConnectionOpened) {
        in_span(link.span, || {
            tracing::info!(
                connection.id = id as i64,
                http.route = route.as_str(),
                client.address = %client(&admission),
                network.peer.address = %peer.ip(),
                network.peer.port = peer.port(),
                user.id = subject(&admission),
                "connection opened"
            )
        });
    }

    let sleep = tokio::time::sleep_until(link.heartbeat.deadline().into());
    tokio::pin!(sleep);

    let mut batch = Batching::default();
    // A panic while handling this connection (a bug) ends only this connection, like any
    // other failure: Close 1011, reason `internal_error`, counted as `errors{panic}`, and the
    // room left and totals recorded below. Unwinding costs nothing until it happens.
    let handled = AssertUnwindSafe(async {
        loop {
            // Replies fed while more input was ready are flushed once none is: with many messages
            // in flight that is one write for many replies; with one, no extra read per message.
            let ready = if batch.unflushed {
                match link.socket.next().now_or_never() {
                    Some(item) => {
                        batch.hit();
                        Some(item)
                    }
                    None => {
                        batch.miss();
                        if let Err(e) = link.flush().await {
                            break e;
                        }
                        None
                    }
                }
            } else {
                None
            };
            let event = match ready {
                Some(item) => Event::Incoming(item),
                None => tokio::select! {
                    biased;
                    _ = link.stop.cancelled() => Event::Stop,
                    item = link.socket.next() => Event::Incoming(item),
                    Some(out) = recv_queued(&mut rx) => Event::Queued(out),
                    _ = &mut sleep => Event::Heartbeat,
                },
            };
            match event {
                Event::Stop => {
                    break if shutdown.is_cancelled() {
                        Ending::server(
                            CloseReason::ServerShutdown,
                            close_code::GOING_AWAY,
                            "server shutting down",
                        )
                    } else {
                        link.error(ErrorType::SlowConsumer, "slow consumer disconnected");
                        Ending::server(
                            CloseReason::SlowConsumer,
                            close_code::POLICY_VIOLATION,
                            "slow consumer",
                        )
                    };
                }
                Event::Incoming(incoming) => {
                    let msg = match incoming {
                        Some(Ok(msg)) => msg,
                        Some(Err(err)) => break link.classify(err),
                        None => break Ending::peer_gone(CloseReason::ClientAborted),
                    };
                    let received_at = Instant::now();
                    let Some(msg) = link.received(msg) else {
                        continue;
                    };
                    #[cfg(feature = "fault-injection")]
                    inject_fault(&msg);
                    match msg {
                        Message::Text(_) | Message::Binary(_) => {
                            if membership.is_some() {
                                if !admission.as_ref().is_none_or(|a| a.may_publish) {
                                    link.error(
                                        ErrorType::PublishForbidden,
                                        "publish not allowed: closing with 1008",
                                    );
                                    break Ending::server(
                                        CloseReason::PublishForbidden,
                                        close_code::POLICY_VIOLATION,
                                        "publish not allowed",
                                    );
                                }
                                if let Some(a) = admission.as_mut()
                                    && a.publish.as_mut().is_some_and(|b| !b.take(received_at))
                                {
                                    // At once, before the client sees the Close and reconnects.
                                    a.sources.penalize(a.client, a.rate_limit_penalty);
                                    link.error(
                                        ErrorType::RateLimited,
                                        "publish rate exceeded: closing with 1008",
                                    );
                                    break Ending::server(
                                        CloseReason::RateLimited,
                                        close_code::POLICY_VIOLATION,
                                        "rate limit exceeded",
                                    );
                                }
                            }
                            let mut traced = spans.as_ref().filter(|m| m.sample());
                            let (kind, size) = kind_and_len(&msg);
                            let feed = membership.is_none() && batch.feeding();
                            let (handled, handling) = match &membership {
                                None if feed => (link.feed_data(msg).await, Handling::Echo),
                                None => (link.send_data(msg).await, Handling::Echo),
                                Some(m) => {
                                    // Local members first: they never wait for NATS.
                                    let d = m.broadcast(&msg);
                                    let handling = Handling::Broadcast {
                                        recipients: d.queued,
                                    };
                                    if let Some((bp, subject)) = m.backplane() {
                                        // A sampled message's span is recorded now, so its
                                        // PRODUCER child can travel in the NATS headers.
                                        let cx = match (traced.take(), link.span) {
                                            (Some(spans), Some(conn)) => {
                                                let start =
                                                    SystemTime::now() - received_at.elapsed();
                                                let message = spans.record(
                                                    start,
                                                    conn.span_context(),
                                                    id,
                                                    link.route.route(),
                                                    kind,
                                                    size,
                                                    handling,
                                                );
                                                Some(spans.producer(&message, subject, size))
                                            }
                                            _ => None,
                                        };
                                        bp.publish(subject, &msg, cx.as_ref());
                                    }
                                    (Ok(()), handling)
                                }
                            };
                            batch.unflushed |= feed;
                            link.route.message_handled(received_at);
                            if let (Some(spans), Some(conn)) = (traced, link.span) {
                                let start = SystemTime::now() - received_at.elapsed();
                                spans.record(
                                    start,
                                    conn.span_context(),
                                    id,
                                    link.route.route(),
                                    kind,
                                    size,
                                    handling,
                                );
                            }
                            if let Err(e) = handled {
                                break e;
                            }
                        }
                        Message::Pong(p) => {
                            if let Some(rtt) = link.heartbeat.pong(&p) {
                                link.events.ping_round_trip(rtt);
                                sleep.as_mut().reset(link.heartbeat.deadline().into());
                            }
                        }
                        Message::Close(frame) => {
                            // tungstenite has queued the reply; the next read flushes it (and any
                            // fed replies before it) and ends the stream.
                            link.route
                                .message(Direction::Transmit, MessageType::Close, 0);
                            let ending = link.client_closed(frame.as_ref());
                            // Boxed, like every rare await here: the connection future's size is
                            // its largest await's, paid by every idle connection.
                            let _ = Box::pin(tokio::time::timeout(
                                CLOSE_REPLY_TIMEOUT,
                                link.socket.next(),
                            ))
                            .await;
                            break ending;
                        }
                        Message::Ping(_) | Message::Frame(_) => {}
                    }
                }
                Event::Queued(out) => {
                    // Feed everything already queued for this member, then write it at once.
                    let mut next = Some(out);
                    let mut failed = None;
                    while let Some(msg) = next {
                        if let Err(e) = link.feed_data(msg).await {
                            failed = Some(e);
                            break;
                        }
                        next = rx.as_mut().and_then(|rx| rx.try_recv().ok());
                    }
                    if let Some(e) = failed {
                        break e;
                    }
                    if let Err(e) = link.flush().await {
                        break e;
                    }
                }
                Event::Heartbeat => {
                    let now = Instant::now();
                    if link.heartbeat.expired(now) {
                        break Ending::server(
                            CloseReason::TokenExpired,
                            close_code::POLICY_VIOLATION,
                            "token expired",
                        );
                    }
                    if link.heartbeat.pong_due().is_some_and(|due| now >= due) {
                        link.error(ErrorType::HeartbeatTimeout, "heartbeat timeout: no pong");
                        // The peer is presumed dead: no Close handshake to wait for.
                        break Ending::cut(CloseReason::HeartbeatTimeout);
                    }
                    if now < link.heartbeat.next_ping || link.heartbeat.outstanding.is_some() {
                        // Woken early (the deadline moved): wait for the real one.
                        sleep.as_mut().reset(link.heartbeat.deadline().into());
                        continue;
                    }
                    link.heartbeat.seq += 1;
                    let payload = link.heartbeat.seq.to_be_bytes();
                    link.heartbeat.outstanding = Some((link.heartbeat.seq, now));
                    sleep.as_mut().reset(link.heartbeat.deadline().into());
                    let ping = Message::Ping(payload.to_vec().into());
                    let bound = WriteBound {
                        timeout: link.write_timeout,
                        heartbeat: &link.heartbeat,
                    };
                    match Box::pin(write(&link.stop, bound, link.socket.send(ping))).await {
                        Written::Done(Ok(())) => link.route.message(
                            Direction::Transmit,
                            MessageType::Ping,
                            payload.len(),
                        ),
                        Written::Done(Err(err)) => break link.classify(err),
                        Written::Stopped => continue,
                        Written::TimedOut(reason) => break link.timed_out(reason),
                    }
                }
            }
        }
    })
    .catch_unwind()
    .await;
    let ending = match handled {
        Ok(ending) => ending,
        Err(panic) => {
            link.events.error(link.route.route(), ErrorType::Panic);
            // Not rate-limited: a panic is a bug to see every time.
            in_span(link.span, || {
                tracing::error!(
                    connection.id = id as i64,
                    panic = panic_message(&*panic),
                    "connection handler panicked: closing with 1011"
                )
            });
            Ending::server(
                CloseReason::InternalError,
                close_code::INTERNAL_ERROR,
                "internal error",
            )
        }
    };

    if let Some((code, text)) = ending.close {
        Box::pin(link.close(code, text)).await;
    }

    // Leave the room first, so nothing new is queued, then count what never went out.
    let room = membership.as_ref().map(|m| m.room_name().to_owned());
    drop(membership);
    if let Some(mut rx) = rx {
        rx.close();
        let mut undelivered = 0;
        while rx.try_recv().is_ok() {
            undelivered += 1;
        }
        events.dropped(
            link.route.route(),
            DropReason::ConnectionClosed,
            undelivered,
        );
    }
    let totals = link.totals;
    drop(link);

    let reason = ending.reason;
    let lifetime = guard.closed(reason, ending.initiator);
    if events.log_allowed(LogEvent::ConnectionClosed) {
        in_span(span.as_deref(), || {
            tracing::info!(
                connection.id = id as i64,
                http.route = route.as_str(),
                client.address = %client(&admission),
                network.peer.address = %peer.ip(),
                network.peer.port = peer.port(),
                user.id = subject(&admission),
                websocket.room = room.as_deref(),
                websocket.close.code = ending.code.map(i64::from),
                websocket.close.reason = reason.as_str(),
                websocket.close.initiator = ending.initiator.as_str(),
                duration_ms = lifetime.as_millis() as i64,
                messages_in = totals.messages_in as i64,
                messages_out = totals.messages_out as i64,
                bytes_in = totals.bytes_in as i64,
                bytes_out = totals.bytes_out as i64,
                "connection closed"
            )
        });
    }
    if let Some(span) = span.as_mut() {
        if span.is_recording() {
            if reason == CloseReason::InternalError && ending.initiator == CloseInitiator::Server {
                span.set_status(opentelemetry::trace::Status::error(reason.as_str()));
            }
            if let Some(code) = ending.code {
                span.set_attribute(KeyValue::new("websocket.close.code", i64::from(code)));
            }
            if let Some(subject) = subject(&admission) {
                span.set_attribute(KeyValue::new("user.id", subject));
            }
            span.set_attributes([
                KeyValue::new("client.address", client(&admission).to_string()),
                KeyValue::new("websocket.close.reason", reason.as_str()),
                KeyValue::new("websocket.close.initiator", ending.initiator.as_str()),
                KeyValue::new("websocket.messages.received", totals.messages_in as i64),
                KeyValue::new("websocket.messages.sent", totals.messages_out as i64),
                KeyValue::new("websocket.bytes.received", totals.bytes_in as i64),
                KeyValue::new("websocket.bytes.sent", totals.bytes_out as i64),
            ]);
        }
        span.end();
    }
    reason
}

#[cfg(all(feature = "fault-injection", not(debug_assertions)))]
compile_error!(
    "`fault-injection` lets any client panic a connection: it is for debug test builds only"
);

/// The text message that panics its connection's handler, with the test-only
/// `fault-injection` feature (a release build with it does not compile).
#[cfg(feature = "fault-injection")]
pub const PANIC_TRIGGER: &str = "wsotel-fault:panic";

#[cfg(feature = "fault-injection")]
fn inject_fault(msg: &Message) {
    if matches!(msg, Message::Text(t) if t.as_str() == PANIC_TRIGGER) {
        panic!("fault injected by a {PANIC_TRIGGER:?} message");
    }
}

/// What woke the connection loop.
enum Event {
    /// Server shutdown, or kicked as a slow consumer.
    Stop,
    /// A message (or the end of the stream, or an error) from the client.
    Incoming(Option<Result<Message, tungstenite::Error>>),
    /// A room message queued for this member.
    Queued(Message),
    /// Time to ping, or the pong is overdue.
    Heartbeat,
}

/// Adaptive write batching for echoes. Feeding a reply and flushing only when no more input is
/// ready saves a write per message when clients pipeline, but costs an extra (empty) read per
/// message when they do not; so echoes are fed only while recent probes found more input
/// waiting, and one echo in [`Batching::PROBE_EVERY`] probes again.
#[derive(Debug, Default)]
struct Batching {
    /// Replies were fed and not yet flushed.
    unflushed: bool,
    /// Feeding mode is on.
    on: bool,
    /// Consecutive probes that found nothing waiting.
    misses: u8,
    /// Echoes since the last probe, in direct mode.
    since_probe: u8,
}

impl Batching {
    /// How often direct mode probes for pipelining.
    const PROBE_EVERY: u8 = 32;
    /// Consecutive empty probes that turn feeding off.
    const MAX_MISSES: u8 = 4;

    /// Whether this echo is fed (and the loop then probes for more input) or sent directly.
    fn feeding(&mut self) -> bool {
        if self.on {
            return true;
        }
        self.since_probe += 1;
        if self.since_probe >= Self::PROBE_EVERY {
            self.since_probe = 0;
            return true;
        }
        false
    }

    fn hit(&mut self) {
        self.on = true;
        self.misses = 0;
    }

    fn miss(&mut self) {
        self.unflushed = false;
        self.misses = self.misses.saturating_add(1);
        if self.misses >= Self::MAX_MISSES {
            self.on = false;
        }
    }
}

/// The socket with what counts its traffic.
struct Link<'a> {
    socket: Socket,
    events: &'a Events,
    route: &'a RouteInstruments,
    totals: Totals,
    /// Close frames tungstenite has handed over (the wire's own count is in the socket's scan).
    closes_received: u32,
    /// The connection span, made current only to log.
    span: Option<&'a opentelemetry_sdk::trace::Span>,
    /// Cancelled on server shutdown, or to kick a slow consumer.
    stop: CancellationToken,
    heartbeat: Heartbeat,
    /// How long a write may stall.
    write_timeout: Duration,
}

impl Link<'_> {
    /// Counts a message that arrived. Pings are answered by tungstenite itself (it queues the
    /// pong and writes it on the next read or write), so the pong is counted here too.
    fn received(&mut self, msg: Message) -> Option<Message> {
        let (kind, len) = kind_and_len(&msg);
        self.route.message(Direction::Receive, kind, len);
        if kind == MessageType::Close {
            self.closes_received += 1;
        }
        if kind.is_data() {
            self.totals.messages_in += 1;
            self.totals.bytes_in += len as u64;
        }
        if kind == MessageType::Ping {
            self.route
                .message(Direction::Transmit, MessageType::Pong, len);
            return None;
        }
        Some(msg)
    }

    /// Sends a data message: hands it to the writer, where it counts as transmitted (like a fed
    /// one: a Close sent later goes out after it), then writes it out. When the connection is
    /// stopped while the writer has no room for it (a client that does not read), it is lost
    /// (counted as dropped) and the loop's stop branch decides the reason on its next turn.
    async fn send_data(&mut self, msg: Message) -> Result<(), Ending> {
        self.feed_data(msg).await?;
        self.flush().await
    }

    /// Like `send_data`, but leaves the frame in the socket's write buffer for a later
    /// [`Link::flush`] (tungstenite still writes once the buffer passes its size). Counted as
    /// transmitted when handed to the writer.
    async fn feed_data(&mut self, msg: Message) -> Result<(), Ending> {
        let (kind, len) = kind_and_len(&msg);
        let bound = WriteBound {
            timeout: self.write_timeout,
            heartbeat: &self.heartbeat,
        };
        let fed = write(&self.stop, bound, self.socket.feed(msg)).await;
        self.sent(fed, kind, len)
    }

    fn sent(
        &mut self,
        result: Written<Result<(), tungstenite::Error>>,
        kind: MessageType,
        len: usize,
    ) -> Result<(), Ending> {
        match result {
            Written::Done(Ok(())) => {
                self.route.message(Direction::Transmit, kind, len);
                self.totals.messages_out += 1;
                self.totals.bytes_out += len as u64;
                Ok(())
            }
            Written::Done(Err(err)) => Err(self.classify(err)),
            Written::Stopped => {
                self.events
                    .dropped(self.route.route(), DropReason::ConnectionClosed, 1);
                Ok(())
            }
            Written::TimedOut(reason) => {
                self.events
                    .dropped(self.route.route(), DropReason::ConnectionClosed, 1);
                Err(self.timed_out(reason))
            }
        }
    }

    /// Writes out whatever was fed.
    async fn flush(&mut self) -> Result<(), Ending> {
        let bound = WriteBound {
            timeout: self.write_timeout,
            heartbeat: &self.heartbeat,
        };
        match write(&self.stop, bound, self.socket.flush()).await {
            Written::Done(Err(err)) => Err(self.classify(err)),
            Written::Done(Ok(())) | Written::Stopped => Ok(()),
            Written::TimedOut(reason) => Err(self.timed_out(reason)),
        }
    }

    /// A write stalled past its bound: the connection is cut (the client is not reading, so a
    /// Close could not reach it either).
    fn timed_out(&self, reason: CloseReason) -> Ending {
        let (error, message) = if reason == CloseReason::HeartbeatTimeout {
            (ErrorType::HeartbeatTimeout, "heartbeat timeout: no pong")
        } else {
            (
                ErrorType::WriteTimeout,
                "write timeout: the client is not reading",
            )
        };
        self.error(error, message);
        Ending::cut(reason)
    }

    /// Counts an error on this connection and logs it (within the connection-error log budget).
    fn error(&self, error: ErrorType, message: &'static str) {
        self.events.error(self.route.route(), error);
        if self.events.log_allowed(LogEvent::ConnectionError) {
            in_span(
                self.span,
                || tracing::warn!(error.type = error.as_str(), "{message}"),
            );
        }
    }

    /// What the client's Close means. tungstenite answers a Close whose code a client may not
    /// send (1005, 999...) with 1002 and hands over that 1002: the scan of the wire knows the
    /// code the client really sent, so that is a protocol error the server found.
    fn client_closed(&mut self, frame: Option<&CloseFrame>) -> Ending {
        let delivered = frame.map(|f| u16::from(f.code));
        let sent = self.socket.get_ref().scan().last_close_code();
        match sent {
            Some(code) if Some(code) != delivered && !CloseCode::from(code).is_allowed() => {
                self.events.error(self.route.route(), ErrorType::Protocol);
                Ending {
                    reason: CloseReason::ProtocolError,
                    initiator: CloseInitiator::Server,
                    close: None,
                    code: delivered,
                }
            }
            _ => Ending::client_close(delivered),
        }
    }

    /// Sends a Close and finishes the closing handshake, within [`CLOSE_REPLY_TIMEOUT`]. While
    /// tungstenite still reads frames, what the client sends before its reply is read and
    /// counted as received. Once it has stopped (the read error the server is closing for), the
    /// rest is discarded frame by frame until the client's Close, which is counted, so the
    /// client's kernel never turns unread data into a reset that would hide the Close from it.
    async fn close(&mut self, code: u16, text: &'static str) {
        let deadline = tokio::time::Instant::now() + CLOSE_REPLY_TIMEOUT;
        let frame = CloseFrame {
            code: code.into(),
            reason: text.into(),
        };
        let sent =
            tokio::time::timeout_at(deadline, self.socket.send(Message::Close(Some(frame)))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        self.route
            .message(Direction::Transmit, MessageType::Close, 0);
        let closes = self.closes_received;
        let read = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(msg)) = self.socket.next().await {
                self.received(msg);
            }
        })
        .await;
        if read.is_err() || self.closes_received > closes {
            return;
        }
        let limit = self.socket.get_config().max_frame_size.unwrap_or(0) as u64 + DISCARD_SLACK;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let io = self.socket.get_mut();
        if discard_until_close(io, self.closes_received, limit, left).await == Discarded::Close {
            let replies = io.scan().closes() - self.closes_received;
            for _ in 0..replies {
                self.route
                    .message(Direction::Receive, MessageType::Close, 0);
            }
            self.closes_received += replies;
        }
    }

    fn classify(&self, err: tungstenite::Error) -> Ending {
        in_span(self.span, || classify_error(self.events, self.route, err))
    }
}

fn kind_and_len(msg: &Message) -> (MessageType, usize) {
    match msg {
        Message::Text(t) => (MessageType::Text, t.len()),
        Message::Binary(b) => (MessageType::Binary, b.len()),
        Message::Ping(p) => (MessageType::Ping, p.len()),
        Message::Pong(p) => (MessageType::Pong, p.len()),
        Message::Close(_) | Message::Frame(_) => (MessageType::Close, 0),
    }
}

/// How a write ended.
enum Written<T> {
    /// It completed (successfully or not).
    Done(T),
    /// The connection was stopped while it waited.
    Stopped,
    /// It stalled past its bound: `write_timeout`, or `heartbeat_timeout` when the pong came
    /// due first.
    TimedOut(CloseReason),
}

/// How long a write may wait for the socket: `--write-timeout`, or less when the heartbeat would
/// have ended the connection first (it keeps running while a write is pending): the outstanding
/// ping's pong deadline, or, with none outstanding, that of the next ping, which a stalled socket
/// cannot even send. Worked out only when a write has to wait.
#[derive(Clone, Copy)]
struct WriteBound<'h> {
    timeout: Duration,
    heartbeat: &'h Heartbeat,
}

impl WriteBound<'_> {
    /// The deadline of a write that starts waiting now, and why it would end there.
    fn deadline(&self) -> (Instant, CloseReason) {
        let hb = self.heartbeat;
        let pong_due = hb.pong_due().unwrap_or(hb.next_ping + hb.timeout);
        let stall_until = Instant::now() + self.timeout;
        if pong_due < stall_until {
            (pong_due, CloseReason::HeartbeatTimeout)
        } else {
            (stall_until, CloseReason::WriteTimeout)
        }
    }
}

/// Runs a write. Most complete at once: then no timer is armed and no stop future made. One
/// that must wait races the stop signal and its bound, in a boxed future of its own (the
/// connection future stays small for every idle connection).
async fn write<F: Future>(
    stop: &CancellationToken,
    bound: WriteBound<'_>,
    fut: F,
) -> Written<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Written::Done(out);
    }
    let (deadline, reason) = bound.deadline();
    Box::pin(async move {
        tokio::select! {
            biased;
            out = fut => Written::Done(out),
            _ = stop.cancelled() => Written::Stopped,
            _ = tokio::time::sleep_until(deadline.into()) => Written::TimedOut(reason),
        }
    })
    .await
}

async fn recv_queued(rx: &mut Option<mpsc::Receiver<Message>>) -> Option<Message> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Maps a socket error to a close reason, counts it, and says which Close to send.
fn classify_error(events: &Events, route: &RouteInstruments, err: tungstenite::Error) -> Ending {
    use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
    match &err {
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            Ending::peer_gone(CloseReason::Normal)
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Ending::peer_gone(CloseReason::ClientAborted)
        }
        WsError::Io(e) => match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => Ending::peer_gone(CloseReason::ClientAborted),
            _ => {
                events.error(route.route(), ErrorType::Io);
                if events.log_allowed(LogEvent::ConnectionError) {
                    tracing::warn!(error = %e, "connection I/O error");
                }
                Ending::cut(CloseReason::InternalError)
            }
        },
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            events.error(route.route(), ErrorType::MessageTooBig);
            Ending::server(
                CloseReason::MessageTooBig,
                close_code::MESSAGE_TOO_BIG,
                "message too big",
            )
        }
        WsError::Utf8(_) => {
            events.error(route.route(), ErrorType::InvalidUtf8);
            Ending::server(
                CloseReason::InvalidPayload,
                close_code::INVALID_PAYLOAD,
                "invalid utf-8",
            )
        }
        WsError::Protocol(_) | WsError::Capacity(_) => {
            events.error(route.route(), ErrorType::Protocol);
            if events.log_allowed(LogEvent::ConnectionError) {
                tracing::info!(error = %err, "protocol error");
            }
            Ending::server(
                CloseReason::ProtocolError,
                close_code::PROTOCOL_ERROR,
                "protocol error",
            )
        }
        other => {
            events.error(route.route(), ErrorType::Io);
            if events.log_allowed(LogEvent::ConnectionError) {
                tracing::warn!(error = %other, "connection error");
            }
            Ending::server(
                CloseReason::InternalError,
                close_code::INTERNAL_ERROR,
                "internal error",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every idle connection pays for its future's size: this holds the line (measured in the
    /// test build; the release build's is smaller). BENCHMARKS.md's idle memory per connection
    /// is the number that matters; this catches a regression before a benchmark has to.
    #[test]
    fn the_connection_future_stays_small() {
        fn size<F: std::future::Future>(
            _f: impl Fn(Box<super::Socket>, Box<super::ConnectionContext>) -> F,
        ) -> usize {
            std::mem::size_of::<F>()
        }
        let bytes = size(super::serve);
        assert!(
            bytes <= 2048,
            "the connection future grew to {bytes} bytes: box what is rare (see Admission)"
        );
    }
}
