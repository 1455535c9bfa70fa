//! A one-line progress bar on stderr, drawn only when stdout is a terminal (never when the
//! output goes to a file or a script).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::window::Window;

/// A running progress bar; dropping it (or [`Progress::finish`]) clears the line.
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Draws the phase, the time left and the rate of `counter` (in `unit`s per second).
    pub fn start(window: Window, counter: Arc<AtomicU64>, unit: &'static str) -> Self {
        if !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let task = tokio::spawn(async move {
            let total = window.end - window.start;
            let mut last = (Instant::now(), counter.load(Ordering::Relaxed));
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let now = Instant::now();
                let n = counter.load(Ordering::Relaxed);
                let dt = now.duration_since(last.0).as_secs_f64();
                let rate = if dt > 0.0 {
                    (n - last.1) as f64 / dt
                } else {
                    0.0
                };
                last = (now, n);
                let done = now.saturating_duration_since(window.start);
                let frac = (done.as_secs_f64() / total.as_secs_f64()).min(1.0);
                let width = 30;
                let filled = (frac * width as f64) as usize;
                let phase = if now < window.measure_start {
                    "warm-up"
                } else if now < window.end {
                    "measure"
                } else {
                    "closing"
                };
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r[{}{}] {:>3.0}% {phase} {:>10.0} {unit}/s ",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    frac * 100.0,
                    rate
                );
                let _ = err.flush();
            }
        });
        Progress { task: Some(task) }
    }

    pub fn finish(mut self) {
        self.clear();
    }

    fn clear(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{:79}\r", "");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}
