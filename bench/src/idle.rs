//! `idle`: hold N connections for the duration, answering the server's pings, then report how
//! many held (still open and, with `--probe`, still echoing). With `--server-pid`, the
//! server's RSS growth divided by the connections held is the memory one idle connection
//! costs.
//!
//! One process can hold only as many sockets as its open-file limit allows (20,000 on the
//! machines this was written for), so above that the parent runs worker processes, each
//! holding a share: each worker prints `READY <connected> <failed>` once connected, holds until
//! the parent writes a line on its stdin (or closes it), then prints its JSON report. The
//! parent measures the server while everything is held and adds the workers' counts up.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cli::IdleArgs;
use crate::conn::{Connector, Ws, close_gracefully, try_connect_many};
use crate::payload;
use crate::procfs;
use crate::report::{Report, thousands};
use crate::run::Harness;

/// Source addresses when `--source-ips` is not given.
const DEFAULT_SOURCES: u16 = 64;
/// File descriptors a process keeps for itself besides its connections.
const SPARE_FDS: u64 = 100;

/// How one held connection ended.
enum Outcome {
    Held,
    Dropped(String),
    ProbeFailed(String),
}

/// Counts over all connections (and workers).
#[derive(Debug, Default, Clone)]
struct Counts {
    requested: u64,
    connected: u64,
    connect_failed: u64,
    held: u64,
    dropped: u64,
    probe_failed: u64,
    first_error: Option<String>,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requested += o.requested;
        self.connected += o.connected;
        self.connect_failed += o.connect_failed;
        self.held += o.held;
        self.dropped += o.dropped;
        self.probe_failed += o.probe_failed;
        if self.first_error.is_none() {
            self.first_error = o.first_error.clone();
        }
    }

    fn from_json(v: &Value) -> Counts {
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Counts {
            requested: n("requested"),
            connected: n("connected"),
            connect_failed: n("connect_failed"),
            held: n("held"),
            dropped: n("dropped"),
            probe_failed: n("probe_failed"),
            first_error: v
                .get("first_error")
                .and_then(Value::as_str)
                .map(String::from),
        }
    }

    fn write(&self, r: &mut Report) {
        r.set("requested", self.requested);
        r.set("connected", self.connected);
        r.set("connect_failed", self.connect_failed);
        r.set("held", self.held);
        r.set("dropped", self.dropped);
        r.set("probe_failed", self.probe_failed);
        r.set(
            "first_error",
            self.first_error
                .clone()
                .map(Value::from)
                .unwrap_or(Value::Null),
        );
    }
}

/// Connections being held: each task waits for `stop`, then probes and closes.
struct Holding {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
    counts: Counts,
}

async fn open_and_hold(args: &IdleArgs, n: u64, first_index: u64) -> Result<Holding, String> {
    let common = &args.common;
    let connector = Connector::new(
        &common.url,
        common.source_ips.unwrap_or(DEFAULT_SOURCES),
        common.timeout,
    )
    .await?;
    let urls = (first_index..first_index + n)
        .map(|i| (i, common.url.clone()))
        .collect();
    let opened = try_connect_many(
        &connector,
        urls,
        args.connect_concurrency as usize,
        common.rate,
    )
    .await;
    let stop = CancellationToken::new();
    let counts = Counts {
        requested: n,
        connected: opened.conns.len() as u64,
        connect_failed: opened.failed,
        first_error: opened.first_error,
        ..Counts::default()
    };
    let tasks = opened
        .conns
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            tokio::spawn(hold_one(
                ws,
                (first_index + i as u64) as u32,
                stop.clone(),
                args.probe,
                common.timeout,
            ))
        })
        .collect();
    Ok(Holding {
        stop,
        tasks,
        counts,
    })
}

impl Holding {
    /// Ends the hold: every connection probes and closes; returns the counts.
    async fn release(mut self) -> Counts {
        self.stop.cancel();
        for t in self.tasks {
            match t.await {
                Ok(Outcome::Held) => self.counts.held += 1,
                Ok(Outcome::Dropped(e)) => {
                    self.counts.dropped += 1;
                    self.counts.first_error.get_or_insert(e);
                }
                Ok(Outcome::ProbeFailed(e)) => {
                    self.counts.probe_failed += 1;
                    self.counts.first_error.get_or_insert(e);
                }
                Err(e) => {
                    self.counts.dropped += 1;
                    self.counts.first_error.get_or_insert(e.to_string());
                }
            }
        }
        self.counts
    }
}

