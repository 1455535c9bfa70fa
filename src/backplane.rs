//! The backplane: rooms that span instances, through NATS.
//!
//! With `--nats-url`, a room message is delivered to the sender's own instance's members first
//! (no NATS round trip for them) and published to the room's subject; every other instance that
//! has members in that room receives it from NATS and delivers it to them. The server never waits
//! on NATS: a publish is handed to the NATS client's bounded command queue without waiting
//! (`--backplane-queue` is its size; full: dropped, `backplane_full`), and while NATS is away
//! nothing is queued at all (dropped, `backplane_unavailable`), so memory stays bounded, the
//! client's own buffers included. The NATS connection uses `no_echo`, so an instance never
//! receives what it published itself.
//!
//! Interest only: an instance subscribes to a room's subject when its first local member joins
//! and unsubscribes when the last one leaves; rooms it does not host cost it nothing. The client
//! reconnects and resubscribes by itself; NATS absent at startup is retried in the background.
//!
//! Subjects: `<prefix>.room.<room>` with the room name escaped so the mapping is injective and
//! a room's `.` (NATS's token separator) stays inside one token: `_` becomes `__` and `.`
//! becomes `_d`.
//!
//! Telemetry: messages and bytes each way, publish errors, connected, reconnects, drops with
//! their reason, and the hop (publish on one instance to hand-off on another, from a
//! `Wsotel-Sent-At` header: the instances' clocks must agree). A sampled message carries W3C
//! trace context in its headers: a `PRODUCER` span on the publishing instance and a `CONSUMER`
//! span on each receiving one make one trace (OpenTelemetry messaging conventions,
//! `messaging.system = nats`).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{ConnectOptions, HeaderMap, ServerAddr};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tungstenite::Message;

use crate::telemetry::{DropReason, Events, Route, Spans};

/// Header carrying the publishing instance's wall clock (Unix nanoseconds).
const SENT_AT: &str = "Wsotel-Sent-At";
/// Header carrying the message type (`text` or `binary`).
const KIND: &str = "Wsotel-Kind";

/// Messages a subscription buffers before NATS reports it a slow consumer.
const SUBSCRIPTION_CAPACITY: usize = 8192;

/// What the backplane needs from the configuration.
#[derive(Debug, Clone)]
pub struct BackplaneSettings {
    /// NATS servers (a cluster's seeds).
    pub servers: Vec<ServerAddr>,
    /// The first token of every subject: deployments sharing a NATS keep apart by prefix.
    pub prefix: String,
    /// The NATS client's command queue: publishes waiting for the connection, at most.
    pub queue: usize,
}

/// Parses `--nats-url`: comma-separated `nats://host:port` URLs.
pub fn parse_servers(s: &str) -> Result<Vec<ServerAddr>, String> {
    let servers: Vec<ServerAddr> = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if !u.contains("://") {
                return Err(format!(
                    "`{u}` is not a NATS URL (e.g. nats://127.0.0.1:4222)"
                ));
            }
            let addr =
                ServerAddr::from_str(u).map_err(|e| format!("`{u}` is not a NATS URL: {e}"))?;
            if addr.host().is_empty() {
                return Err(format!("`{u}` names no host (e.g. nats://127.0.0.1:4222)"));
            }
            Ok(addr)
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("no NATS URL given".into());
    }
    Ok(servers)
}

/// Checks a subject prefix: one or more NATS tokens of `[A-Za-z0-9_-]`.
pub fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a subject prefix (tokens of [A-Za-z0-9_-] separated by dots)"
        ))
    }
}

/// The subject of room `room` under `prefix`: injective, one token for the room.
pub fn room_subject(prefix: &str, room: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 6 + room.len() * 2);
    s.push_str(prefix);
    s.push_str(".room.");
    for c in room.chars() {
        match c {
            '_' => s.push_str("__"),
            '.' => s.push_str("_d"),
            c => s.push(c),
        }
    }
    s
}

/// The connection to NATS, shared by every room.
#[derive(Clone)]
pub struct Backplane {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    prefix: String,
    events: Events,
    /// The route room members come in on: what dropped room messages are counted under.
    route: Route,
    spans: Option<Arc<Spans>>,
    connected: Arc<AtomicBool>,
}

/// Delivers messages from NATS to a room's local members; implemented by the room registry.
pub trait LocalDelivery: Send + Sync + 'static {
    /// Queues `msg` for every local member of `room`; returns how many it was queued for.
    fn deliver(&self, room: &str, msg: &Message) -> usize;
}

