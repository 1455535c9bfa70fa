//! The WebSocket opening handshake (RFC 6455 section 4.2) as an axum extractor:
//! [`WebSocketUpgrade`].
//!
//! axum's own `WebSocketUpgrade` gives the handler a socket it cannot see under. wsotel needs
//! the raw byte stream to finish the closing handshake after a read error (see [`crate::wire`]),
//! so the upgrade is done here: `UpgradeRequest` validates the request, `UpgradeRequest::accept`
//! answers 101 and, once hyper hands over the connection, builds the tungstenite stream over a
//! [`Watched`] socket.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::MatchedPath;
use futures_util::FutureExt;
use futures_util::future::lazy;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::connection::{Setup, Socket, WebSocket};
use crate::layer::{GateSlot, UNKNOWN_PEER, WebSockets, origin_allowed, peer_of, refusal};
use crate::telemetry::{Identity, MoreIdentity, RejectReason, Route, RouteInstruments};
use crate::wire::Watched;

/// Most subprotocols of a request looked at (the header is client input).
const MAX_OFFERED_PROTOCOLS: usize = 16;

/// A valid WebSocket upgrade request, not yet answered.
pub(crate) struct UpgradeRequest {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The subprotocols the client offered (`Sec-WebSocket-Protocol`), in its order of
    /// preference.
    offered: Vec<String>,
}

/// Why a request is not an upgrade this server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeError {
    /// Not a `GET` (405).
    MethodNotGet,
    /// `Connection: upgrade` or `Upgrade: websocket` missing (400).
    NotAnUpgrade,
    /// `Sec-WebSocket-Version` is not 13 (426, with the version the server speaks).
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing (400).
    MissingKey,
    /// The connection cannot be upgraded (not HTTP/1.1) (426).
    NotUpgradable,
}

