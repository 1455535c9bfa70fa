//! The WebSocket opening handshake (RFC 6455 section 4.2) as an axum extractor.
//!
//! axum's own `WebSocketUpgrade` gives the handler a socket it cannot see under. The server needs
//! the raw byte stream to finish the closing handshake after a read error (see [`crate::wire`]),
//! so the upgrade is done here: [`UpgradeRequest`] validates the request, [`UpgradeRequest::accept`]
//! answers 101 and, once hyper hands over the connection, builds the tungstenite stream over a
//! [`Watched`] socket.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::telemetry::RejectReason;
use crate::wire::Watched;

/// An upgraded connection: tungstenite over the watched TCP stream.
pub type Socket = WebSocketStream<Watched<TokioIo<Upgraded>>>;

/// A valid WebSocket upgrade request, not yet answered.
pub struct UpgradeRequest {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The subprotocol the 101 names: only `wsotel.bearer`, when the client carries its token
    /// that way.
    protocol: Option<HeaderValue>,
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
    /// The client asked for a subprotocol (`Sec-WebSocket-Protocol`) other than the token
    /// carrier `wsotel.bearer, <token>`; the server speaks none, and a 101 without one makes a
    /// browser abort at once, so it is refused (400) where it can be counted and logged.
    UnsupportedSubprotocol,
}

impl UpgradeError {
    /// The HTTP status answered.
    pub fn status(self) -> StatusCode {
        match self {
            UpgradeError::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::UnsupportedVersion | UpgradeError::NotUpgradable => {
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeError::NotAnUpgrade
            | UpgradeError::MissingKey
            | UpgradeError::UnsupportedSubprotocol => StatusCode::BAD_REQUEST,
        }
    }

    /// The bounded `error.type` it is counted under.
    pub fn reason(self) -> RejectReason {
        match self {
            UpgradeError::UnsupportedSubprotocol => RejectReason::UnsupportedSubprotocol,
            _ => RejectReason::BadRequest,
        }
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
        let protocol = match h.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().count() {
            0 => None,
            1 if crate::auth::subprotocol_token(h).is_some() => {
                Some(HeaderValue::from_static(crate::auth::BEARER_PROTOCOL))
            }
            _ => return Err(UpgradeError::UnsupportedSubprotocol),
        };
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(UpgradeRequest {
            key,
            on_upgrade,
            protocol,
        })
    }
}

impl UpgradeRequest {
    /// Answers 101 Switching Protocols and, once hyper hands the connection over, runs
    /// `on_socket` with it on a task of its own. If the upgrade fails after the 101 (the client
    /// went away), `on_socket` never runs and is dropped.
    pub fn accept<F, Fut>(self, config: WebSocketConfig, on_socket: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let UpgradeRequest {
            key,
            on_upgrade,
            protocol,
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
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
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
            Some(UpgradeError::UnsupportedSubprotocol)
        );
        // The token carrier is the one subprotocol spoken (valid up to the upgrade handle).
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