impl Backplane {
    /// Starts the NATS client, retrying in the background when NATS is not there yet.
    pub async fn start(
        settings: &BackplaneSettings,
        events: Events,
        route: Route,
        spans: Option<Arc<Spans>>,
    ) -> Result<Self, String> {
        let connected = Arc::new(AtomicBool::new(false));
        events.backplane_configured(connected.clone(), route);
        let flag = connected.clone();
        let ev = events.clone();
        let client = ConnectOptions::new()
            .name("wsotel")
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .client_capacity(settings.queue.max(1))
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                // 10 ms doubling to 2 s: a restarted NATS is rejoined within a few seconds.
                Duration::from_millis(10u64 << attempts.min(8)).min(Duration::from_secs(2))
            })
            .event_callback(move |event| {
                let flag = flag.clone();
                let ev = ev.clone();
                async move { on_event(&event, &flag, &ev) }
            })
            .connect(settings.servers.clone())
            .await
            .map_err(|e| format!("NATS: {e}"))?;
        let inner = Arc::new(Inner {
            client,
            prefix: settings.prefix.clone(),
            events,
            route,
            spans,
            connected,
        });
        Ok(Backplane { inner })
    }

    /// Writes out what the NATS client still holds, within `bound` (at shutdown, after the
    /// drain).
    pub async fn flush(&self, bound: Duration) {
        if self.connected() {
            let _ = tokio::time::timeout(bound, self.inner.client.flush()).await;
        }
    }

    /// Whether the NATS connection is up right now.
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Hands a room message to the backplane without waiting. Counted as dropped (with its
    /// reason) when NATS is away or the queue is full. `trace`: the producer span's context to
    /// carry, for a sampled message.
    pub fn publish(
        &self,
        subject: &async_nats::Subject,
        msg: &Message,
        trace: Option<&opentelemetry::Context>,
    ) {
        let events = &self.inner.events;
        if !self.connected() {
            events.dropped(self.inner.route, DropReason::BackplaneUnavailable, 1);
            return;
        }
        let (payload, kind) = match msg {
            Message::Text(t) => (Bytes::from(t.clone()), "text"),
            Message::Binary(b) => (b.clone(), "binary"),
            _ => return,
        };
        let mut headers = HeaderMap::new();
        headers.insert(KIND, kind);
        headers.insert(SENT_AT, unix_nanos().to_string().as_str());
        if let Some(cx) = trace {
            inject(cx, &mut headers);
        }
        let len = payload.len();
        // The room's subject, made once when the room was (a reference-counted clone).
        let subject = subject.clone();
        // The client's queue has room (the send completes at once) or the message is dropped:
        // the connection never waits on NATS.
        // Unconstrained: Tokio's cooperative budget would otherwise make a send into a channel
        // with room look full once the task has used its time slice.
        let send = self
            .inner
            .client
            .publish_with_headers(subject, headers, payload);
        match tokio::task::unconstrained(send).now_or_never() {
            Some(Ok(())) => events.backplane_message(true, len),
            Some(Err(err)) => {
                events.backplane_error(match err.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => "max_payload",
                    async_nats::client::PublishErrorKind::InvalidSubject => "invalid_subject",
                    _ => "send",
                });
                events.dropped(self.inner.route, DropReason::BackplaneUnavailable, 1);
            }
            None => events.dropped(self.inner.route, DropReason::BackplaneFull, 1),
        }
    }

    /// Subscribes to `room` for its local members; the subscription lasts until the returned
    /// handle is dropped (the room's last local member left), then it unsubscribes. The handle
    /// says when NATS has the subscription ([`RemoteInterest::ready`]).
    pub fn subscribe(&self, room: &str, local: Arc<dyn LocalDelivery>) -> RemoteInterest {
        let stop = CancellationToken::new();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let inner = self.inner.clone();
        let room = room.to_owned();
        let subject = room_subject(&inner.prefix, &room);
        let interest_subject = async_nats::Subject::from(subject.as_str());
        let guard = stop.clone();
        tokio::spawn(async move {
            let mut sub = match inner.client.subscribe(subject.clone()).await {
                Ok(sub) => sub,
                Err(err) => {
                    tracing::warn!(error = %err, "backplane: cannot subscribe");
                    return;
                }
            };
            // NATS handles one connection's commands in order: once it has answered a request
            // sent after the SUB (with "no responders": nobody listens on the sync subject),
            // the SUB is in place. A flush would only say the SUB left this process.
            let sync = format!("{}.sync", inner.prefix);
            let answered = tokio::time::timeout(
                Duration::from_secs(2),
                inner.client.request(sync, Bytes::new()),
            )
            .await;
            if answered.is_ok() {
                let _ = ready_tx.send(true);
            }
            loop {
                let msg = tokio::select! {
                    _ = guard.cancelled() => break,
                    m = sub.next() => match m {
                        Some(m) => m,
                        None => break,
                    },
                };
                receive(&inner, &room, msg, local.as_ref());
            }
            // Dropping the subscriber sends UNSUB.
            drop(sub);
        });
        RemoteInterest {
            stop,
            ready,
            backplane: self.clone(),
            subject: interest_subject,
        }
    }
}

/// A room's interest in the backplane: dropping it unsubscribes.
pub struct RemoteInterest {
    stop: CancellationToken,
    ready: tokio::sync::watch::Receiver<bool>,
    backplane: Backplane,
    /// The room's subject, made once for every message published to it.
    subject: async_nats::Subject,
}

