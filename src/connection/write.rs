//! Bounded writes: a write that makes no progress ends the connection instead of holding it
//! (and its memory) for as long as a client chooses not to read.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::heartbeat::Heartbeat;
use crate::telemetry::CloseReason;

/// How a write ended.
pub(crate) enum Written<T> {
    /// It completed (successfully or not).
    Done(T),
    /// The connection was stopped while it waited.
    Stopped,
    /// It stalled past its bound: `write_timeout`, or `heartbeat_timeout` when the pong came
    /// due first.
    TimedOut(CloseReason),
}

/// How long a write may wait for the socket: `write_timeout`, or less when the heartbeat would
/// have ended the connection first (it keeps running while a write is pending). Worked out only
/// when a write has to wait.
#[derive(Clone, Copy)]
pub(crate) struct WriteBound<'h> {
    pub(crate) timeout: Duration,
    pub(crate) heartbeat: &'h Heartbeat,
}

impl WriteBound<'_> {
    /// The deadline of a write that starts waiting now, and why it would end there.
    fn deadline(&self) -> (Instant, CloseReason) {
        let pong_due = self.heartbeat.stall_deadline();
        let stall_until = Instant::now() + self.timeout;
        if pong_due < stall_until {
            (pong_due, CloseReason::HeartbeatTimeout)
        } else {
            (stall_until, CloseReason::WriteTimeout)
        }
    }
}

/// Runs a write. Most complete at once: then no timer is armed and no stop future made. One
/// that must wait races the stop signal and its bound, in a boxed future of its own (the
/// connection's future stays small for every idle connection).
pub(crate) async fn write<F: Future>(
    stop: &CancellationToken,
    bound: WriteBound<'_>,
    fut: F,
) -> Written<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Written::Done(out);
    }
    let (deadline, reason) = bound.deadline();
    Box::pin(async move {
        tokio::select! {
            biased;
            out = fut => Written::Done(out),
            _ = stop.cancelled() => Written::Stopped,
            _ = tokio::time::sleep_until(deadline) => Written::TimedOut(reason),
        }
    })
    .await
}