async fn hold_one(
    mut ws: Ws,
    index: u32,
    stop: CancellationToken,
    probe: bool,
    timeout: Duration,
) -> Outcome {
    // Reading is what answers the server's pings.
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            got = ws.next() => match got {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(f))) => {
                    return Outcome::Dropped(format!(
                        "the server closed an idle connection ({})",
                        f.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default()
                    ));
                }
                Some(Ok(other)) => {
                    return Outcome::Dropped(format!("unexpected message on an idle connection: {other:?}"));
                }
                Some(Err(e)) => return Outcome::Dropped(format!("idle connection failed: {e}")),
                None => return Outcome::Dropped("idle connection ended".into()),
            }
        }
    }
    if probe {
        let msg = payload::echo_message(payload::ECHO_HEADER, index, 0, 0);
        let check = async {
            ws.send(Message::Binary(msg.clone()))
                .await
                .map_err(|e| format!("probe send failed: {e}"))?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        return match payload::echo_mismatch(&msg, &b) {
                            None => Ok(()),
                            Some(why) => Err(format!("probe: {why}")),
                        };
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(other)) => return Err(format!("probe: got {other:?}")),
                    Some(Err(e)) => return Err(format!("probe read failed: {e}")),
                    None => return Err("probe: the connection ended".into()),
                }
            }
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Outcome::ProbeFailed(e),
            Err(_) => return Outcome::ProbeFailed(format!("probe: no echo within {timeout:?}")),
        }
    }
    // The close is courtesy: the count is already decided.
    let _ = close_gracefully(&mut ws, timeout).await;
    Outcome::Held
}

pub async fn run(args: IdleArgs) -> Result<Report, String> {
    if let Some(w) = args.worker_index {
        return worker(args.clone(), w).await;
    }
    let common = &args.common;
    let n = args.connections as u64;
    let per_process = procfs::raise_nofile_limit()
        .saturating_sub(SPARE_FDS)
        .max(1);
    let workers = args
        .workers
        .map(u64::from)
        .unwrap_or_else(|| n.div_ceil(per_process))
        .clamp(1, n);
    if n.div_ceil(workers) > per_process {
        return Err(format!(
            "{} connections per worker exceed the open-file limit ({per_process} usable): use --workers {}",
            n.div_ceil(workers),
            n.div_ceil(per_process)
        ));
    }
    let rss_before = common.server_pid.and_then(procfs::rss_bytes);
    let started = Instant::now();
    let mut r = Report::new("idle");
    let (counts, harness_out, window, connect_secs) = if workers == 1 {
        let holding = open_and_hold(&args, n, 0).await?;
        let connect_secs = started.elapsed().as_secs_f64();
        let harness = Harness::start(common, "held")?;
        harness
            .counter
            .store(holding.counts.connected, Ordering::Relaxed);
        let window = harness.window;
        tokio::time::sleep_until(window.end.into()).await;
        let out = harness.finish().await;
        (holding.release().await, out, window, connect_secs)
    } else {
        let mut children = spawn_workers(&args, n, workers)?;
        let mut connected = 0;
        for c in &mut children {
            connected += c
                .ready(common.timeout * 4 + Duration::from_millis(10) * c.share as u32)
                .await?;
        }
        let connect_secs = started.elapsed().as_secs_f64();
        let harness = Harness::start(common, "held")?;
        harness.counter.store(connected, Ordering::Relaxed);
        let window = harness.window;
        tokio::time::sleep_until(window.end.into()).await;
        let out = harness.finish().await;
        let mut counts = Counts::default();
        for c in &mut children {
            c.release().await?;
        }
        for c in children {
            counts.add(&c.report(common.timeout * 4).await?);
        }
        (counts, out, window, connect_secs)
    };
    let (edges, scrapes) = harness_out;
    r.set("workers", workers);
    r.set("connect_s", (connect_secs * 100.0).round() / 100.0);
    counts.write(&mut r);
    r.line(format!(
        "idle           {} of {} connections held for {:.1} s ({} worker process(es); connecting took {connect_secs:.1} s)",
        thousands(counts.held as f64),
        thousands(n as f64),
        window.measured().as_secs_f64(),
        workers
    ));
    if counts.connect_failed + counts.dropped + counts.probe_failed > 0 {
        r.line(format!(
            "not held       {} failed to connect, {} dropped, {} failed the probe; first: {}",
            counts.connect_failed,
            counts.dropped,
            counts.probe_failed,
            counts.first_error.as_deref().unwrap_or("-")
        ));
    }
    if let (Some(before), Some(after)) = (rss_before, edges.server_rss) {
        r.set("server_rss_before_bytes", before);
        r.set("server_rss_after_bytes", after);
        if counts.held > 0 {
            let per = after.saturating_sub(before) as f64 / counts.held as f64;
            r.set("server_rss_per_conn_bytes", per.round());
            r.line(format!(
                "server RSS     {:.1} MiB -> {:.1} MiB: {:.0} bytes ({:.2} KiB) per held connection",
                before as f64 / 1048576.0,
                after as f64 / 1048576.0,
                per,
                per / 1024.0
            ));
        }
    }
    r.common(common, &window, &edges, scrapes, counts.held, "held");
    if counts.held == 0 {
        r.error(format!(
            "no connection held; first error: {}",
            counts.first_error.as_deref().unwrap_or("-")
        ));
    }
    Ok(r)
}

