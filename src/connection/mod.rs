//! [`WebSocket`]: one upgraded connection, measured as it is used.
//!
//! The application reads data messages with [`WebSocket::recv`] and writes with
//! [`WebSocket::send`] (or [`WebSocket::feed`] and [`WebSocket::flush`]); everything else is
//! done here: every message counted as it crosses the socket, pings answered, the heartbeat,
//! write deadlines, the closing handshake (with the right RFC 6455 code for each failure), and
//! at the end the connection's lifetime, close reason, closing log line and span. The
//! connection owns its socket (no split, no lock) and runs on the application's task.

mod batching;
mod ending;
mod heartbeat;
mod stop;
mod write;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, SinkExt, StreamExt};
use opentelemetry::trace::{Span as _, SpanContext};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::layer::GateSlot;
use crate::sources::OpenSlot;
use crate::telemetry::traces::Handling;
use crate::telemetry::{
    CloseReason, ConnectionGuard, Direction, DropReason, ErrorType, Events, Identity, MessageType,
    Route, RouteInstruments, Spans, Totals,
};
use crate::wire::Watched;
use crate::wire::{Discarded, discard_until_close};
use batching::Batching;
pub use ending::close_code;
use ending::{Ending, classify, error_of};
use futures_util::future::Either;
use heartbeat::{Beat, Heartbeat};
use stop::{STANDING_AFTER, StopWait, poll_stop};
use write::{WriteBound, Written, write};

/// How long the server waits for the client's reply to a Close it sent.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// After a read error, what the client still sends is discarded until its Close: at most the
/// rest of a frame at the size limit and this much more. A client sending more than that is
/// cut off without the rest of the handshake.
const DISCARD_SLACK: u64 = 16 * 1024;

/// An upgraded connection's socket: tungstenite over the watched TCP stream (see
/// [`crate::wire`]).
pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<Watched<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>;

/// The connection's span (when traces are exported), a child of the upgrade request's span:
/// an OpenTelemetry span the connection holds for its life, ended with the close code, reason
/// and totals. Boxed: an idle connection without traces pays one pointer for it.
pub(crate) type ConnectionSpan = Option<Box<opentelemetry_sdk::trace::Span>>;

/// The connection has ended: nothing more can be sent. [`WebSocket::recv`] returns `None`
/// once the closing handshake is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the WebSocket connection is closed")]
pub struct ConnectionClosed;

/// A handle that closes a connection from elsewhere (another task, a room that finds the
/// member too slow). Cheap to clone; the first reason given wins.
#[derive(Clone, Debug)]
pub struct Closer {
    token: CancellationToken,
    reason: Arc<OnceLock<CloseReason>>,
}

