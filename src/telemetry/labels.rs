//! The bounded vocabularies that metric attributes are drawn from.
//!
//! Every attribute value that can reach a metric is one of these enums' `&'static str`s, so no
//! client input (a room name, a close code, a user agent) can ever create a new series.

/// The route a connection came in on (`http.route`): the route template the application
/// registered (axum's `MatchedPath`, such as `/ws/rooms/{room}`), never the request's path.
/// Templates come from the application's route table, so the set is bounded; the registry in
/// [`Events`](super::Events) also caps it at [`Route::MAX`] (later ones count as
/// [`Route::OTHER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route(&'static str);

impl Route {
    /// Most distinct routes recorded; beyond them, [`Route::OTHER`].
    pub const MAX: usize = 64;
    /// A request without a matched route, or a route past [`Route::MAX`].
    pub const OTHER: Route = Route("_OTHER");

    /// A route whose template is known at compile time.
    pub const fn from_static(template: &'static str) -> Self {
        Route(template)
    }

    /// The route template, as `http.route` wants it.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// `network.io.direction`, seen from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the server.
    Receive,
    /// From the server to the client.
    Transmit,
}

impl Direction {
    /// Both directions, in storage order.
    pub const ALL: [Direction; 2] = [Direction::Receive, Direction::Transmit];

    /// The semantic-convention value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Receive => "receive",
            Direction::Transmit => "transmit",
        }
    }
}

/// `websocket.message.type`: the WebSocket frame kind of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// A text data message.
    Text,
    /// A binary data message.
    Binary,
    /// A ping control frame.
    Ping,
    /// A pong control frame.
    Pong,
    /// A close control frame.
    Close,
}

impl MessageType {
    /// All kinds, in storage order.
    pub const ALL: [MessageType; 5] = [
        MessageType::Text,
        MessageType::Binary,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Close,
    ];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Text => "text",
            MessageType::Binary => "binary",
            MessageType::Ping => "ping",
            MessageType::Pong => "pong",
            MessageType::Close => "close",
        }
    }

    /// Text and binary messages carry application data; the others are control frames.
    pub fn is_data(self) -> bool {
        matches!(self, MessageType::Text | MessageType::Binary)
    }
}

/// `websocket.close.reason`: why a connection ended, mapped from close codes and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed with 1000, or with a Close frame without a code (1005).
    Normal,
    /// The client closed with 1001 (page navigated away, client shutting down).
    GoingAway,
    /// The TCP connection ended without a Close frame (reset, crash, network loss).
    ClientAborted,
    /// No pong arrived within `--pong-timeout` of a ping.
    HeartbeatTimeout,
    /// A message exceeded `--max-message-size` (close 1009), or the client closed with 1009.
    MessageTooBig,
    /// A text message was not valid UTF-8 (close 1007), or the client closed with 1007.
    InvalidPayload,
    /// The client broke the WebSocket protocol (close 1002), or closed with 1002.
    ProtocolError,
    /// The client closed with 1008, or another policy code (1003).
    PolicyViolation,
    /// The server disconnected a room member whose outbound queue was full (close 1008).
    SlowConsumer,
    /// The server is shutting down (close 1001).
    ServerShutdown,
    /// Something failed inside the server (close 1011), or the client closed with 1011.
    InternalError,
    /// The client closed with a code outside the ones above (application codes 3000-4999...).
    Other,
    /// A room member published faster than `--publish-rate`/`--publish-burst` allow (close
    /// 1008 "rate limit exceeded").
    RateLimited,
    /// A write made no progress for `--write-timeout` (a client that does not read); the
    /// connection is cut.
    WriteTimeout,
    /// The connection's token expired (close 1008 "token expired").
    TokenExpired,
    /// A room member sent to a room its token does not let it publish to (close 1008
    /// "publish not allowed").
    PublishForbidden,
}