impl UpgradeError {
    /// The HTTP status answered.
    pub fn status(self) -> StatusCode {
        match self {
            UpgradeError::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::UnsupportedVersion | UpgradeError::NotUpgradable => {
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeError::NotAnUpgrade | UpgradeError::MissingKey => StatusCode::BAD_REQUEST,
        }
    }

    /// The bounded `error.type` it is counted under.
    pub fn reason(self) -> RejectReason {
        RejectReason::BadRequest
    }

    /// Headers the answer must carry: a 426 for the version names the one the server speaks
    /// (RFC 6455 section 4.4).
    pub fn headers(self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if self == UpgradeError::UnsupportedVersion {
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        h
    }
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        (self.status(), self.headers(), self.reason().as_str()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for UpgradeRequest {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(UpgradeError::MethodNotGet);
        }
        if parts.version != Version::HTTP_11 {
            return Err(UpgradeError::NotUpgradable);
        }
        let h = &parts.headers;
        if !header_has_token(h, header::CONNECTION, "upgrade")
            || !header_has_token(h, header::UPGRADE, "websocket")
        {
            return Err(UpgradeError::NotAnUpgrade);
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes().trim_ascii() != b"13")
        {
            return Err(UpgradeError::UnsupportedVersion);
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeError::MissingKey)?
            .clone();
        let offered = h
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("\u{fffd}").split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .take(MAX_OFFERED_PROTOCOLS)
            .collect();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(UpgradeRequest {
            key,
            on_upgrade,
            offered,
        })
    }
}

impl UpgradeRequest {
    /// Answers 101 Switching Protocols and, once hyper hands the connection over, runs
    /// `on_socket` with it on a task of its own. If the upgrade fails after the 101 (the client
    /// went away), `on_socket` never runs and is dropped.
    pub(crate) fn accept<F, Fut>(
        self,
        config: WebSocketConfig,
        protocol: Option<&'static str>,
        on_socket: F,
    ) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let UpgradeRequest {
            key, on_upgrade, ..
        } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    tracing::debug!(error = %err, "upgrade failed after 101");
                    return;
                }
            };
            let io = Watched::new(TokioIo::new(upgraded));
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            on_socket(socket).await;
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
                ),
            ],
        )
            .into_response();
        if let Some(protocol) = protocol {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Whether the comma-separated header `name` lists `token` (case-insensitively), in any of its
/// values.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The extractor of a WebSocket upgrade on a route behind [`WebSockets::layer`]: checks the
/// request (shutdown, `Origin`, the RFC 6455 headers) and answers a refused one with its HTTP
/// status, counted in `websocket.server.rejected_connections` by `error.type` and logged;
/// [`WebSocketUpgrade::on_upgrade`] then admits the connection (connection limits) and runs the
/// handler with a measured [`WebSocket`].
///
/// The connection's `http.route` is the route template the application registered (axum's
/// `MatchedPath`), never the request's path. Give a WebSocket route its own path: taken as
/// `Option`/`Result` to serve plain HTTP on the same route, every plain request would be
/// counted as a refused upgrade (`bad_request`). Serve the application with
/// `into_make_service_with_connect_info::<SocketAddr>()` so connections know their peer
/// address (for logs, spans and per-address limits).
///
/// ```
/// use axum::response::Response;
/// use wsotel::{Message, WebSocketUpgrade};
///
/// async fn ticker(ws: WebSocketUpgrade) -> Response {
///     ws.operation("tick").on_upgrade(|mut socket| async move {
///         let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
///         loop {
///             tokio::select! {
///                 msg = socket.recv() => if msg.is_none() { break },
///                 _ = every.tick() => {
///                     if socket.send(Message::text("tick")).await.is_err() {
///                         break;
///                     }
///                 }
///             }
///         }
///     })
/// }
/// ```
#[must_use = "answer the upgrade with `on_upgrade` (or `reject`)"]
pub struct WebSocketUpgrade {
    sockets: WebSockets,
    request: UpgradeRequest,
    instruments: Arc<RouteInstruments>,
    peer: SocketAddr,
    client: IpAddr,
    user: Option<String>,
    room: Option<String>,
    operation: Option<&'static str>,
    expires_at: Option<std::time::Instant>,
    /// The subprotocol chosen by [`WebSocketUpgrade::protocols`].
    protocol: Option<&'static str>,
    /// The connection's places under the limits, once [`WebSocketUpgrade::admit`] has run.
    admitted: Option<Admitted>,
}

/// A connection's places under the connection limit and its address's.
struct Admitted {
    slot: GateSlot,
    source: Option<crate::sources::OpenSlot>,
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Some(sockets) = parts.extensions.get::<WebSockets>().cloned() else {
            tracing::error!(
                "WebSocketUpgrade on a route without WebSockets::layer(): add the layer to the \
                 router that holds the route"
            );
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "WebSockets layer missing",
            )
                .into_response());
        };
        let s = &sockets.shared;
        let template = parts
            .extensions
            .get::<MatchedPath>()
            .map_or(Route::OTHER.as_str(), |p| p.as_str());
        let instruments = s.events.instruments_of(template);
        let route = instruments.route();
        let peer = peer_of(&parts.extensions).unwrap_or(UNKNOWN_PEER);
        let client = s.sources.client_address(peer.ip(), &parts.headers);
        let refuse = |reason: RejectReason, status: StatusCode, headers: HeaderMap| {
            refusal(&s.events, route, reason, status, headers, client)
        };
        if s.shutdown.is_cancelled() {
            return Err(refuse(
                RejectReason::ShuttingDown,
                StatusCode::SERVICE_UNAVAILABLE,
                HeaderMap::new(),
            ));
        }
        if !origin_allowed(&parts.headers, &s.allowed_origins) {
            return Err(refuse(
                RejectReason::OriginDenied,
                StatusCode::FORBIDDEN,
                HeaderMap::new(),
            ));
        }
        let request = match UpgradeRequest::from_request_parts(parts, state).await {
            Ok(r) => r,
            Err(err) => return Err(refuse(err.reason(), err.status(), err.headers())),
        };
        Ok(WebSocketUpgrade {
            sockets,
            request,
            instruments,
            peer,
            client,
            user: None,
            room: None,
            operation: None,
            expires_at: None,
            protocol: None,
            admitted: None,
        })
    }
}