impl Closer {
    /// Closes the connection for `reason`: its next [`WebSocket::recv`] (or a write waiting
    /// on the socket) sees it, counts it, sends the Close frame for `reason` and finishes the
    /// closing handshake.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Whether the connection has been told to close.
    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// Why a connection has been told to stop, if it has: the server's shutdown (one atomic
/// load), or its [`Closer`]'s reason. Both are set before the stop token is cancelled.
fn stop_reason(slot: &GateSlot, closer: &Option<Box<Closer>>) -> Option<CloseReason> {
    if slot.stopping() {
        return Some(CloseReason::ServerShutdown);
    }
    closer.as_ref().and_then(|c| c.reason.get().copied())
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// The client sent Close: tungstenite has queued the reply, still to be written.
    ReplyingToClient {
        until: Instant,
    },
    /// The server closes: its Close frame (not yet handed to the socket while `sent` is
    /// false), then the client's reply.
    Closing {
        code: u16,
        text: &'static str,
        sent: bool,
        until: Instant,
    },
    Closed,
}

/// The data message being handled: from [`WebSocket::recv`] returning it to the next call.
#[derive(Debug, Clone, Copy)]
struct Handled {
    received_at: std::time::Instant,
    kind: MessageType,
    size: usize,
    /// It gets a message span (sampled, and not recorded yet).
    traced: bool,
    recipients: Option<usize>,
}

/// What woke [`WebSocket::recv`].
enum Event {
    /// Server shutdown, or a [`Closer`].
    Stop,
    /// A message (or the end of the stream, or an error) from the client.
    Incoming(Option<Result<Message, tungstenite::Error>>),
    /// Time to ping, or the pong is overdue, or the token expired.
    Heartbeat,
    /// Writing what was fed failed.
    Ended(Ending),
}

/// One upgraded WebSocket connection, measured: see the [crate documentation](crate) for the
/// metrics, spans and logs it records.
///
/// Read data messages with [`recv`](WebSocket::recv) until it returns `None`; write with
/// [`send`](WebSocket::send). Pings, pongs and Close frames never reach the application:
/// they are answered and counted here. Dropping the socket closes the connection (with a
/// best-effort Close 1000, or 1011 when dropped by a panic) and records it; to close with a
/// specific reason and wait for the client's reply, use [`close`](WebSocket::close).
///
/// `recv` must be polled for the heartbeat, the server's shutdown and [`Closer`]s to take
/// effect (as with any WebSocket, control frames are only processed while reading).
pub struct WebSocket {
    /// Boxed: the handler's future holds the socket, and an `async fn` taking it keeps the
    /// argument's slot beside the local it is moved to; a pointer is what is paid twice.
    conn: Box<Connection>,
}

/// The connection behind a [`WebSocket`].
struct Connection {
    socket: Socket,
    /// Keeps the connection in `active_connections`; records its lifetime.
    guard: ConnectionGuard,
    who: Identity,
    span: ConnectionSpan,
    spans: Option<Arc<Spans>>,
    /// `websocket.operation` on message spans.
    operation: Option<&'static str>,
    /// Cancelled when the server shuts down.
    shutdown: CancellationToken,
    /// Made on first use of [`WebSocket::closer`]: a child of `shutdown`.
    closer: Option<Box<Closer>>,
    /// The standing registration that wakes the task when the stop token is cancelled, once
    /// the connection is busy (module `stop`).
    stop_wait: Option<Box<StopWait>>,
    heartbeat: Heartbeat,
    /// Fires at the heartbeat's deadline.
    timer: Pin<Box<Sleep>>,
    /// How long a write may stall.
    write_timeout: Duration,
    totals: Totals,
    /// Close frames tungstenite has handed over (the wire's own count is in the socket's scan).
    closes_received: u32,
    batching: Batching,
    handled: Option<Handled>,
    phase: Phase,
    /// How the connection ended, once it has.
    ending: Option<Ending>,
    /// Released when the connection is dropped (after its end is recorded), wherever the
    /// application moved its `WebSocket`: the limits count connections, not handler tasks.
    slot: GateSlot,
    /// Held for its drop: the connection's place in its client address's count.
    _source: Option<OpenSlot>,
}

/// What the upgrade hands a new connection.
pub(crate) struct Setup {
    pub(crate) events: Events,
    pub(crate) instruments: Arc<RouteInstruments>,
    pub(crate) who: Identity,
    pub(crate) span: ConnectionSpan,
    pub(crate) spans: Option<Arc<Spans>>,
    pub(crate) operation: Option<&'static str>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) expires_at: Option<Instant>,
    /// The connection's place under the connection limit (and the shutdown flag).
    pub(crate) slot: GateSlot,
    /// Its place in its client address's count.
    pub(crate) source: Option<OpenSlot>,
}

impl WebSocket {
    pub(crate) fn new(socket: Socket, setup: Setup) -> Self {
        WebSocket {
            conn: Box::new(Connection::new(socket, setup)),
        }
    }

    /// The connection's id: unique in this process, on its span and log lines.
    pub fn id(&self) -> u64 {
        self.conn.id()
    }

    /// The route it came in on (`http.route`).
    pub fn route(&self) -> Route {
        self.conn.route()
    }

    /// The TCP peer.
    pub fn peer_addr(&self) -> SocketAddr {
        self.conn.peer_addr()
    }

    /// The client's address: what a trusted proxy forwarded, else the TCP peer's.
    pub fn client_addr(&self) -> IpAddr {
        self.conn.client_addr()
    }

    /// The connection's span context, when traces are exported.
    pub fn span_context(&self) -> Option<&SpanContext> {
        self.conn.span_context()
    }

    /// A handle that closes this connection from elsewhere.
    pub fn closer(&mut self) -> Closer {
        self.conn.closer()
    }

