//! What every load mode shares: the measured window, rate pacing, the failure record that stops
//! a run at the first wrong reply, and the samples taken at the window's edges (server CPU and
//! RSS from /proc, the client's own CPU).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::procfs;
use crate::progress::Progress;
use crate::scrape::{self, Scrapes};

pub use crate::window::Window;

/// Spaces sends evenly at a fixed rate (absolute deadlines, so timer lateness does not lower
/// the rate). Without a rate every send is allowed at once.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    /// `rate` per second for this one sender; `phase` in [0, 1) staggers senders so they do
    /// not all fire on the same tick.
    pub fn new(rate: Option<f64>, start: Instant, phase: f64) -> Self {
        let interval = rate
            .filter(|r| *r > 0.0 && r.is_finite())
            .map(|r| Duration::from_secs_f64(1.0 / r));
        let next = match interval {
            Some(iv) => start + iv.mul_f64(phase.clamp(0.0, 1.0)),
            None => start,
        };
        Pacer { interval, next }
    }

    pub fn limited(&self) -> bool {
        self.interval.is_some()
    }

    pub fn ready(&self, now: Instant) -> bool {
        self.interval.is_none() || now >= self.next
    }

    /// Uses up the current slot.
    pub fn take(&mut self) {
        if let Some(iv) = self.interval {
            self.next += iv;
        }
    }

    /// When the next send is allowed, if rate limited.
    pub fn next_at(&self) -> Option<Instant> {
        self.interval.map(|_| self.next)
    }
}

/// Failures seen by any task. The first one cancels the run: once a reply is wrong, nothing
/// after it is worth measuring.
#[derive(Debug, Default)]
pub struct Failures {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
    stop: CancellationToken,
}

/// How many failure messages are kept for the report.
const KEPT: usize = 10;

impl Failures {
    pub fn fail(&self, msg: impl Into<String>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < KEPT {
            s.push(msg.into());
        }
        self.stop.cancel();
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when the run is stopped by a failure.
    pub async fn wait_stopped(&self) {
        self.stop.cancelled().await
    }
}

/// The samples taken at the edges of the measured window.
#[derive(Debug, Default, Clone, Copy)]
pub struct Edges {
    /// Server CPU seconds (utime + stime) spent inside the window.
    pub server_cpu_s: Option<f64>,
    /// Server RSS at the end of the window.
    pub server_rss: Option<u64>,
    /// This client's CPU seconds inside the window.
    pub client_cpu_s: f64,
}

/// Samples server and client CPU at `window.measure_start` and `window.end`.
pub fn sample_edges(window: Window, pids: Vec<u32>) -> tokio::task::JoinHandle<Edges> {
    // The CPU seconds of every server, summed; None if any cannot be read.
    fn cpu(pids: &[u32]) -> Option<f64> {
        if pids.is_empty() {
            return None;
        }
        pids.iter().map(|&p| procfs::cpu_seconds(p)).sum()
    }
    tokio::spawn(async move {
        tokio::time::sleep_until(window.measure_start.into()).await;
        let s0 = cpu(&pids);
        let c0 = procfs::own_cpu();
        tokio::time::sleep_until(window.end.into()).await;
        let s1 = cpu(&pids);
        let c1 = procfs::own_cpu();
        Edges {
            server_cpu_s: s0.zip(s1).map(|(a, b)| b - a),
            server_rss: pids.first().copied().and_then(procfs::rss_bytes),
            client_cpu_s: (c1.saturating_sub(c0)).as_secs_f64(),
        }
    })
}

/// The parts of a run that live beside the load: the window, the progress bar, the edge
/// samples and the scraper.
pub struct Harness {
    pub window: Window,
    /// Units of work done so far (for the progress bar).
    pub counter: Arc<AtomicU64>,
    progress: Progress,
    edges: tokio::task::JoinHandle<Edges>,
    scraper: Option<(CancellationToken, tokio::task::JoinHandle<Scrapes>)>,
}

impl Harness {
    /// Starts the window now.
    pub fn start(common: &Common, unit: &'static str) -> Result<Self, String> {
        let window = Window::starting_now(common.warmup, common.duration);
        let counter = Arc::new(AtomicU64::new(0));
        let scraper = match &common.scrape {
            Some(url) => {
                let stop = CancellationToken::new();
                let task = scrape::spawn(url, common.scrape_interval, stop.clone())?;
                Some((stop, task))
            }
            None => None,
        };
        Ok(Harness {
            window,
            progress: Progress::start(window, counter.clone(), unit),
            counter,
            edges: sample_edges(
                window,
                common
                    .server_pid
                    .into_iter()
                    .chain(common.also_server_pid.iter().copied())
                    .collect(),
            ),
            scraper,
        })
    }

    /// Stops the scraper and the progress bar; returns the edge samples.
    pub async fn finish(self) -> (Edges, Option<Scrapes>) {
        self.progress.finish();
        // The edge sampler ends at window.end; if the run stopped early, do not wait for it.
        let edges = if Instant::now() >= self.window.end {
            self.edges.await.unwrap_or_default()
        } else {
            self.edges.abort();
            Edges::default()
        };
        let scrapes = match self.scraper {
            Some((stop, task)) => {
                stop.cancel();
                Some(task.await.unwrap_or_default())
            }
            None => None,
        };
        (edges, scrapes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_sends() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(1000.0), t0, 0.5);
        assert!(!p.ready(t0));
        assert_eq!(p.next_at(), Some(t0 + Duration::from_micros(500)));
        p.take();
        assert_eq!(p.next_at(), Some(t0 + Duration::from_micros(1500)));
        let free = Pacer::new(None, t0, 0.0);
        assert!(free.ready(t0) && !free.limited() && free.next_at().is_none());
    }

    #[test]
    fn first_failure_stops_the_run() {
        let f = Failures::default();
        assert!(!f.stopped());
        for i in 0..20 {
            f.fail(format!("bad {i}"));
        }
        assert!(f.stopped());
        assert_eq!(f.count(), 20);
        assert_eq!(f.samples().len(), KEPT);
    }

    #[test]
    fn window_edges() {
        let w = Window::starting_now(Duration::from_secs(1), Duration::from_secs(2));
        assert!(!w.contains(w.start));
        assert!(w.contains(w.measure_start));
        assert!(!w.contains(w.end));
        assert_eq!(w.measured(), Duration::from_secs(2));
    }
}