impl RemoteInterest {
    /// The room's subject.
    pub fn subject(&self) -> &async_nats::Subject {
        &self.subject
    }

    /// Waits (at most `bound`) until NATS has the subscription, so a member admitted after it
    /// hears other instances from its first moment. Returns at once while NATS is away (the
    /// client resubscribes when it is back).
    pub async fn ready(&self, bound: Duration) {
        if !self.backplane.connected() {
            return;
        }
        let mut ready = self.ready.clone();
        let _ = tokio::time::timeout(bound, ready.wait_for(|r| *r)).await;
    }
}

impl Drop for RemoteInterest {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn on_event(event: &async_nats::Event, connected: &AtomicBool, events: &Events) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            let again = !connected.swap(true, Ordering::Relaxed);
            events.backplane_connected(again && events.backplane_was_connected());
        }
        Event::Disconnected => {
            if connected.swap(false, Ordering::Relaxed) {
                events.backplane_disconnected();
            }
        }
        Event::SlowConsumer(_) => events.backplane_failed("slow_consumer", None, true),
        Event::ServerError(err) => events.backplane_failed("server_error", Some(err), true),
        // Every failed reconnect attempt reports one: logged only while connected (once per
        // transition), counted always.
        Event::ClientError(err) => {
            let connected = connected.load(Ordering::Relaxed);
            events.backplane_failed("client_error", Some(err), connected);
        }
        Event::LameDuckMode | Event::Draining | Event::Closed => {
            tracing::info!(event = %event, "backplane: NATS connection state");
        }
    }
}

fn receive(inner: &Inner, room: &str, msg: async_nats::Message, local: &dyn LocalDelivery) {
    let headers = msg.headers.as_ref();
    let header = |k: &str| {
        headers
            .and_then(|h| h.get(k))
            .map(|v| v.as_str().to_owned())
    };
    if let Some(sent) = header(SENT_AT).and_then(|v| v.parse::<u64>().ok()) {
        let hop = unix_nanos().saturating_sub(sent);
        inner
            .events
            .backplane_hop(Duration::from_nanos(hop).as_secs_f64());
    }
    let len = msg.payload.len();
    inner.events.backplane_message(false, len);
    let ws = match header(KIND).as_deref() {
        Some("text") => match String::from_utf8(msg.payload.to_vec()) {
            Ok(t) => Message::text(t),
            Err(_) => return,
        },
        _ => Message::Binary(msg.payload.clone()),
    };
    // A sampled message's consumer span, child of the publisher's producer span.
    let span = match (&inner.spans, headers) {
        (Some(spans), Some(h)) if h.get("traceparent").is_some() => {
            let parent = extract(h);
            Some(spans.consumer(&parent, msg.subject.as_str(), len))
        }
        _ => None,
    };
    let recipients = local.deliver(room, &ws);
    if let Some(mut span) = span {
        use opentelemetry::trace::Span as _;
        span.set_attribute(opentelemetry::KeyValue::new(
            "websocket.recipients",
            recipients as i64,
        ));
        span.end();
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

fn inject(cx: &opentelemetry::Context, headers: &mut HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator;
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(cx, &mut HeaderInjector(headers));
}

fn extract(headers: &HeaderMap) -> opentelemetry::Context {
    use opentelemetry::propagation::TextMapPropagator;
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_injective_and_one_token() {
        let rooms = [
            "a.b", "a_d", "a__b", "a_b", "a._b", "a_.b", "a..b", "lobby", "x", "_", ".", "__", "_d",
        ];
        let mut seen = std::collections::HashSet::new();
        for r in rooms {
            let s = room_subject("wsotel", r);
            assert!(seen.insert(s.clone()), "{r} collides: {s}");
            let token = s.strip_prefix("wsotel.room.").unwrap();
            assert!(!token.contains('.'), "{r}: {s} splits the room");
            assert!(!token.is_empty());
        }
        assert_eq!(room_subject("p.q", "a.b_c"), "p.q.room.a_db__c");
        // Every room character is allowed in a subject token.
        let long = "x.".repeat(32);
        assert!(room_subject("wsotel", &long).len() < 200);
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(parse_servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert_eq!(
            parse_servers("nats://a:4222, nats://b:4222").unwrap().len(),
            2
        );
        assert!(parse_servers("not a url").is_err());
        for hostless in [
            "nats://",
            "nats:///",
            "nats://@",
            "nats://?x",
            "nats://:4222",
        ] {
            assert!(parse_servers(hostless).is_err(), "{hostless}");
        }
        assert!(parse_servers("").is_err());
        assert!(parse_prefix("wsotel").is_ok());
        assert!(parse_prefix("prod.eu").is_ok());
        assert!(parse_prefix("bad..prefix").is_err());
        assert!(parse_prefix("a*").is_err());
        assert!(parse_prefix("").is_err());
    }
}