    /// Waits for the next data message (text or binary) and returns it; `None` once the
    /// connection has ended and its closing handshake is over.
    ///
    /// While it waits it answers pings, sends the heartbeat's, writes what was
    /// [`fed`](WebSocket::feed) (before waiting, never while input is ready), and ends the
    /// connection on the client's Close, a protocol error (with the Close code RFC 6455 asks
    /// for), a missed pong, the token's expiry, the server's shutdown (1001) or a [`Closer`].
    /// Calling it also ends the handling of the message it returned before (its
    /// `websocket.server.message.duration` and message span).
    ///
    /// Cancel safe: dropped before it completes (in a `select!`), it loses no message, and the
    /// next call picks up where it was (a closing handshake included).
    pub async fn recv(&mut self) -> Option<Message> {
        self.conn.recv().await
    }

    /// A data message the client already sent, if one is waiting: never waits. `None` when
    /// none is ready, or the connection has ended (then [`WebSocket::recv`] finishes it).
    pub fn try_recv(&mut self) -> Option<Message> {
        self.conn.try_recv()
    }

    /// Sends a data message and writes it out. It counts as sent once handed to the socket
    /// (a Close sent later goes out after it). When the connection is closed while the
    /// socket has no room for it (a client that does not read), it is counted as dropped.
    ///
    /// A write that makes no progress for `write_timeout` (or until the heartbeat would have
    /// given up) ends the connection: a client that stops reading cannot hold the server's
    /// memory.
    pub async fn send(&mut self, msg: Message) -> Result<(), ConnectionClosed> {
        self.conn.send(msg).await
    }

    /// Like [`send`](WebSocket::send), but leaves the frame in the socket's write buffer for a
    /// later [`flush`](WebSocket::flush) (or the next [`recv`](WebSocket::recv) that would
    /// wait): many messages, one write. The buffer is written anyway once it passes its size.
    pub async fn feed(&mut self, msg: Message) -> Result<(), ConnectionClosed> {
        self.conn.feed(msg).await
    }

    /// Writes out whatever was fed.
    pub async fn flush(&mut self) -> Result<(), ConnectionClosed> {
        self.conn.flush().await
    }

    /// Adaptive batching for handlers that answer each message: whether to
    /// [`feed`](WebSocket::feed) this reply (true while the client pipelines: recent reads
    /// found its next message already waiting, and one reply in 32 to find out) or
    /// [`send`](WebSocket::send) it at once. Fed replies are written by the next `recv` before
    /// it waits, so a handler that goes straight back to `recv` never leaves one behind.
    pub fn should_feed(&mut self) -> bool {
        self.conn.should_feed()
    }

    /// Closes the connection for `reason`: counts it (a slow consumer, rate limit or publish
    /// refusal is also an `errors` entry with its log line), sends the Close frame for it
    /// (1000 for `Normal`, 1008 for policy reasons, ...) and waits for the client's reply, at
    /// most two seconds. Then [`recv`](WebSocket::recv) returns `None` and writes fail.
    pub async fn close(&mut self, reason: CloseReason) {
        self.conn.close(reason).await
    }

    /// How many the message being handled (the last one [`recv`](WebSocket::recv) returned)
    /// was delivered or queued to: `websocket.recipients` on its span. Call it before
    /// [`message_span`](WebSocket::message_span), which records the span.
    pub fn delivered_to(&mut self, recipients: usize) {
        self.conn.delivered_to(recipients)
    }

    /// For handing the message being handled on to another system with its trace: when it is
    /// sampled, records its span now (what was handled so far) and returns its context, to
    /// parent a `PRODUCER` span on. `None` when it is not sampled.
    pub fn message_span(&mut self) -> Option<SpanContext> {
        self.conn.message_span()
    }

