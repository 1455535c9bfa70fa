//! The time window of a run: a warm-up, then the measured part.

use std::time::{Duration, Instant};

/// Warm-up then measurement; work is counted only inside `[measure_start, end)`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub measure_start: Instant,
    pub end: Instant,
}

impl Window {
    /// A window starting now.
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now();
        Window {
            start,
            measure_start: start + warmup,
            end: start + warmup + duration,
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        t >= self.measure_start && t < self.end
    }

    pub fn measured(&self) -> Duration {
        self.end - self.measure_start
    }

    /// `measure_start` on the payload clock ([`crate::payload::now_ns`]).
    pub fn measure_start_ns(&self) -> u64 {
        crate::payload::ns_at(self.measure_start)
    }
}