impl WebSocketUpgrade {
    /// The route (`http.route`) the connection will be counted under.
    pub fn route(&self) -> Route {
        self.instruments.route()
    }

    /// The client's address: what a trusted proxy forwarded, else the TCP peer's.
    pub fn client_addr(&self) -> IpAddr {
        self.client
    }

    /// The authenticated user (`user.id` on the connection's span and log lines; never a
    /// metric attribute).
    pub fn user(mut self, id: impl Into<String>) -> Self {
        self.user = Some(id.into());
        self
    }

    /// The room, channel or topic the connection is for (`websocket.room` on its span and log
    /// lines; never a metric attribute).
    pub fn room(mut self, name: impl Into<String>) -> Self {
        self.room = Some(name.into());
        self
    }

    /// What the route does with a message (`websocket.operation` on message spans: `echo`,
    /// `broadcast`...).
    pub fn operation(mut self, name: &'static str) -> Self {
        self.operation = Some(name);
        self
    }

    /// When the client's credentials expire: the connection is closed then with 1008
    /// (`token_expired`).
    pub fn expires_at(mut self, at: std::time::Instant) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Refuses the upgrade with `status`: counted in `rejected_connections` by `reason`,
    /// logged (within the log budget) and recorded on the upgrade span as `error.type`.
    pub fn reject(self, reason: RejectReason, status: StatusCode) -> Response {
        refusal(
            &self.sockets.shared.events,
            self.instruments.route(),
            reason,
            status,
            HeaderMap::new(),
            self.client,
        )
    }

    /// The subprotocols the route speaks: the first the client offers (in its order of
    /// preference) is named in the `101`. A request offering subprotocols of which the route
    /// speaks none is refused with 400 (`unsupported_subprotocol`), counted, where a `101`
    /// without one would make a browser abort the connection unseen.
    pub fn protocols<I>(mut self, supported: I) -> Self
    where
        I: IntoIterator<Item = &'static str>,
    {
        let supported: Vec<&'static str> = supported.into_iter().collect();
        self.protocol = self
            .request
            .offered
            .iter()
            .find_map(|p| supported.iter().copied().find(|s| s == p));
        self
    }

