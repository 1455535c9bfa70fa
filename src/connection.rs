//! One upgraded WebSocket connection: its read loop, heartbeat, outbound queue and close.
//!
//! Each connection is one task that owns its socket (no split, no lock): it waits at once for a
//! client message, a queued room message, the heartbeat deadline and its stop signal. Every
//! message is counted on the route's bound instruments as it crosses the socket; the
//! connection's own totals go on its span and its closing log line.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::rooms::{Membership, Rooms};
use crate::telemetry::{
    CloseReason, ConnectionGuard, Direction, DropReason, ErrorType, Events, MessageType,
    RouteInstruments,
};

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

/// What a connection needs from the server, besides its socket.
pub struct ConnectionContext {
    /// Unique per process; on spans and logs only, never on metrics.
    pub id: u64,
    /// Keeps the connection in `active_connections` and records its lifetime.
    pub guard: ConnectionGuard,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// Heartbeat settings.
    pub ping_interval: Duration,
    /// How long a ping may go unanswered.
    pub pong_timeout: Duration,
    /// What this connection does with data messages.
    pub kind: ConnectionKind,
}

/// Echo or room member.
pub enum ConnectionKind {
    /// Every data message is sent back.
    Echo,
    /// Every data message goes to the other members of the room.
    Room {
        /// The registry to join.
        rooms: Rooms,
        /// The room's name (validated before the upgrade).
        name: String,
        /// Capacity of the member's outbound queue.
        queue: usize,
    },
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

/// How the connection ended, and what to send the client about it.
struct Ending {
    reason: CloseReason,
    /// A Close frame to send, when the server is the one closing.
    close: Option<(u16, &'static str)>,
}

impl Ending {
    fn client(reason: CloseReason) -> Self {
        Ending {
            reason,
            close: None,
        }
    }

    fn server(reason: CloseReason, code: u16, text: &'static str) -> Self {
        Ending {
            reason,
            close: Some((code, text)),
        }
    }
}

/// The heartbeat: the server pings every interval; an unanswered ping ends the connection.
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    /// Payload and send time of the ping awaiting its pong.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
}

impl Heartbeat {
    fn new(interval: Duration, timeout: Duration) -> Self {
        Heartbeat {
            interval,
            timeout,
            next_ping: Instant::now() + interval,
            outstanding: None,
            seq: 0,
        }
    }

