//! The routes and label pairs the tests assert on, as `/metrics` spells them.

/// The echo route's path.
pub const ECHO: &str = "/ws/echo";
pub const ECHO_ROUTE: (&str, &str) = ("http_route", "/ws/echo");
pub const ROOMS_ROUTE: (&str, &str) = ("http_route", "/ws/rooms/{room}");
pub const RX: (&str, &str) = ("network_io_direction", "receive");
pub const TX: (&str, &str) = ("network_io_direction", "transmit");

pub fn mtype(t: &'static str) -> (&'static str, &'static str) {
    ("websocket_message_type", t)
}

pub fn reason(r: &'static str) -> (&'static str, &'static str) {
    ("websocket_close_reason", r)
}

pub fn error_type(t: &'static str) -> (&'static str, &'static str) {
    ("error_type", t)
}