    /// The subprotocol the `101` will name, when one was agreed.
    pub fn protocol(&self) -> Option<&'static str> {
        self.protocol
    }

    /// Takes the connection's places under the limits now, before the handler does more work
    /// for it (the server reserves a room, a NATS subscription, only after this): refused with
    /// 429 when the client address is over its connection limit or serving a rate-limit
    /// penalty, 503 at the connection limit. [`on_upgrade`](WebSocketUpgrade::on_upgrade) does
    /// it when it has not been done.
    #[allow(clippy::result_large_err)] // the refusal is the response, answered at once
    pub fn admit(mut self) -> Result<Self, Response> {
        if self.admitted.is_some() {
            return Ok(self);
        }
        if self.protocol.is_none() && !self.request.offered.is_empty() {
            return Err(self.reject(
                RejectReason::UnsupportedSubprotocol,
                StatusCode::BAD_REQUEST,
            ));
        }
        let s = &self.sockets.shared;
        let source = if self.peer == UNKNOWN_PEER {
            None
        } else {
            match s.sources.open(self.client) {
                Ok(slot) => Some(slot),
                Err(refused) => {
                    return Err(self.reject(refused.reason(), StatusCode::TOO_MANY_REQUESTS));
                }
            }
        };
        let Some(slot) = s.gate.enter() else {
            return Err(self.reject(
                RejectReason::ConnectionLimit,
                StatusCode::SERVICE_UNAVAILABLE,
            ));
        };
        self.admitted = Some(Admitted { slot, source });
        Ok(self)
    }

    /// Admits the connection (see [`admit`](WebSocketUpgrade::admit)) and answers
    /// `101 Switching Protocols`; once the client has it, `handler` runs with the [`WebSocket`]
    /// on a task of its own. The connection counts under the limits until its `WebSocket` is
    /// dropped, wherever the handler moves it.
    ///
    /// A panic in `handler` ends only its connection: Close 1011 (best effort), reason
    /// `internal_error`, counted in `errors{error.type=panic}` and logged with the connection
    /// span's ids.
    pub fn on_upgrade<F, Fut>(self, handler: F) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut this = match self.admit() {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        let Admitted { slot, source } = this.admitted.take().expect("admitted above");
        let this = this;
        let s = &this.sockets.shared;
        let route = this.instruments.route();
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        // Made here, inside the upgrade span, so the connection span is its child.
        let span = s.spans.as_ref().map(|spans| {
            Box::new(spans.connection(
                &tracing::Span::current().context(),
                id,
                route,
                this.room.as_deref(),
            ))
        });
        let more = (this.client != this.peer.ip() || this.user.is_some() || this.room.is_some())
            .then(|| {
                Box::new(MoreIdentity {
                    client: (this.client != this.peer.ip()).then_some(this.client),
                    user: this.user,
                    room: this.room,
                })
            });
        let setup = Box::new(Setup {
            events: s.events.clone(),
            instruments: this.instruments,
            who: Identity {
                id,
                route,
                peer: this.peer,
                more,
            },
            span,
            spans: s.spans.clone(),
            operation: this.operation,
            shutdown: s.shutdown.clone(),
            ping_interval: s.ping_interval,
            pong_timeout: s.pong_timeout,
            write_timeout: s.write_timeout,
            expires_at: this.expires_at.map(tokio::time::Instant::from_std),
            slot,
            source,
        });
        let events = s.events.clone();
        this.request
            .accept(s.socket_config, this.protocol, move |socket| {
                // The handler is called inside the guard too (lazily, at the first poll): a panic
                // in its synchronous part is contained and counted like one in its future.
                let handled = lazy(move |_| handler(WebSocket::new(socket, *setup))).flatten();
                AssertUnwindSafe(handled)
                    .catch_unwind()
                    .map(move |outcome| {
                        if let Err(panic) = outcome {
                            let message = crate::telemetry::logging::panic_message(&*panic);
                            let span = crate::connection::panicked_span();
                            events.panicked(route, id, message, span.as_ref());
                        }
                    })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    async fn parse(req: Request<()>) -> Result<UpgradeRequest, UpgradeError> {
        let (mut parts, ()) = req.into_parts();
        UpgradeRequest::from_request_parts(&mut parts, &()).await
    }

    fn upgrade_with_version(version: &str) -> axum::http::request::Builder {
        Request::get("/ws/echo")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "WebSocket")
            .header("sec-websocket-version", version)
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    fn upgrade() -> axum::http::request::Builder {
        upgrade_with_version("13")
    }

    #[tokio::test]
    async fn checks_in_rfc_order() {
        // Valid except for the hyper upgrade handle, which only a real connection has.
        let err = parse(upgrade().body(()).unwrap()).await.err();
        assert_eq!(err, Some(UpgradeError::NotUpgradable));
        let post = Request::post("/ws/echo").body(()).unwrap();
        assert_eq!(parse(post).await.err(), Some(UpgradeError::MethodNotGet));
        let plain = Request::get("/ws/echo").body(()).unwrap();
        assert_eq!(parse(plain).await.err(), Some(UpgradeError::NotAnUpgrade));
        let v8 = upgrade_with_version("8").body(()).unwrap();
        assert_eq!(
            parse(v8).await.err(),
            Some(UpgradeError::UnsupportedVersion)
        );
        let sub = upgrade()
            .header("sec-websocket-protocol", "chat.v1")
            .body(())
            .unwrap();
        assert_eq!(
            parse(sub).await.err(),
            Some(UpgradeError::NotUpgradable),
            "subprotocols are the route's to choose (valid up to the upgrade handle)"
        );
        let bearer = upgrade()
            .header("sec-websocket-protocol", "wsotel.bearer, a.b.c")
            .body(())
            .unwrap();
        assert_eq!(parse(bearer).await.err(), Some(UpgradeError::NotUpgradable));
        let err = UpgradeError::UnsupportedVersion.into_response();
        assert_eq!(err.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(err.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
