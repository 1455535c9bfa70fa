//! How a connection ends: who decided, why, and which Close frame (if any) the server sends;
//! and what a socket error means.

use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};

use crate::telemetry::{CloseInitiator, CloseReason, Closed, ErrorType};

/// Close codes the server sends (RFC 6455 section 7.4.1).
pub mod close_code {
    /// A normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: slow consumers, rate limits, expired tokens.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message exceeded the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server failed.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// How the connection ended, and the Close frame the server still has to send, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ending {
    pub(crate) closed: Closed,
    /// A Close frame still to send, when the server is the one closing.
    pub(crate) close: Option<(u16, &'static str)>,
}

impl Ending {
    /// The client went away without a Close (or after the closing handshake completed).
    pub(crate) fn client_gone(reason: CloseReason) -> Self {
        Ending {
            closed: Closed {
                reason,
                initiator: CloseInitiator::Client,
                code: None,
            },
            close: None,
        }
    }

    /// The client closed with `code` (tungstenite has queued the reply).
    pub(crate) fn client_closed(code: Option<u16>) -> Self {
        Ending {
            closed: Closed {
                reason: CloseReason::from_client_code(code),
                initiator: CloseInitiator::Client,
                code,
            },
            close: None,
        }
    }

    /// The server ends the connection without a closing handshake: the peer is presumed dead
    /// (heartbeat or write timeout) or the socket failed.
    pub(crate) fn server_cut(reason: CloseReason) -> Self {
        Ending {
            closed: Closed {
                reason,
                initiator: CloseInitiator::Server,
                code: None,
            },
            close: None,
        }
    }

    /// The server closes with `code`, which the application chose: its reason is the code's
    /// (as for a client's), its text the one [`close_frame`] has for that reason when the code
    /// is that reason's, else none.
    pub(crate) fn server_closes_with_code(code: u16) -> Self {
        let reason = CloseReason::from_client_code(Some(code));
        let text = close_frame(reason)
            .filter(|(c, _)| *c == code)
            .map_or("", |(_, text)| text);
        Ending {
            closed: Closed {
                reason,
                initiator: CloseInitiator::Server,
                code: Some(code),
            },
            close: Some((code, text)),
        }
    }