/// A worker's side: connect, say READY, hold until the parent says so, report.
async fn worker(args: IdleArgs, index: u32) -> Result<Report, String> {
    let n = args.connections as u64;
    let holding = open_and_hold(&args, n, args.first_index).await?;
    {
        let mut out = tokio::io::stdout();
        let line = format!(
            "READY {} {}\n",
            holding.counts.connected, holding.counts.connect_failed
        );
        out.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("worker {index}: cannot write to the parent: {e}"))?;
        out.flush().await.map_err(|e| e.to_string())?;
    }
    // Hold until the parent writes a line or goes away, never longer than the run's bound.
    let bound = args.common.warmup + args.common.duration + Duration::from_secs(60);
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let _ = tokio::time::timeout(bound, stdin.read_line(&mut line)).await;
    let counts = holding.release().await;
    let mut r = Report::new("idle-worker");
    r.set("worker_index", index);
    counts.write(&mut r);
    Ok(r)
}

struct Child {
    index: u32,
    share: u64,
    child: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

fn spawn_workers(args: &IdleArgs, n: u64, workers: u64) -> Result<Vec<Child>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let c = &args.common;
    let mut out = Vec::new();
    let mut first = 0u64;
    for w in 0..workers {
        let share = n / workers + u64::from(w < n % workers);
        let mut cmd = Command::new(&exe);
        cmd.arg("idle")
            .args(["--url", &c.url])
            .args(["--connections", &share.to_string()])
            .args(["--warmup", &format!("{}ms", c.warmup.as_millis())])
            .args(["--duration", &format!("{}ms", c.duration.as_millis())])
            .args(["--timeout", &format!("{}ms", c.timeout.as_millis())])
            .args([
                "--connect-concurrency",
                &args.connect_concurrency.to_string(),
            ])
            .args(["--probe", &args.probe.to_string()])
            .args(["--worker-index", &w.to_string()])
            .args(["--first-index", &first.to_string()])
            .args(["--threads", "1"])
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(s) = c.source_ips {
            cmd.args(["--source-ips", &s.to_string()]);
        }
        if let Some(rate) = c.rate {
            cmd.args(["--rate", &(rate / workers as f64).to_string()]);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start worker {w}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        out.push(Child {
            index: w as u32,
            share,
            child,
            stdout: BufReader::new(stdout).lines(),
        });
        first += share;
    }
    Ok(out)
}

impl Child {
    /// Waits for `READY <connected> <failed>`; returns the connected count.
    async fn ready(&mut self, within: Duration) -> Result<u64, String> {
        let line = tokio::time::timeout(within, self.stdout.next_line())
            .await
            .map_err(|_| format!("worker {} was not connected within {within:?}", self.index))?
            .map_err(|e| format!("worker {}: {e}", self.index))?
            .ok_or_else(|| format!("worker {} exited before connecting", self.index))?;
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
            (Some("READY"), Some(n)) => Ok(n),
            _ => Err(format!(
                "worker {} said `{line}` instead of READY",
                self.index
            )),
        }
    }

    /// Tells the worker to stop holding.
    async fn release(&mut self) -> Result<(), String> {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"END\n").await;
        }
        Ok(())
    }

    /// Reads the worker's JSON report and waits for it to exit.
    async fn report(mut self, within: Duration) -> Result<Counts, String> {
        let line = tokio::time::timeout(within, self.stdout.next_line())
            .await
            .map_err(|_| format!("worker {} did not report within {within:?}", self.index))?
            .map_err(|e| format!("worker {}: {e}", self.index))?
            .ok_or_else(|| format!("worker {} exited without a report", self.index))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| format!("worker {} report is not JSON ({e}): {line}", self.index))?;
        let _ = tokio::time::timeout(within, self.child.wait()).await;
        Ok(Counts::from_json(&v))
    }
}
