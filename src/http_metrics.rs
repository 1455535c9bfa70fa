//! `http.server.request.duration` for every HTTP request of the admin listener (the WebSocket
//! routes' layer records theirs, the upgrade included: its duration ends at the
//! `101 Switching Protocols` response).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::telemetry::Events;

/// Middleware recording one request; install with
/// `.layer(middleware::from_fn_with_state(events, http_metrics::record))`.
pub async fn record(State(events): State<Events>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_name(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    events.http_request(method, route, response.status().as_u16(), start.elapsed());
    response
}

/// The method as the semantic conventions want it: a known method, else `_OTHER`.
pub(crate) fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}