    fn deadline(&self) -> Instant {
        match self.outstanding {
            Some((_, sent)) => sent + self.timeout,
            None => self.next_ping,
        }
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

/// Serves one upgraded connection until it closes.
pub async fn serve(socket: WebSocket, ctx: ConnectionContext) {
    let span = tracing::info_span!(
        "websocket.connection",
        connection.id = ctx.id as i64,
        http.route = ctx.guard.instruments().route().as_str(),
        websocket.room = tracing::field::Empty,
        websocket.close.reason = tracing::field::Empty,
        websocket.messages.received = tracing::field::Empty,
        websocket.messages.sent = tracing::field::Empty,
        websocket.bytes.received = tracing::field::Empty,
        websocket.bytes.sent = tracing::field::Empty,
    );
    run_connection(socket, ctx).instrument(span).await
}

async fn run_connection(mut socket: WebSocket, ctx: ConnectionContext) {
    let ConnectionContext {
        id,
        guard,
        shutdown,
        ping_interval,
        pong_timeout,
        kind,
    } = ctx;
    let events = guard.events().clone();
    let route = guard.instruments();
    let stop = shutdown.child_token();
    let mut totals = Totals::default();

    let (membership, mut rx) = match kind {
        ConnectionKind::Echo => (None, None),
        ConnectionKind::Room { rooms, name, queue } => {
            tracing::Span::current().record("websocket.room", name.as_str());
            let (tx, rx) = mpsc::channel(queue);
            (Some(rooms.join(&name, id, tx, stop.clone())), Some(rx))
        }
    };
    tracing::debug!(connection.id = id as i64, "connection opened");

    let mut heartbeat = Heartbeat::new(ping_interval, pong_timeout);
    let sleep = tokio::time::sleep_until(heartbeat.deadline().into());
    tokio::pin!(sleep);

    let ending = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                break if shutdown.is_cancelled() {
                    Ending::server(CloseReason::ServerShutdown, close_code::GOING_AWAY, "server shutting down")
                } else {
                    events.error(route.route(), ErrorType::SlowConsumer);
                    tracing::warn!(connection.id = id as i64, "slow consumer disconnected");
                    Ending::server(CloseReason::SlowConsumer, close_code::POLICY_VIOLATION, "slow consumer")
                };
            }
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(msg)) => msg,
                    Some(Err(err)) => break classify_error(&events, route, err),
                    None => break Ending::client(CloseReason::ClientAborted),
                };
                let received_at = Instant::now();
                match msg {
                    Message::Text(ref t) => {
                        count_in(route, &mut totals, MessageType::Text, t.len());
                        if let Err(e) = handle_data(&mut socket, &events, route, &mut totals, membership.as_ref(), msg, received_at, &stop).await {
                            break e;
                        }
                    }
                    Message::Binary(ref b) => {
                        count_in(route, &mut totals, MessageType::Binary, b.len());
                        if let Err(e) = handle_data(&mut socket, &events, route, &mut totals, membership.as_ref(), msg, received_at, &stop).await {
                            break e;
                        }
                    }
                    Message::Ping(p) => {
                        route.message(Direction::Receive, MessageType::Ping, p.len());
                        // tungstenite queues the pong and writes it on the next read or write.
                        route.message(Direction::Transmit, MessageType::Pong, p.len());
                    }
                    Message::Pong(p) => {
                        route.message(Direction::Receive, MessageType::Pong, p.len());
                        if let Some(rtt) = heartbeat.pong(&p) {
                            events.ping_round_trip(rtt);
                            sleep.as_mut().reset(heartbeat.deadline().into());
                        }
                    }
                    Message::Close(frame) => {
                        route.message(Direction::Receive, MessageType::Close, 0);
                        // tungstenite has queued the reply; the next read flushes it and ends
                        // the stream.
                        route.message(Direction::Transmit, MessageType::Close, 0);
                        let reason = CloseReason::from_client_code(frame.as_ref().map(|f| f.code));
                        let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, socket.recv()).await;
                        break Ending::client(reason);
                    }
                }
            }
            Some(out) = recv_queued(&mut rx) => {
                if let Err(e) = send_counted(&mut socket, &events, route, &mut totals, out, &stop).await {
                    break e;
                }
            }
            _ = &mut sleep => {
                if heartbeat.outstanding.is_some() {
                    events.error(route.route(), ErrorType::HeartbeatTimeout);
                    tracing::warn!(connection.id = id as i64, "heartbeat timeout: no pong");
                    // The peer is presumed dead: no Close handshake to wait for.
                    break Ending::client(CloseReason::HeartbeatTimeout);
                }
                heartbeat.seq += 1;
                let payload = heartbeat.seq.to_be_bytes();
                heartbeat.outstanding = Some((heartbeat.seq, Instant::now()));
                sleep.as_mut().reset(heartbeat.deadline().into());
                let ping = Message::Ping(payload.to_vec().into());
                match with_stop(&stop, socket.send(ping)).await {
                    Some(Ok(())) => route.message(Direction::Transmit, MessageType::Ping, payload.len()),
                    Some(Err(err)) => break classify_error(&events, route, err),
                    None => continue,
                }
            }
        }
    };

    if let Some((code, text)) = ending.close {
        let frame = CloseFrame {
            code,
            reason: text.into(),
        };
        let sent = tokio::time::timeout(
            CLOSE_REPLY_TIMEOUT,
            socket.send(Message::Close(Some(frame))),
        )
        .await;
        if matches!(sent, Ok(Ok(()))) {
            route.message(Direction::Transmit, MessageType::Close, 0);
            // Wait for the client's Close reply, reading (and discarding) what is in flight.
            let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
                while let Some(Ok(msg)) = socket.recv().await {
                    if matches!(msg, Message::Close(_)) {
                        route.message(Direction::Receive, MessageType::Close, 0);
                    }
                }
            })
            .await;
        }
    }

    // Leave the room first, so nothing new is queued, then count what never went out.
    drop(membership);
    if let Some(mut rx) = rx {
        rx.close();
        let mut undelivered = 0;
        while rx.try_recv().is_ok() {
            undelivered += 1;
        }
        events.dropped(route.route(), DropReason::ConnectionClosed, undelivered);
    }
    drop(socket);

    let reason = ending.reason;
    let span = tracing::Span::current();
    span.record("websocket.close.reason", reason.as_str());
    span.record("websocket.messages.received", totals.messages_in as i64);
    span.record("websocket.messages.sent", totals.messages_out as i64);
    span.record("websocket.bytes.received", totals.bytes_in as i64);
    span.record("websocket.bytes.sent", totals.bytes_out as i64);
    let lifetime = guard.closed(reason);
    tracing::info!(
        connection.id = id as i64,
        websocket.close.reason = reason.as_str(),
        duration_ms = lifetime.as_millis() as i64,
        messages_in = totals.messages_in as i64,
        messages_out = totals.messages_out as i64,
        bytes_in = totals.bytes_in as i64,
        bytes_out = totals.bytes_out as i64,
        "connection closed"
    );
}

