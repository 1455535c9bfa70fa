//! The `wsotel` server's WebSocket routes, built on the public API like any application's:
//! `/ws/echo` sends every message back, `/ws/rooms/{room}` sends it to the room's other
//! members (on every instance, with a backplane). What is decided here, before the upgrade, is
//! the server's own policy: the room name and the token's grant; after it, the room's publish
//! rules.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::get;
use tokio::sync::{Notify, mpsc};
use tokio::time::Sleep;

use crate::auth::{Authenticator, Grant};
use crate::coalesce::WriteDelay;
use crate::connection::WebSocket;
use crate::layer::WebSockets;
use crate::rooms::{Reservation, Rooms, valid_room_name};
use crate::sources::Sources;
use crate::telemetry::{CloseReason, DropReason, RejectReason, Route, Spans};
use crate::upgrade::WebSocketUpgrade;
use tungstenite::Message;

/// `GET /ws/echo`.
pub const ECHO: Route = Route::from_static("/ws/echo");
/// `GET /ws/rooms/{room}`.
pub const ROOMS: Route = Route::from_static("/ws/rooms/{room}");

/// What the server's routes share, besides the [`WebSockets`] instrumentation.
#[derive(Clone)]
pub(crate) struct ServerState {
    inner: Arc<Inner>,
}

struct Inner {
    rooms: Rooms,
    /// Verifies tokens, when authentication is on.
    auth: Option<Authenticator>,
    /// Where a publish-rate abuser's address is put in the penalty box.
    sources: Sources,
    /// For the `PRODUCER` span of a sampled room message handed to the backplane.
    spans: Option<Arc<Spans>>,
    terms: Terms,
}

/// The room rules every member gets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms {
    /// Capacity of a member's outbound queue.
    pub queue: usize,
    /// Room messages per second on average (`0`: no limit).
    pub publish_rate: u32,
    /// Room messages at once above the rate.
    pub publish_burst: u32,
    /// How long the client address is refused after a member exceeds the publish rate.
    pub rate_limit_penalty: Duration,
    /// Write coalescing: a member that wrote less than this ago waits until this long after
    /// that write before writing again, and then writes everything queued at once (`0`: off).
    pub write_delay: Duration,
}

impl ServerState {
    /// The routes' state: `rooms` (with its backplane), token checks when `auth` is on, room
    /// rules `terms`; message spans when `spans` is given.
    pub(crate) fn new(
        rooms: Rooms,
        auth: Option<Authenticator>,
        sources: Sources,
        spans: Option<Arc<Spans>>,
        terms: Terms,
    ) -> Self {
        ServerState {
            inner: Arc::new(Inner {
                rooms,
                auth,
                sources,
                spans,
                terms,
            }),
        }
    }
}

/// The WebSocket router: `/ws/echo` and `/ws/rooms/{room}`, behind `sockets`' layer.
pub(crate) fn router(state: ServerState, sockets: &WebSockets) -> Router {
    Router::new()
        .route(ECHO.as_str(), get(echo))
        .route(ROOMS.as_str(), get(room))
        .with_state(state)
        .layer(sockets.layer())
}

async fn echo(
    State(state): State<ServerState>,
    uri: Uri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (ws, _grant) = match authorize(&state, ws, &headers, &uri, None) {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    ws.operation("echo").on_upgrade(serve_echo)
}

async fn room(
    State(state): State<ServerState>,
    RoomName(name): RoomName,
    uri: Uri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (ws, grant) = match authorize(&state, ws, &headers, &uri, Some(&name)) {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let may_publish = grant.as_ref().is_none_or(|g| g.may_publish(&name));
    // The limits first: a client over them costs no room and no NATS subscription.
    let ws = match ws.admit() {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let client = ws.client_addr();
    // With a backplane this waits until NATS has the room's subscription (bounded), so the
    // member hears other instances from the moment it gets its 101.
    let reservation = state.inner.rooms.reserve(&name).await;
    ws.room(name)
        .operation("broadcast")
        .on_upgrade(move |socket| {
            let member = Member {
                state,
                client,
                may_publish,
            };
            member.serve(socket, reservation)
        })
}

/// The room of `/ws/rooms/{room}`, checked before the upgrade request itself (after the
/// shutdown): an invalid name is refused with 400 (`invalid_room`).
struct RoomName(String);

impl<S: Send + Sync> FromRequestParts<S> for RoomName {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let sockets = parts
            .extensions
            .get::<WebSockets>()
            .cloned()
            .expect("the routes are behind the WebSockets layer");
        if sockets.is_shutting_down() {
            let status = StatusCode::SERVICE_UNAVAILABLE;
            return Err(sockets.refuse(parts, RejectReason::ShuttingDown, status));
        }
        let name = match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(name)) if valid_room_name(&name) => name,
            _ => {
                let status = StatusCode::BAD_REQUEST;
                return Err(sockets.refuse(parts, RejectReason::InvalidRoom, status));
            }
        };
        Ok(RoomName(name))
    }
}