    /// `count` messages meant for this connection will never be sent, for `reason`
    /// (`websocket.server.dropped_messages`): what was still queued for it when it closed
    /// (`ConnectionClosed`), or what it fell too far behind to get (`SlowConsumer`).
    pub fn dropped(&self, reason: DropReason, count: u64) {
        self.conn.dropped(reason, count)
    }
}

impl Connection {
    /// Counts the connection open (`accepted_connections`, `active_connections`) and logs it.
    pub(crate) fn new(socket: Socket, setup: Setup) -> Self {
        let Setup {
            events,
            instruments,
            who,
            span,
            spans,
            operation,
            shutdown,
            ping_interval,
            pong_timeout,
            write_timeout,
            expires_at,
            slot,
            source,
        } = setup;
        let guard = events.connection_opened(instruments);
        events.connection_logged_open(&who, span.as_deref().map(|s| s.span_context()));
        let heartbeat = Heartbeat::new(ping_interval, pong_timeout, expires_at);
        let timer = Box::pin(tokio::time::sleep_until(heartbeat.deadline()));
        Connection {
            socket,
            guard,
            who,
            span,
            spans,
            operation,
            shutdown,
            closer: None,
            stop_wait: None,
            heartbeat,
            timer,
            write_timeout,
            totals: Totals::default(),
            closes_received: 0,
            batching: Batching::default(),
            handled: None,
            phase: Phase::Open,
            ending: None,
            slot,
            _source: source,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.who.id
    }

    pub(crate) fn route(&self) -> Route {
        self.who.route
    }

    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.who.peer
    }

    pub(crate) fn client_addr(&self) -> IpAddr {
        self.who.client()
    }

    pub(crate) fn span_context(&self) -> Option<&SpanContext> {
        self.span.as_deref().map(|s| s.span_context())
    }

    pub(crate) fn closer(&mut self) -> Closer {
        if self.closer.is_none() {
            // The stop token becomes the closer's: wait on that one from now on.
            self.stop_wait = None;
        }
        let shutdown = &self.shutdown;
        (**self.closer.get_or_insert_with(|| {
            Box::new(Closer {
                token: shutdown.child_token(),
                reason: Arc::default(),
            })
        }))
        .clone()
    }

    pub(crate) async fn recv(&mut self) -> Option<Message> {
        self.end_handling();
        loop {
            match self.phase {
                Phase::Open => {}
                Phase::Closed => return None,
                _ => {
                    Box::pin(self.finish_closing()).await;
                    return None;
                }
            }
            let event = self.next_event().await;
            match event {
                Event::Incoming(Some(Ok(msg))) => {
                    if let Some(msg) = self.received(msg) {
                        return Some(msg);
                    }
                }
                Event::Incoming(Some(Err(err))) => {
                    let ending = self.classify(&err);
                    self.end(ending);
                }
                Event::Incoming(None) => self.end(Ending::client_gone(CloseReason::ClientAborted)),
                Event::Stop => {
                    let reason = self.stop_requested().unwrap_or(CloseReason::Normal);
                    self.close_for(reason);
                }
                // Boxed: rare, and the future of every connection is as large as its largest await.
                Event::Heartbeat => Box::pin(self.beat()).await,
                Event::Ended(ending) => self.end(ending),
            }
        }
    }

    pub(crate) fn try_recv(&mut self) -> Option<Message> {
        if self.phase != Phase::Open {
            return None;
        }
        self.end_handling();
        loop {
            let item = self.socket.next().now_or_never()?;
            match item {
                Some(Ok(msg)) => {
                    if let Some(msg) = self.received(msg) {
                        return Some(msg);
                    }
                    if self.phase != Phase::Open {
                        return None;
                    }
                }
                Some(Err(err)) => {
                    let ending = self.classify(&err);
                    self.end(ending);
                    return None;
                }
                None => {
                    self.end(Ending::client_gone(CloseReason::ClientAborted));
                    return None;
                }
            }
        }
    }

    pub(crate) async fn send(&mut self, msg: Message) -> Result<(), ConnectionClosed> {
        self.feed(msg).await?;
        self.flush().await
    }