impl CloseReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [CloseReason; 16] = [
        CloseReason::Normal,
        CloseReason::GoingAway,
        CloseReason::ClientAborted,
        CloseReason::HeartbeatTimeout,
        CloseReason::MessageTooBig,
        CloseReason::InvalidPayload,
        CloseReason::ProtocolError,
        CloseReason::PolicyViolation,
        CloseReason::SlowConsumer,
        CloseReason::ServerShutdown,
        CloseReason::InternalError,
        CloseReason::Other,
        CloseReason::RateLimited,
        CloseReason::WriteTimeout,
        CloseReason::TokenExpired,
        CloseReason::PublishForbidden,
    ];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::GoingAway => "going_away",
            CloseReason::ClientAborted => "client_aborted",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::InvalidPayload => "invalid_payload",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::PolicyViolation => "policy_violation",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::InternalError => "internal_error",
            CloseReason::Other => "other",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::PublishForbidden => "publish_forbidden",
        }
    }

    /// Maps a close code the client sent to a bounded reason: a client-chosen code never
    /// becomes a new series.
    pub fn from_client_code(code: Option<u16>) -> Self {
        match code {
            None | Some(1000) | Some(1005) => CloseReason::Normal,
            Some(1001) => CloseReason::GoingAway,
            Some(1002) => CloseReason::ProtocolError,
            Some(1003) | Some(1008) => CloseReason::PolicyViolation,
            Some(1007) => CloseReason::InvalidPayload,
            Some(1009) => CloseReason::MessageTooBig,
            Some(1011) => CloseReason::InternalError,
            Some(_) => CloseReason::Other,
        }
    }
}

/// `websocket.close.initiator`: which side decided the connection ends. Read with
/// [`CloseReason`]: `internal_error` from a client (it closed with 1011) is its own business,
/// from the server it is a server fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseInitiator {
    /// The client sent the first Close (any code), or dropped the TCP connection.
    Client,
    /// The server sent the first Close (an error it found, shutdown, slow consumer, a panic),
    /// or cut the connection (heartbeat timeout, an I/O failure).
    Server,
}

impl CloseInitiator {
    /// Both sides.
    pub const ALL: [CloseInitiator; 2] = [CloseInitiator::Client, CloseInitiator::Server];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseInitiator::Client => "client",
            CloseInitiator::Server => "server",
        }
    }
}

/// `error.type` on `websocket.server.rejected_connections`: why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The `Origin` header matched neither the Host nor an `--allowed-origin` (403).
    OriginDenied,
    /// `--max-connections` connections are already open (503).
    ConnectionLimit,
    /// The request was not a valid WebSocket upgrade (missing headers, wrong version...).
    BadRequest,
    /// The room name is not 1-64 characters of `[A-Za-z0-9._-]` (400).
    InvalidRoom,
    /// The server is draining (503).
    ShuttingDown,
    /// The client did not send its request headers within `--handshake-timeout`.
    HandshakeTimeout,
    /// The client asked for a subprotocol (`Sec-WebSocket-Protocol`) and the server speaks
    /// none (400).
    UnsupportedSubprotocol,
    /// Authentication is on and the request carries no token (401).
    TokenMissing,
    /// The token does not verify, is malformed or names an unknown key (401).
    TokenInvalid,
    /// The token has expired (401).
    TokenExpired,
    /// The token does not grant the room (403).
    RoomForbidden,
    /// The client address has `--max-connections-per-ip` connections open (429).
    IpLimit,
    /// A connection from this client address was closed for exceeding the publish rate less
    /// than `--rate-limit-penalty` ago (429).
    RateLimitPenalty,
    /// Too many sockets (in all, or from this address) have not finished their upgrade: the
    /// new socket is closed at once.
    PendingLimit,
    /// The WebSocket listener is at its share of the open-file limit (descriptors kept in
    /// reserve for the admin listener): the new socket is closed at once.
    DescriptorLimit,
    /// The request head is over 16 KiB (431, answered by the HTTP layer).
    HeaderTooLarge,
    /// The request is not valid HTTP/1.1 (400, answered by the HTTP layer).
    MalformedRequest,
}

