//! Server configuration: command-line flags, each with a `WSOTEL_<FLAG>` environment fallback.
//!
//! Telemetry export is configured the OpenTelemetry way (`OTEL_*` variables, see
//! [`crate::telemetry`]); this module holds only what the WebSocket server itself needs.
//! Every default runs: `wsotel` with no flags serves on `0.0.0.0:8080` with its admin
//! endpoints on `127.0.0.1:9464`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The whole server configuration, parsed by clap from flags and `WSOTEL_*` variables.
#[derive(Debug, Clone, Parser)]
#[command(name = "wsotel", version, about)]
pub struct Config {
    /// Address of the WebSocket listener.
    #[arg(long, env = "WSOTEL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`). Kept apart from the
    /// WebSocket listener so metrics are never exposed on the public port by accident.
    #[arg(long, env = "WSOTEL_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    pub admin_listen: SocketAddr,

    /// How often the server pings each connection (e.g. `20s`).
    #[arg(long, env = "WSOTEL_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed as
    /// `heartbeat_timeout`.
    #[arg(long, env = "WSOTEL_PONG_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub pong_timeout: Duration,

    /// Largest message a client may send (bytes, or with a KiB/MiB suffix); larger ones close
    /// the connection with 1009.
    #[arg(long, env = "WSOTEL_MAX_MESSAGE_SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Most concurrent WebSocket connections; further upgrades get 503.
    #[arg(long, env = "WSOTEL_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Messages that may wait for one room member before it counts as a slow consumer and is
    /// disconnected with close code 1008 (reason `slow_consumer`).
    #[arg(long, env = "WSOTEL_OUTBOUND_QUEUE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub outbound_queue: u32,

    /// An Origin allowed besides the request's own Host (repeatable; exact match such as
    /// `https://app.example.com`, or `*` for any).
    #[arg(
        long = "allowed-origin",
        env = "WSOTEL_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// How long shutdown waits for connections to finish their closing handshake.
    #[arg(long, env = "WSOTEL_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long a client may take to send its complete upgrade request headers.
    #[arg(long, env = "WSOTEL_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Format of the log lines on stdout.
    #[arg(long, env = "WSOTEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// A configuration for tests and embedders: every default, with loopback listeners.
    pub fn for_tests() -> Self {
        Config::parse_from([
            "wsotel",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
    }
}

/// Parses a humane duration such as `20s`, `500ms` or `1m30s`; zero is refused because every
/// duration here is a timeout or an interval.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 20s or 500ms"))?;
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

/// Parses a size in bytes with an optional `B`, `KiB`, `MiB` (or `K`, `M`) suffix.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size; use e.g. 65536, 64KiB or 1MiB"))?;
    let mult = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("`{s}` has an unknown unit; use B, KiB or MiB")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("`{s}` must be greater than zero")),
        Some(v) if v <= 1 << 30 => Ok(v),
        _ => Err(format!("`{s}` is too large (at most 1GiB)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999999999MiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn defaults_run() {
        let c = Config::parse_from(["wsotel"]);
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.max_message_size, 64 * 1024);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.ping_interval, Duration::from_secs(20));
        assert_eq!(c.pong_timeout, Duration::from_secs(10));
    }

    #[test]
    fn repeatable_origins() {
        let c = Config::parse_from([
            "wsotel",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
        ]);
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }
}