/// Checks the token, when authentication is on: the grant, or the refusal (401/403).
#[allow(clippy::result_large_err)] // the refusal is the response, answered at once
fn authorize(
    state: &ServerState,
    ws: WebSocketUpgrade,
    headers: &HeaderMap,
    uri: &Uri,
    room: Option<&str>,
) -> Result<(WebSocketUpgrade, Option<Grant>), Response> {
    // The token carrier `wsotel.bearer, <token>` is the one subprotocol the routes speak.
    let ws = ws.protocols([crate::auth::BEARER_PROTOCOL]);
    let Some(auth) = &state.inner.auth else {
        return Ok((ws, None));
    };
    match auth.authorize(headers, uri, room) {
        Ok(grant) => {
            let ws = ws
                .user(grant.subject.clone())
                .expires_at(Instant::now() + grant.remaining());
            Ok((ws, Some(grant)))
        }
        Err(err) => Err(ws.reject(err.reason(), err.status())),
    }
}

/// Sends every data message back. Replies are fed while the client pipelines (one write for
/// many) and written at once otherwise; after a failed write, `recv` finishes the close.
async fn serve_echo(mut ws: WebSocket) {
    while let Some(msg) = ws.recv().await {
        #[cfg(feature = "fault-injection")]
        inject_fault(&msg);
        // `send` is `feed` + `flush`: written as such, the two share the future's space.
        let batched = ws.should_feed();
        if ws.feed(msg).await.is_ok() && !batched {
            let _ = ws.flush().await;
        }
    }
}

/// One room member's connection.
struct Member {
    state: ServerState,
    client: IpAddr,
    /// Whether the token lets it send to the room (always, without authentication).
    may_publish: bool,
}

impl Member {
    /// Relays the member's messages to the room and the room's to the member, until the
    /// connection ends; then leaves the room and counts what was still queued for it.
    async fn serve(self, mut ws: WebSocket, reservation: Reservation) {
        let inner = &self.state.inner;
        let terms = inner.terms;
        let (tx, mut rx) = mpsc::channel(terms.queue);
        // Write coalescing (`--room-write-delay`). While `waiting`, the member's timer (made on
        // first use) is armed and its queue is not watched: the room's sends do not wake it.
        // It waits after a message finds its last write recent (that message is `held`; the
        // rest queue behind it), and again after every write that timer made, until a look at
        // the queue finds it empty: then it is idle, and the next message goes out at once.
        // The room wakes it early when its queue is half full.
        let mut delay = WriteDelay::new(terms.write_delay);
        let mut waiting = false;
        let mut held: Option<Message> = None;
        let mut hold: Option<Pin<Box<Sleep>>> = None;
        let hurry = delay.is_on().then(Arc::default);
        let membership = reservation.join(ws.id(), tx, ws.closer(), hurry.clone());
        let mut bucket = (terms.publish_rate > 0)
            .then(|| TokenBucket::new(terms.publish_rate, terms.publish_burst, Instant::now()));
        loop {
            tokio::select! {
                biased;
                // First, so a close or shutdown never waits for a held write.
                msg = ws.recv() => {
                    let Some(msg) = msg else { break };
                    #[cfg(feature = "fault-injection")]
                    inject_fault(&msg);
                    if !self.may_publish {
                        ws.close(CloseReason::PublishForbidden).await;
                        break;
                    }
                    if bucket.as_mut().is_some_and(|b| !b.take(Instant::now())) {
                        // At once, before the client sees the Close and reconnects.
                        inner.sources.penalize(self.client, terms.rate_limit_penalty);
                        ws.close(CloseReason::RateLimited).await;
                        break;
                    }
                    // Local members first: they never wait for NATS.
                    let delivery = membership.broadcast(&msg);
                    ws.delivered_to(delivery.queued);
                    if let Some((backplane, subject)) = membership.backplane() {
                        // A sampled message's span is recorded now, so its PRODUCER child
                        // can travel in the NATS headers.
                        let size = msg.len();
                        let cx = ws.message_span().and_then(|message| {
                            inner.spans.as_ref().map(|s| s.producer(&message, subject, size))
                        });
                        backplane.publish(subject, &msg, cx.as_ref());
                    }
                }
                () = held_until(&mut hold, hurry.as_deref()), if waiting => {
                    match held.take().or_else(|| rx.try_recv().ok()) {
                        Some(first) => {
                            let next = delay.next_look(tokio::time::Instant::now());
                            write_queued(&mut ws, Some(first), &mut rx).await;
                            arm(&mut hold, next);
                        }
                        None => waiting = false,
                    }
                }
                Some(out) = rx.recv(), if !waiting => {
                    // Off, or idle for the whole delay: at once (no clock read when off).
                    let now = delay.is_on().then(tokio::time::Instant::now);
                    match now.and_then(|now| delay.ready(now)) {
                        None => write_queued(&mut ws, Some(out), &mut rx).await,
                        Some(until) => {
                            held = Some(out);
                            waiting = true;
                            arm(&mut hold, until);
                        }
                    }
                }
            }
        }
        // Leave the room first, so nothing new is queued, then count what never went out.
        drop(membership);
        rx.close();
        let mut undelivered = u64::from(held.is_some());
        while rx.try_recv().is_ok() {
            undelivered += 1;
        }
        ws.dropped(DropReason::ConnectionClosed, undelivered);
    }
}