    pub(crate) async fn feed(&mut self, msg: Message) -> Result<(), ConnectionClosed> {
        if self.phase == Phase::Open
            && let Some(reason) = self.stop_requested()
        {
            self.close_for(reason);
        }
        if self.phase != Phase::Open {
            self.dropped(DropReason::ConnectionClosed, 1);
            return Err(ConnectionClosed);
        }
        if let Message::Close(frame) = &msg {
            // A Close is the server closing: the closing handshake is `recv`'s (or Drop's).
            let code = frame
                .as_ref()
                .map_or(close_code::NORMAL, |f| u16::from(f.code));
            self.end(Ending::server_closes_with_code(code));
            return Ok(());
        }
        let (kind, len) = kind_and_len(&msg);
        let stop = self.closer.as_ref().map_or(&self.shutdown, |c| &c.token);
        let bound = WriteBound {
            timeout: self.write_timeout,
            heartbeat: &self.heartbeat,
        };
        match write(stop, bound, self.socket.feed(msg)).await {
            Written::Done(Ok(())) => {
                self.guard
                    .instruments()
                    .message(Direction::Transmit, kind, len);
                if kind.is_data() {
                    self.totals.messages_sent += 1;
                    self.totals.bytes_sent += len as u64;
                }
                self.batching.unflushed = true;
                Ok(())
            }
            Written::Done(Err(err)) => {
                let ending = self.classify(&err);
                self.end(ending);
                Err(ConnectionClosed)
            }
            Written::Stopped => {
                // Closed while the socket had no room for it: lost.
                self.dropped(DropReason::ConnectionClosed, 1);
                if let Some(reason) = self.stop_requested() {
                    self.close_for(reason);
                }
                Err(ConnectionClosed)
            }
            Written::TimedOut(reason) => {
                self.dropped(DropReason::ConnectionClosed, 1);
                self.timed_out(reason);
                Err(ConnectionClosed)
            }
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ConnectionClosed> {
        if self.phase == Phase::Open
            && let Some(reason) = self.stop_requested()
        {
            self.close_for(reason);
        }
        if self.phase != Phase::Open {
            return Err(ConnectionClosed);
        }
        let stop = self.closer.as_ref().map_or(&self.shutdown, |c| &c.token);
        let bound = WriteBound {
            timeout: self.write_timeout,
            heartbeat: &self.heartbeat,
        };
        match write(stop, bound, self.socket.flush()).await {
            Written::Done(Ok(())) => {
                // Only now: a flush abandoned half way (a cancelled `recv`) is tried again.
                self.batching.unflushed = false;
                Ok(())
            }
            Written::Stopped => {
                if let Some(reason) = self.stop_requested() {
                    self.close_for(reason);
                }
                Err(ConnectionClosed)
            }
            Written::Done(Err(err)) => {
                let ending = self.classify(&err);
                self.end(ending);
                Err(ConnectionClosed)
            }
            Written::TimedOut(reason) => {
                self.timed_out(reason);
                Err(ConnectionClosed)
            }
        }
    }

    /// Why the connection has been told to stop, if it has: the server's shutdown (one
    /// atomic load), or a [`Closer`]'s reason.
    fn stop_requested(&self) -> Option<CloseReason> {
        stop_reason(&self.slot, &self.closer)
    }

    pub(crate) fn should_feed(&mut self) -> bool {
        self.batching.feeding()
    }

    pub(crate) async fn close(&mut self, reason: CloseReason) {
        self.end_handling();
        if self.phase == Phase::Open {
            self.close_for(reason);
        }
        Box::pin(self.finish_closing()).await;
    }

    pub(crate) fn delivered_to(&mut self, recipients: usize) {
        if let Some(h) = self.handled.as_mut() {
            h.recipients = Some(recipients);
        }
    }

    pub(crate) fn message_span(&mut self) -> Option<SpanContext> {
        let h = self.handled.as_mut().filter(|h| h.traced)?;
        h.traced = false;
        let h = *h;
        self.record_message_span(&h)
    }

    pub(crate) fn dropped(&self, reason: DropReason, count: u64) {
        self.guard.events().dropped(self.who.route, reason, count);
    }

    /// Waits for what happens next. With replies fed and not written, input already waiting is
    /// read first (many replies, one write); with none waiting, they are written before the
    /// wait.
    async fn next_event(&mut self) -> Event {
        if self.batching.unflushed {
            match self.socket.next().now_or_never() {
                Some(item) => {
                    self.batching.hit();
                    return Event::Incoming(item);
                }
                None => {
                    self.batching.miss();
                    if self.flush().await.is_err() {
                        let ending = self.ending.expect("a failed flush ends the connection");
                        return Event::Ended(ending);
                    }
                }
            }
        }
        let (slot, closer) = (&self.slot, &self.closer);
        let stop = closer.as_ref().map_or(&self.shutdown, |c| &c.token);
        let busy = self.totals.messages_received + self.totals.messages_sent >= STANDING_AFTER;
        let stopped = if busy {
            let wait = &mut self.stop_wait;
            // Read at every poll: a stop requested while the task waits is what wakes it.
            Either::Left(std::future::poll_fn(move |cx| {
                poll_stop(wait, stop, stop_reason(slot, closer).is_some(), cx)
            }))
        } else {
            Either::Right(stop.cancelled())
        };
        tokio::select! {
            biased;
            _ = stopped => Event::Stop,
            item = self.socket.next() => Event::Incoming(item),
            _ = &mut self.timer => Event::Heartbeat,
        }
    }

    /// Counts a message that arrived; returns it when it is data. Pings are answered by
    /// tungstenite itself (it queues the pong and writes it on the next read or write), so the
    /// pong is counted here too; a pong may answer the heartbeat; a Close ends the connection.
    fn received(&mut self, msg: Message) -> Option<Message> {
        let (kind, len) = kind_and_len(&msg);
        let route = self.guard.instruments();
        route.message(Direction::Receive, kind, len);
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                self.totals.messages_received += 1;
                self.totals.bytes_received += len as u64;
                let traced = self.span.is_some() && self.spans.as_ref().is_some_and(|s| s.sample());
                self.handled = Some(Handled {
                    received_at: std::time::Instant::now(),
                    kind,
                    size: len,
                    traced,
                    recipients: None,
                });
                Some(msg)
            }
            Message::Ping(_) => {
                route.message(Direction::Transmit, MessageType::Pong, len);
                None
            }
            Message::Pong(payload) => {
                if let Some(rtt) = self.heartbeat.pong(&payload) {
                    self.guard.events().ping_round_trip(rtt);
                    self.timer.as_mut().reset(self.heartbeat.deadline());
                }
                None
            }
            Message::Close(frame) => {
                self.closes_received += 1;
                // tungstenite has queued the reply; the next read writes it (and anything fed
                // before it) and ends the stream.
                route.message(Direction::Transmit, MessageType::Close, 0);
                let ending = self.client_closed(frame.as_ref());
                self.end(ending);
                None
            }
            Message::Frame(_) => None,
        }
    }