impl RejectReason {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::OriginDenied => "origin_denied",
            RejectReason::ConnectionLimit => "connection_limit",
            RejectReason::BadRequest => "bad_request",
            RejectReason::InvalidRoom => "invalid_room",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::HandshakeTimeout => "handshake_timeout",
            RejectReason::UnsupportedSubprotocol => "unsupported_subprotocol",
            RejectReason::TokenMissing => "token_missing",
            RejectReason::TokenInvalid => "token_invalid",
            RejectReason::TokenExpired => "token_expired",
            RejectReason::RoomForbidden => "room_forbidden",
            RejectReason::IpLimit => "ip_limit",
            RejectReason::RateLimitPenalty => "rate_limit_penalty",
            RejectReason::PendingLimit => "pending_limit",
            RejectReason::DescriptorLimit => "descriptor_limit",
            RejectReason::HeaderTooLarge => "header_too_large",
            RejectReason::MalformedRequest => "malformed_request",
        }
    }
}

/// `error.type` on `websocket.server.errors`: what went wrong on an open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// A message over `--max-message-size`.
    MessageTooBig,
    /// Invalid UTF-8 in a text message.
    InvalidUtf8,
    /// A WebSocket protocol violation (bad opcode, unmasked frame, reserved bits...).
    Protocol,
    /// An I/O error other than the peer going away.
    Io,
    /// No pong within the timeout.
    HeartbeatTimeout,
    /// A room member could not keep up and was disconnected.
    SlowConsumer,
    /// A connection task panicked.
    Panic,
    /// A room member exceeded its publish rate.
    RateLimited,
    /// A write made no progress for `--write-timeout`.
    WriteTimeout,
    /// A room member sent to a room it may not publish to.
    PublishForbidden,
}

impl ErrorType {
    /// Every error type.
    pub const ALL: [ErrorType; 10] = [
        ErrorType::MessageTooBig,
        ErrorType::InvalidUtf8,
        ErrorType::Protocol,
        ErrorType::Io,
        ErrorType::HeartbeatTimeout,
        ErrorType::SlowConsumer,
        ErrorType::Panic,
        ErrorType::RateLimited,
        ErrorType::WriteTimeout,
        ErrorType::PublishForbidden,
    ];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::MessageTooBig => "message_too_big",
            ErrorType::InvalidUtf8 => "invalid_utf8",
            ErrorType::Protocol => "protocol_error",
            ErrorType::Io => "io",
            ErrorType::HeartbeatTimeout => "heartbeat_timeout",
            ErrorType::SlowConsumer => "slow_consumer",
            ErrorType::Panic => "panic",
            ErrorType::RateLimited => "rate_limited",
            ErrorType::WriteTimeout => "write_timeout",
            ErrorType::PublishForbidden => "publish_forbidden",
        }
    }
}

/// `reason` on `websocket.server.dropped_messages`: why a message was never delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The recipient's outbound queue was full.
    SlowConsumer,
    /// The recipient's connection ended with the message still queued.
    ConnectionClosed,
    /// The message could not cross to other instances: NATS was away (or the publish failed).
    BackplaneUnavailable,
    /// The message could not cross to other instances: the backplane's publish queue was full.
    BackplaneFull,
}

impl DropReason {
    /// Every drop reason.
    pub const ALL: [DropReason; 4] = [
        DropReason::SlowConsumer,
        DropReason::ConnectionClosed,
        DropReason::BackplaneUnavailable,
        DropReason::BackplaneFull,
    ];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::ConnectionClosed => "connection_closed",
            DropReason::BackplaneUnavailable => "backplane_unavailable",
            DropReason::BackplaneFull => "backplane_full",
        }
    }
}

/// `error.type` values of `websocket.server.backplane.errors` (a fixed set: they start at 0).
pub const BACKPLANE_ERROR_TYPES: [&str; 6] = [
    "send",
    "max_payload",
    "invalid_subject",
    "slow_consumer",
    "server_error",
    "client_error",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_codes_stay_bounded() {
        let mut seen = std::collections::HashSet::new();
        for code in 0..=u16::MAX {
            seen.insert(CloseReason::from_client_code(Some(code)).as_str());
        }
        seen.insert(CloseReason::from_client_code(None).as_str());
        assert!(seen.len() <= CloseReason::ALL.len());
        assert_eq!(
            CloseReason::from_client_code(Some(4321)),
            CloseReason::Other
        );
        assert_eq!(
            CloseReason::from_client_code(Some(1000)),
            CloseReason::Normal
        );
    }
}