    /// The server closes for `reason`, with the Close frame [`close_frame`] gives it (cut
    /// without one for reasons that have none).
    pub(crate) fn server_closes(reason: CloseReason) -> Self {
        let close = close_frame(reason);
        Ending {
            closed: Closed {
                reason,
                initiator: CloseInitiator::Server,
                code: close.map(|(code, _)| code),
            },
            close,
        }
    }
}

/// The Close frame the server sends when it closes for `reason`: one table for every path.
/// `None` for reasons that end a connection without a closing handshake (a dead or
/// non-reading peer) or that only a client decides.
pub(crate) fn close_frame(reason: CloseReason) -> Option<(u16, &'static str)> {
    use close_code::*;
    Some(match reason {
        CloseReason::Normal | CloseReason::Other => (NORMAL, ""),
        CloseReason::GoingAway | CloseReason::ServerShutdown => {
            (GOING_AWAY, "server shutting down")
        }
        CloseReason::ProtocolError => (PROTOCOL_ERROR, "protocol error"),
        CloseReason::InvalidPayload => (INVALID_PAYLOAD, "invalid utf-8"),
        CloseReason::PolicyViolation => (POLICY_VIOLATION, "policy violation"),
        CloseReason::SlowConsumer => (POLICY_VIOLATION, "slow consumer"),
        CloseReason::RateLimited => (POLICY_VIOLATION, "rate limit exceeded"),
        CloseReason::PublishForbidden => (POLICY_VIOLATION, "publish not allowed"),
        CloseReason::TokenExpired => (POLICY_VIOLATION, "token expired"),
        CloseReason::MessageTooBig => (MESSAGE_TOO_BIG, "message too big"),
        CloseReason::InternalError => (INTERNAL_ERROR, "internal error"),
        CloseReason::ClientAborted | CloseReason::HeartbeatTimeout | CloseReason::WriteTimeout => {
            return None;
        }
    })
}

/// The error a server-side close for `reason` is counted as, when it is one.
pub(crate) fn error_of(reason: CloseReason) -> Option<ErrorType> {
    match reason {
        CloseReason::SlowConsumer => Some(ErrorType::SlowConsumer),
        CloseReason::RateLimited => Some(ErrorType::RateLimited),
        CloseReason::PublishForbidden => Some(ErrorType::PublishForbidden),
        _ => None,
    }
}

/// What a socket error means: how the connection ends, and the error it is counted as (none
/// when the client simply went away).
pub(crate) fn classify(err: &WsError) -> (Ending, Option<ErrorType>) {
    match err {
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            (Ending::client_gone(CloseReason::Normal), None)
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            (Ending::client_gone(CloseReason::ClientAborted), None)
        }
        WsError::Io(e) => match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => {
                (Ending::client_gone(CloseReason::ClientAborted), None)
            }
            _ => (
                Ending::server_cut(CloseReason::InternalError),
                Some(ErrorType::Io),
            ),
        },
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (
            Ending::server_closes(CloseReason::MessageTooBig),
            Some(ErrorType::MessageTooBig),
        ),
        WsError::Utf8(_) => (
            Ending::server_closes(CloseReason::InvalidPayload),
            Some(ErrorType::InvalidUtf8),
        ),
        WsError::Protocol(_) | WsError::Capacity(_) => (
            Ending::server_closes(CloseReason::ProtocolError),
            Some(ErrorType::Protocol),
        ),
        _ => (
            Ending::server_closes(CloseReason::InternalError),
            Some(ErrorType::Io),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_map_to_reasons_codes_and_errors() {
        let io = |kind| WsError::Io(std::io::Error::from(kind));
        let cases = [
            (WsError::ConnectionClosed, CloseReason::Normal, None, None),
            (
                io(std::io::ErrorKind::ConnectionReset),
                CloseReason::ClientAborted,
                None,
                None,
            ),
            (
                io(std::io::ErrorKind::PermissionDenied),
                CloseReason::InternalError,
                None,
                Some(ErrorType::Io),
            ),
            (
                WsError::Capacity(CapacityError::MessageTooLong {
                    size: 2,
                    max_size: 1,
                }),
                CloseReason::MessageTooBig,
                Some(1009),
                Some(ErrorType::MessageTooBig),
            ),
            (
                WsError::Protocol(ProtocolError::UnmaskedFrameFromClient),
                CloseReason::ProtocolError,
                Some(1002),
                Some(ErrorType::Protocol),
            ),
            (
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                CloseReason::ClientAborted,
                None,
                None,
            ),
        ];
        for (err, reason, code, error) in cases {
            let (ending, counted) = classify(&err);
            assert_eq!(ending.closed.reason, reason, "{err}");
            assert_eq!(ending.closed.code, code, "{err}");
            assert_eq!(ending.close.map(|c| c.0), code, "{err}");
            assert_eq!(counted, error, "{err}");
        }
    }

    #[test]
    fn every_server_close_has_one_frame() {
        for reason in CloseReason::ALL {
            let ending = Ending::server_closes(reason);
            assert_eq!(ending.closed.initiator, CloseInitiator::Server);
            assert_eq!(ending.close, close_frame(reason));
            if let Some((code, text)) = ending.close {
                assert!((1000..=1011).contains(&code), "{reason:?}");
                assert!(text.len() <= 123, "a Close reason fits a control frame");
            }
        }
        assert_eq!(
            close_frame(CloseReason::SlowConsumer),
            Some((1008, "slow consumer"))
        );
        assert_eq!(
            error_of(CloseReason::RateLimited),
            Some(ErrorType::RateLimited)
        );
        assert_eq!(error_of(CloseReason::ServerShutdown), None);
    }
}