    /// The heartbeat's timer fired.
    async fn beat(&mut self) {
        let now = Instant::now();
        let payload = match self.heartbeat.fire(now) {
            Beat::Expired => return self.close_for(CloseReason::TokenExpired),
            Beat::PongOverdue => {
                self.error(ErrorType::HeartbeatTimeout, None);
                // The peer is presumed dead: no closing handshake to wait for.
                return self.end(Ending::server_cut(CloseReason::HeartbeatTimeout));
            }
            Beat::NotYet => {
                self.timer.as_mut().reset(self.heartbeat.deadline());
                return;
            }
            Beat::Ping(payload) => payload,
        };
        self.timer.as_mut().reset(self.heartbeat.deadline());
        let stop = self.closer.as_ref().map_or(&self.shutdown, |c| &c.token);
        let bound = WriteBound {
            timeout: self.write_timeout,
            heartbeat: &self.heartbeat,
        };
        let ping = Message::Ping(payload.to_vec().into());
        // Fed, counted, then written: a `recv` cancelled during the write has still sent (and
        // counted) the ping, and the next write or `recv` finishes it. Boxed, like every rare
        // await here: the connection's future is as large as its largest await.
        match Box::pin(write(stop, bound, self.socket.feed(ping))).await {
            Written::Done(Ok(())) => {
                self.guard.instruments().message(
                    Direction::Transmit,
                    MessageType::Ping,
                    payload.len(),
                );
                self.batching.unflushed = true;
                let _ = Box::pin(self.flush()).await;
            }
            Written::Done(Err(err)) => {
                let ending = self.classify(&err);
                self.end(ending);
            }
            Written::Stopped => {}
            Written::TimedOut(reason) => self.timed_out(reason),
        }
    }

    /// The server closes for `reason`, counting it as an error when it is one.
    fn close_for(&mut self, reason: CloseReason) {
        if let Some(kind) = error_of(reason) {
            self.error(kind, None);
        }
        self.end(Ending::server_closes(reason));
    }

    /// A write stalled past its bound: the connection is cut (the client is not reading, so a
    /// Close could not reach it either).
    fn timed_out(&mut self, reason: CloseReason) {
        let kind = if reason == CloseReason::HeartbeatTimeout {
            ErrorType::HeartbeatTimeout
        } else {
            ErrorType::WriteTimeout
        };
        self.error(kind, None);
        self.end(Ending::server_cut(reason));
    }

