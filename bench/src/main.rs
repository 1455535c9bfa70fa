//! `wsotel-bench`: the load client for wsotel and the reference servers it is compared with.
//!
//! Modes `echo`, `ingest`, `rooms`, `idle` and `churn` each print a human summary, or with
//! `--json` exactly one JSON object; a wrong reply (or a server that stops answering) makes the
//! run exit 1 with the reason on stderr, so a broken server cannot look fast. `otlp-sink` is a
//! discard-only OTLP/gRPC receiver for the full-telemetry runs of `scripts/bench`, and
//! `floor-server` a plain axum echo server without telemetry, the floor wsotel is measured
//! against.

mod churn;
mod cli;
mod conn;
mod echo;
mod floor_server;
mod hist;
mod idle;
mod ingest;
mod otlp_sink;
mod payload;
mod procfs;
mod progress;
mod report;
mod rooms;
mod run;
mod scrape;
mod window;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, Mode};

fn main() -> ExitCode {
    let cli = Cli::parse();
    procfs::raise_nofile_limit();
    if let Mode::FloorServer(args) = cli.mode {
        // The runtime a plain application gets (wsotel's too): one worker per core.
        return match tokio::runtime::Runtime::new() {
            Ok(rt) => match rt.block_on(floor_server::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fatal(&e),
            },
            Err(e) => fatal(&format!("cannot start the runtime: {e}")),
        };
    }
    payload::now_ns(); // start the payload clock
    let threads = cli
        .mode
        .common()
        .and_then(|c| c.threads)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fatal(&format!("cannot start the runtime: {e}")),
    };
    if let Mode::OtlpSink(args) = cli.mode {
        return match runtime.block_on(otlp_sink::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(&e),
        };
    }
    let common = cli.mode.common().expect("a load mode").clone();
    let name = cli.mode.name();
    let bound = hard_bound(&cli.mode);
    let result = runtime.block_on(async move {
        let work = async {
            match cli.mode {
                Mode::Echo(a) => echo::run(a).await,
                Mode::Ingest(a) => ingest::run(a).await,
                Mode::Rooms(a) => rooms::run(a).await,
                Mode::Idle(a) => idle::run(a).await,
                Mode::Churn(a) => churn::run(a).await,
                Mode::OtlpSink(_) | Mode::FloorServer(_) => unreachable!("handled above"),
            }
        };
        tokio::time::timeout(bound, work)
            .await
            .unwrap_or_else(|_| Err(format!("the run did not finish within {bound:?}")))
    });
    // Connections still open are dropped here, without waiting for their tasks.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(report) => {
            report.print(common.json);
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            if common.json {
                let mut r = report::Report::new(name);
                r.error(e.clone());
                r.print(true);
            } else {
                eprintln!("wsotel-bench: error: {e}");
            }
            ExitCode::from(1)
        }
    }
}

/// The longest a load run may take, all waits included: warm-up, duration, a minute for
/// connecting and closing, and 5 ms per connection beyond that.
fn hard_bound(mode: &Mode) -> Duration {
    let c = mode.common().expect("a load mode");
    let conns = match mode {
        Mode::Echo(a) => a.connections,
        Mode::Ingest(a) => a.connections,
        Mode::Rooms(a) => a.rooms * a.members,
        Mode::Idle(a) => a.connections,
        Mode::Churn(a) => a.connections,
        Mode::OtlpSink(_) | Mode::FloorServer(_) => 0,
    };
    c.warmup
        + c.duration
        + Duration::from_secs(60)
        + c.timeout * 4
        + Duration::from_millis(5) * conns
}

fn fatal(msg: &str) -> ExitCode {
    eprintln!("wsotel-bench: error: {msg}");
    ExitCode::from(1)
}
