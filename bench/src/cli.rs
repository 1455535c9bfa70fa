//! The command line: one subcommand per load mode, sharing the options every mode has.
//!
//! Every load is bounded: `--warmup` then `--duration` of measured time, a fixed number of
//! connections, and hard timeouts on every wait, so a hung server ends the run with an error
//! instead of hanging it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Load client for wsotel and the reference servers.
#[derive(Debug, Parser)]
#[command(name = "wsotel-bench", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// C connections, each a closed loop of P-byte messages with D in flight; every echo must
    /// equal what was sent. Reports msgs/s and latency percentiles.
    Echo(EchoArgs),
    /// C connections sending as fast as they can. Anything that comes back (wsotel has no
    /// ingest-only endpoint, so its echo endpoint is used) is read, checked against what was
    /// sent and discarded. Each connection ends with a close handshake, which the server can
    /// only answer after it has read every message before it.
    Ingest(IngestArgs),
    /// R rooms with M members each; publishers send at `--rate`; every member checks what it
    /// receives. Reports delivery rate and publish-to-delivery latency.
    Rooms(RoomsArgs),
    /// Holds N connections and reports how many held (and, with `--server-pid`, the server's
    /// RSS per connection). Above the per-process open-file limit it runs worker processes.
    Idle(IdleArgs),
    /// Connect, one message (checked), normal close, repeat. Reports connections per second.
    Churn(ChurnArgs),
    /// A discard-only OTLP/gRPC receiver (traces, metrics, logs) for full-telemetry runs.
    OtlpSink(SinkArgs),
    /// A plain axum WebSocket echo server on `/ws/echo` with wsotel's buffer sizes and no
    /// telemetry at all: the floor `scripts/bench` compares wsotel with (`axum-plain`).
    FloorServer(FloorArgs),
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Echo(_) => "echo",
            Mode::Ingest(_) => "ingest",
            Mode::Rooms(_) => "rooms",
            Mode::Idle(_) => "idle",
            Mode::Churn(_) => "churn",
            Mode::OtlpSink(_) => "otlp-sink",
            Mode::FloorServer(_) => "floor-server",
        }
    }

    /// The shared options, for the load modes.
    pub fn common(&self) -> Option<&Common> {
        match self {
            Mode::Echo(a) => Some(&a.common),
            Mode::Ingest(a) => Some(&a.common),
            Mode::Rooms(a) => Some(&a.common),
            Mode::Idle(a) => Some(&a.common),
            Mode::Churn(a) => Some(&a.common),
            Mode::OtlpSink(_) | Mode::FloorServer(_) => None,
        }
    }
}

/// Options every load mode has.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// WebSocket URL, e.g. ws://127.0.0.1:8080/ws/echo (rooms: a URL containing `{room}`, or a
    /// base such as ws://127.0.0.1:8080/ws/rooms to which `/<room>` is appended).
    #[arg(long)]
    pub url: String,

    /// Measured time, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Time under load before measuring starts (not counted). `0s` for none.
    #[arg(long, default_value = "2s", value_parser = parse_duration_or_zero)]
    pub warmup: Duration,

    /// Rate limit over all connections, per second: messages (echo, ingest, rooms publishes),
    /// connections opened (idle, churn). Unlimited when absent.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Print exactly one JSON object on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,

    /// PID of the server: its CPU time (utime+stime from /proc) over the measured window, and
    /// its RSS, go into the report.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Further server PIDs whose CPU time adds to `--server-pid`'s (the other instances of a
    /// multi-instance run, so the report's server CPU is the whole cluster's). Repeatable.
    #[arg(long)]
    pub also_server_pid: Vec<u32>,

    /// A Prometheus endpoint to scrape during the whole run (a real scrape is part of the cost
    /// of a server with Prometheus pull), e.g. http://127.0.0.1:9464/metrics.
    #[arg(long)]
    pub scrape: Option<String>,

    /// How often to scrape `--scrape`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub scrape_interval: Duration,

    /// Client runtime threads (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Spread connections over this many source addresses 127.0.0.2, 127.0.0.3, ... (loopback
    /// targets only), so more than ~28,000 connections can reach one server port. 0: let the
    /// kernel choose. Default: 0 for echo, ingest and rooms; 64 for idle and churn.
    #[arg(long)]
    pub source_ips: Option<u16>,

    /// Longest wait for any one reply, handshake or close before it counts as an error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Message size in bytes (at least 24: sequence number, timestamp, connection id).
    #[arg(long, short = 's', default_value_t = 64, value_parser = clap::value_parser!(u32).range(24..=16_777_216))]
    pub size: u32,
    /// Messages in flight per connection.
    #[arg(long, short = 'd', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub depth: u32,
}

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 64, value_parser = clap::value_parser!(u32).range(24..=16_777_216))]
    pub size: u32,
    /// Messages written per flush (one write syscall when they fit the socket buffer).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
}