/// Feeds `first` and everything else already queued, then writes it all at once. A failed
/// feed stops there: the connection has ended, and what is left is counted when it is gone.
async fn write_queued(
    ws: &mut WebSocket,
    first: Option<Message>,
    rx: &mut mpsc::Receiver<Message>,
) {
    let mut next = first;
    while let Some(msg) = next {
        if ws.feed(msg).await.is_err() {
            return;
        }
        next = rx.try_recv().ok();
    }
    let _ = ws.flush().await;
}

/// Sets the member's timer to `until`, making it on first use.
fn arm(hold: &mut Option<Pin<Box<Sleep>>>, until: tokio::time::Instant) {
    match hold {
        Some(sleep) => sleep.as_mut().reset(until),
        None => *hold = Some(Box::pin(tokio::time::sleep_until(until))),
    }
}

/// Completes when the member's timer fires, or earlier when `hurry` is notified (its queue is
/// half full); never without a timer.
async fn held_until(hold: &mut Option<Pin<Box<Sleep>>>, hurry: Option<&Notify>) {
    let Some(sleep) = hold else {
        return std::future::pending().await;
    };
    match hurry {
        // The timer first: when it has fired, no waiter is put on the `Notify`.
        Some(hurry) => tokio::select! {
            biased;
            () = sleep => {}
            () = hurry.notified() => {}
        },
        None => sleep.await,
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

#[cfg(test)]
mod tests {
    use super::TokenBucket;
    use std::time::{Duration, Instant};

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10, 3, start);
        assert!((0..3).all(|_| b.take(start)), "the burst at once");
        assert!(!b.take(start), "then nothing");
        assert!(b.take(start + Duration::from_millis(100)), "one per 100 ms");
        assert!(!b.take(start + Duration::from_millis(150)));
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| b.take(later)).count(),
            3,
            "capped at the burst"
        );
    }
}

#[cfg(test)]
mod sizes {
    /// Every idle connection pays for its handler's future, which holds its `WebSocket`:
    /// this holds the line (measured in the test build; the release build's is smaller).
    /// BENCHMARKS.md's idle memory per connection is the number that matters; this catches a
    /// regression before a benchmark has to.
    #[test]
    fn the_connection_futures_stay_small() {
        fn size<F: std::future::Future>(_f: impl Fn(super::WebSocket) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let socket = std::mem::size_of::<super::WebSocket>();
        let echo = size(super::serve_echo);
        eprintln!("WebSocket {socket} B, echo future {echo} B");
        assert_eq!(socket, 8, "a WebSocket is a pointer: see its `conn`");
        assert!(
            echo <= 1024,
            "the echo connection's future grew to {echo} bytes: box what is rare"
        );
    }
}