    /// Counts and logs an error on this connection.
    fn error(&self, kind: ErrorType, detail: Option<&dyn std::fmt::Display>) {
        self.guard
            .events()
            .connection_error(self.who.route, kind, detail, self.span_context());
    }

    /// What a socket error means; counted and logged when it is an error.
    fn classify(&self, err: &tungstenite::Error) -> Ending {
        let (ending, kind) = classify(err);
        if let Some(kind) = kind {
            self.error(kind, Some(err));
        }
        ending
    }

    /// What the client's Close means. tungstenite answers a Close whose code a client may not
    /// send (1005, 999...) with 1002 and hands over that 1002: the scan of the wire knows the
    /// code the client really sent, so that is a protocol error the server found.
    fn client_closed(&self, frame: Option<&CloseFrame>) -> Ending {
        let delivered = frame.map(|f| u16::from(f.code));
        match self.socket.get_ref().scan().last_close_code() {
            Some(code) if Some(code) != delivered && !CloseCode::from(code).is_allowed() => {
                self.guard
                    .events()
                    .error(self.who.route, ErrorType::Protocol);
                let mut ending = Ending::server_cut(CloseReason::ProtocolError);
                ending.closed.code = delivered;
                ending
            }
            _ => Ending::client_closed(delivered),
        }
    }

    /// The connection ends (the first ending wins); the closing handshake, if any, follows.
    fn end(&mut self, ending: Ending) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(ending);
        let until = Instant::now() + CLOSE_REPLY_TIMEOUT;
        self.phase = match ending.close {
            Some((code, text)) => Phase::Closing {
                code,
                text,
                sent: false,
                until,
            },
            // The client's Close is in: tungstenite has queued the reply.
            None if self.closes_received > 0 => Phase::ReplyingToClient { until },
            None => Phase::Closed,
        };
    }

    /// Finishes the closing handshake, within [`CLOSE_REPLY_TIMEOUT`] of its start.
    ///
    /// Replying to a client's Close: the next read writes the queued reply and ends the stream.
    /// Closing: the Close frame is sent; while tungstenite still reads frames, what the client
    /// sends before its reply is read and counted as received. Once it has stopped (the read
    /// error the server is closing for), the rest is discarded frame by frame until the
    /// client's Close, which is counted, so the client's kernel never turns unread data into a
    /// reset that would hide the Close from it.
    async fn finish_closing(&mut self) {
        match self.phase {
            Phase::ReplyingToClient { until } => {
                let _ = tokio::time::timeout_at(until, self.socket.next()).await;
            }
            Phase::Closing {
                code,
                text,
                sent,
                until,
            } => {
                if !sent {
                    let frame = CloseFrame {
                        code: code.into(),
                        reason: text.into(),
                    };
                    let fed = tokio::time::timeout_at(
                        until,
                        self.socket.feed(Message::Close(Some(frame))),
                    )
                    .await;
                    if !matches!(fed, Ok(Ok(()))) {
                        self.phase = Phase::Closed;
                        return;
                    }
                    self.phase = Phase::Closing {
                        code,
                        text,
                        sent: true,
                        until,
                    };
                    self.guard
                        .instruments()
                        .message(Direction::Transmit, MessageType::Close, 0);
                }
                self.await_close_reply(until).await;
            }
            Phase::Open | Phase::Closed => {}
        }
        self.phase = Phase::Closed;
    }