#[derive(Debug, Clone, Args)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rooms.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rooms: u32,
    /// Members per room (at least 2: the server sends to the other members only).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    pub members: u32,
    /// Publishing members per room (they receive the others' messages too).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub publishers: u32,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 64, value_parser = clap::value_parser!(u32).range(32..=16_777_216))]
    pub size: u32,
    /// Prefix of the room names (`<prefix>-<index>`), so runs do not share rooms.
    #[arg(long, default_value = "bench")]
    pub room_prefix: String,
    /// Abusive clients in the first room: each sends text messages as fast as the socket takes
    /// them for the whole run and reconnects whenever the server closes it. The members count
    /// what reaches them separately; their own publications are measured as always, so a run
    /// with and one without show what one abuser does to well-behaved clients.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub flooders: u32,
    /// Further instances of the server (their room URLs, like `--url`), joined through a
    /// backplane: member i of each room connects to instance i mod N (`--url` is instance 0), so
    /// most deliveries cross instances. The report splits latency into same-instance and
    /// cross-instance deliveries. Repeatable.
    #[arg(long)]
    pub also_url: Vec<String>,
    /// A member the server closes (a slow-consumer policy, say) stops quietly and is counted
    /// (`members_closed`, by close code) while the others go on; what it would have received
    /// counts as missing. Without it, the first close fails the run.
    #[arg(long)]
    pub allow_closes: bool,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to hold.
    #[arg(long, short = 'c', default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,
    /// Worker processes holding a share each (default: as many as the open-file limit needs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: Option<u32>,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connect_concurrency: u32,
    /// At the end, send one message on every held connection and require its echo (needs an
    /// echo endpoint). `--probe false` to skip.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub probe: bool,
    /// Internal: run as worker number N of a parent `idle` (reports on stdout, waits for the
    /// parent on stdin).
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,
    /// Internal: global index of this worker's first connection (spreads source addresses).
    #[arg(long, hide = true, default_value_t = 0)]
    pub first_index: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent connect-message-close loops.
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 64, value_parser = clap::value_parser!(u32).range(24..=16_777_216))]
    pub size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// Address for OTLP/gRPC (port 0: any free port; the bound address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:4317")]
    pub listen: SocketAddr,
    /// Stop after this long (default: run until SIGTERM or SIGINT).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the final counts as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A slow collector: answer every export only after this long (it is still received).
    #[arg(long, value_parser = parse_duration, conflicts_with = "blackhole")]
    pub delay: Option<Duration>,
    /// A blackholed collector: accept TCP connections, then never read from them nor answer.
    #[arg(long)]
    pub blackhole: bool,
}

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Address to serve on (port 0: any free port; the bound address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 10s or 500ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode() {
        Cli::command_for_test().debug_assert();
        let cli = Cli::try_parse_from([
            "wsotel-bench",
            "echo",
            "--url",
            "ws://127.0.0.1:1/ws/echo",
            "-c",
            "3",
            "-d",
            "16",
            "--warmup",
            "0s",
            "--json",
        ])
        .unwrap();
        match cli.mode {
            Mode::Echo(a) => {
                assert_eq!((a.connections, a.depth, a.size), (3, 16, 64));
                assert!(a.common.warmup.is_zero() && a.common.json);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["wsotel-bench", "echo", "--url", "x", "-s", "8"]).is_err());
        assert!(
            Cli::try_parse_from(["wsotel-bench", "idle", "--url", "x", "--probe", "false"]).is_ok()
        );
        match Cli::try_parse_from(["wsotel-bench", "floor-server", "--addr", "127.0.0.1:0"]) {
            Ok(Cli {
                mode: Mode::FloorServer(a),
            }) => assert_eq!(a.addr.port(), 0),
            other => panic!("{other:?}"),
        }
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