#[inline]
fn count_in(route: &RouteInstruments, totals: &mut Totals, kind: MessageType, len: usize) {
    route.message(Direction::Receive, kind, len);
    totals.messages_in += 1;
    totals.bytes_in += len as u64;
}

/// Echoes a data message, or broadcasts it to the room.
async fn handle_data(
    socket: &mut WebSocket,
    events: &Events,
    route: &RouteInstruments,
    totals: &mut Totals,
    membership: Option<&Membership>,
    msg: Message,
    received_at: Instant,
    stop: &CancellationToken,
) -> Result<(), Ending> {
    match membership {
        None => send_counted(socket, events, route, totals, msg, stop).await?,
        Some(m) => {
            m.broadcast(&msg);
        }
    }
    route.message_handled(received_at);
    Ok(())
}

/// Sends a data message and counts it once it is written.
async fn send_counted(
    socket: &mut WebSocket,
    events: &Events,
    route: &RouteInstruments,
    totals: &mut Totals,
    msg: Message,
    stop: &CancellationToken,
) -> Result<(), Ending> {
    let (kind, len) = match &msg {
        Message::Text(t) => (MessageType::Text, t.len()),
        Message::Binary(b) => (MessageType::Binary, b.len()),
        _ => unreachable!("only data messages are queued or echoed"),
    };
    match with_stop(stop, socket.send(msg)).await {
        Some(Ok(())) => {
            route.message(Direction::Transmit, kind, len);
            totals.messages_out += 1;
            totals.bytes_out += len as u64;
            Ok(())
        }
        Some(Err(err)) => Err(classify_error(events, route, err)),
        // Stopped while blocked on a client that does not read: the loop's stop branch
        // decides the reason on its next turn.
        None => Ok(()),
    }
}

/// Runs `fut` unless `stop` is cancelled first.
async fn with_stop<F: std::future::Future>(stop: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = stop.cancelled() => None,
    }
}

async fn recv_queued(rx: &mut Option<mpsc::Receiver<Message>>) -> Option<Message> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Maps a socket error to a close reason, counts it, and says which Close to send.
fn classify_error(events: &Events, route: &RouteInstruments, err: axum::Error) -> Ending {
    use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
    let inner = err.into_inner();
    let Some(ws) = inner.downcast_ref::<WsError>() else {
        events.error(route.route(), ErrorType::Io);
        return Ending::client(CloseReason::InternalError);
    };
    match ws {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Ending::client(CloseReason::Normal),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Ending::client(CloseReason::ClientAborted)
        }
        WsError::Io(e) => match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => Ending::client(CloseReason::ClientAborted),
            _ => {
                events.error(route.route(), ErrorType::Io);
                tracing::warn!(error = %e, "connection I/O error");
                Ending::client(CloseReason::InternalError)
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
            tracing::info!(error = %ws, "protocol error");
            Ending::server(
                CloseReason::ProtocolError,
                close_code::PROTOCOL_ERROR,
                "protocol error",
            )
        }
        other => {
            events.error(route.route(), ErrorType::Io);
            tracing::warn!(error = %other, "connection error");
            Ending::server(
                CloseReason::InternalError,
                close_code::INTERNAL_ERROR,
                "internal error",
            )
        }
    }
}