    /// After the server's Close: writes it, then reads until the client's reply (or `until`).
    async fn await_close_reply(&mut self, until: Instant) {
        if !matches!(
            tokio::time::timeout_at(until, self.socket.flush()).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let closes = self.closes_received;
        let read = tokio::time::timeout_at(until, async {
            while let Some(Ok(msg)) = self.socket.next().await {
                let (kind, len) = kind_and_len(&msg);
                self.guard
                    .instruments()
                    .message(Direction::Receive, kind, len);
                if kind == MessageType::Close {
                    self.closes_received += 1;
                } else if kind == MessageType::Ping {
                    self.guard
                        .instruments()
                        .message(Direction::Transmit, MessageType::Pong, len);
                } else if kind.is_data() {
                    self.totals.messages_received += 1;
                    self.totals.bytes_received += len as u64;
                }
            }
        })
        .await;
        if read.is_err() || self.closes_received > closes {
            return;
        }
        let limit = self.socket.get_config().max_frame_size.unwrap_or(0) as u64 + DISCARD_SLACK;
        let left = until.saturating_duration_since(Instant::now());
        let io = self.socket.get_mut();
        if discard_until_close(io, self.closes_received, limit, left).await == Discarded::Close {
            let replies = io.scan().closes() - self.closes_received;
            for _ in 0..replies {
                self.guard
                    .instruments()
                    .message(Direction::Receive, MessageType::Close, 0);
            }
            self.closes_received += replies;
        }
    }

    /// The message [`recv`](WebSocket::recv) returned last has been handled: its duration,
    /// and its span when sampled.
    fn end_handling(&mut self) {
        let Some(h) = self.handled.take() else {
            return;
        };
        self.guard.instruments().message_handled(h.received_at);
        if h.traced {
            self.record_message_span(&h);
        }
    }

    fn record_message_span(&self, h: &Handled) -> Option<SpanContext> {
        let (spans, conn) = (self.spans.as_ref()?, self.span.as_deref()?);
        let end = SystemTime::now();
        Some(spans.record(
            end - h.received_at.elapsed(),
            end,
            conn.span_context(),
            self.who.id,
            self.who.route,
            h.kind,
            h.size,
            Handling {
                operation: self.operation,
                recipients: h.recipients,
            },
        ))
    }
}

impl Drop for Connection {
    /// Records the connection's end. A socket dropped while open (the handler returned, or
    /// panicked) is closed here with 1000 (1011 for a panic), best effort: the Close frame is
    /// written if the socket takes it at once, and no reply is awaited.
    fn drop(&mut self) {
        self.end_handling();
        let panicking = std::thread::panicking();
        if panicking {
            let span = self.span_context().cloned();
            PANICKED.with(|p| *p.borrow_mut() = span);
        }
        if self.phase == Phase::Open {
            let reason = if panicking {
                CloseReason::InternalError
            } else {
                CloseReason::Normal
            };
            self.end(Ending::server_closes(reason));
        }
        if let Phase::ReplyingToClient { .. } = self.phase {
            // The reply to the client's Close is queued (and counted): write it if it goes.
            let _ = self.socket.flush().now_or_never();
        }
        if let Phase::Closing {
            code,
            text,
            sent: false,
            ..
        } = self.phase
        {
            let frame = CloseFrame {
                code: code.into(),
                reason: text.into(),
            };
            let close = Message::Close(Some(frame));
            if let Some(Ok(())) = self.socket.send(close).now_or_never() {
                self.guard
                    .instruments()
                    .message(Direction::Transmit, MessageType::Close, 0);
            }
        }
        self.phase = Phase::Closed;
        let ending = self
            .ending
            .unwrap_or_else(|| Ending::client_gone(CloseReason::ClientAborted));
        self.guard.events().clone().connection_closed(
            &mut self.guard,
            &self.who,
            ending.closed,
            self.totals,
            self.span.as_deref_mut(),
        );
    }
}

fn kind_and_len(msg: &Message) -> (MessageType, usize) {
    match msg {
        Message::Text(t) => (MessageType::Text, t.len()),
        Message::Binary(b) => (MessageType::Binary, b.len()),
        Message::Ping(p) => (MessageType::Ping, p.len()),
        Message::Pong(p) => (MessageType::Pong, p.len()),
        Message::Close(_) => (MessageType::Close, 0),
        Message::Frame(f) => {
            use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
            let kind = match f.header().opcode {
                OpCode::Data(Data::Text) => MessageType::Text,
                OpCode::Data(_) => MessageType::Binary,
                OpCode::Control(Control::Ping) => MessageType::Ping,
                OpCode::Control(Control::Pong) => MessageType::Pong,
                OpCode::Control(_) => MessageType::Close,
            };
            (kind, f.payload().len())
        }
    }
}

thread_local! {
    /// The span of the connection whose `WebSocket` was dropped by a panic on this thread,
    /// for the panic's log line (written where the panic is caught, on the same thread).
    static PANICKED: std::cell::RefCell<Option<SpanContext>> = const { std::cell::RefCell::new(None) };
}

/// Takes the span of the connection a panic on this thread has just dropped, if any.
pub(crate) fn panicked_span() -> Option<SpanContext> {
    PANICKED.with(|p| p.borrow_mut().take())
}
