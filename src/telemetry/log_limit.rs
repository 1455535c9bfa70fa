//! Bounded logs: connection-level log lines are rate-limited per event, so a client cannot turn
//! the log into an amplifier (thousands of refused handshakes a second must not write thousands
//! of lines a second). What is held back is counted, reported in one line per event every
//! [`REPORT_EVERY`], and in `websocket.server.log.suppressed`.
//!
//! The budget is per event and per one-second window: `--log-rate` lines of each event in any
//! second are written, the rest only counted. Metrics are never limited: every refusal, error and
//! close is still counted exactly.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often suppressed lines are reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// A connection-level log event with its own budget (`event` on `websocket.server.log.suppressed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEvent {
    /// `connection opened`.
    ConnectionOpened,
    /// `connection closed`.
    ConnectionClosed,
    /// `handshake rejected`, and sockets refused before any request (limits, timeouts, bad
    /// requests).
    HandshakeRejected,
    /// Errors on open connections: protocol errors, I/O errors, slow consumers, heartbeat and
    /// write timeouts, rate limits.
    ConnectionError,
}

impl LogEvent {
    /// Every event, in storage order.
    pub const ALL: [LogEvent; 4] = [
        LogEvent::ConnectionOpened,
        LogEvent::ConnectionClosed,
        LogEvent::HandshakeRejected,
        LogEvent::ConnectionError,
    ];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogEvent::ConnectionOpened => "connection_opened",
            LogEvent::ConnectionClosed => "connection_closed",
            LogEvent::HandshakeRejected => "handshake_rejected",
            LogEvent::ConnectionError => "connection_error",
        }
    }
}

/// One event's budget.
#[derive(Default)]
struct Budget {
    /// The one-second window (seconds since the limiter started) the count is for.
    window: AtomicU64,
    /// Lines written in that window.
    written: AtomicU32,
    /// Lines held back since the last report.
    suppressed: AtomicU64,
}

/// Per-event log budgets, shared by every connection.
pub struct LogLimiter {
    started: Instant,
    per_second: AtomicU32,
    budgets: [Budget; LogEvent::ALL.len()],
}

impl LogLimiter {
    /// A limiter that lets `per_second` lines of each event through in any second (`0`: no
    /// limit).
    pub fn new(per_second: u32) -> Self {
        LogLimiter {
            started: Instant::now(),
            per_second: AtomicU32::new(per_second),
            budgets: Default::default(),
        }
    }

    /// Changes the budget (`--log-rate`, set when the server starts).
    pub fn set_rate(&self, per_second: u32) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// Whether a line of `event` may be written now; when not, it is counted as suppressed.
    pub fn allow(&self, event: LogEvent) -> bool {
        let per_second = self.per_second.load(Ordering::Relaxed);
        if per_second == 0 {
            return true;
        }
        let budget = &self.budgets[event as usize];
        let now = self.started.elapsed().as_secs();
        if budget.window.load(Ordering::Relaxed) != now {
            // A new second: whoever swaps the window resets the count. A race between two
            // threads here can let a handful of extra lines through, never an unbounded number.
            if budget.window.swap(now, Ordering::Relaxed) != now {
                budget.written.store(0, Ordering::Relaxed);
            }
        }
        if budget.written.fetch_add(1, Ordering::Relaxed) < per_second {
            true
        } else {
            budget.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Takes the counts suppressed since the last call, per event (zeros included).
    pub fn take_suppressed(&self) -> [(LogEvent, u64); LogEvent::ALL.len()] {
        LogEvent::ALL.map(|e| {
            (
                e,
                self.budgets[e as usize]
                    .suppressed
                    .swap(0, Ordering::Relaxed),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_event_per_second() {
        let l = LogLimiter::new(3);
        let allowed = (0..10)
            .filter(|_| l.allow(LogEvent::ConnectionClosed))
            .count();
        assert_eq!(allowed, 3);
        // Another event has its own budget.
        assert!(l.allow(LogEvent::HandshakeRejected));
        let taken = l.take_suppressed();
        assert_eq!(taken[LogEvent::ConnectionClosed as usize].1, 7);
        assert_eq!(taken[LogEvent::HandshakeRejected as usize].1, 0);
        assert_eq!(
            l.take_suppressed()[LogEvent::ConnectionClosed as usize].1,
            0
        );
    }

    #[test]
    fn zero_means_no_limit() {
        let l = LogLimiter::new(0);
        assert!((0..10_000).all(|_| l.allow(LogEvent::ConnectionOpened)));
    }
}
