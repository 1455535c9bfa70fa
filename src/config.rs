//! Server configuration: command-line flags, each with a `WSOTEL_<FLAG>` environment fallback.
//!
//! Telemetry export is configured the OpenTelemetry way (`OTEL_*` variables, see
//! [`crate::telemetry`]); this module holds only what the WebSocket server itself needs.
//! Every default runs: `wsotel` with no flags serves on `0.0.0.0:8080` with its admin
//! endpoints on `127.0.0.1:9464`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::telemetry::logging::LogFormat;
use clap::{ArgGroup, Parser};

use crate::auth::{AuthSettings, KeySource};
use crate::sources::IpNet;

/// The whole server configuration, parsed by clap from flags and `WSOTEL_*` variables.
#[derive(Debug, Clone, Parser)]
#[command(name = "wsotel", version, about)]
#[command(group(ArgGroup::new("auth_key").multiple(false)))]
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

    /// Write coalescing for room members: a member that wrote less than this long ago waits
    /// until this long after that write, then writes everything queued for it at once (one
    /// write for many messages; earlier if its outbound queue is half full). A message for a
    /// member that has not written within it goes out at once. `0`: every message is written
    /// as it comes. At most 100ms.
    #[arg(long, env = "WSOTEL_ROOM_WRITE_DELAY", default_value = "2ms",
          value_parser = parse_room_write_delay)]
    pub room_write_delay: Duration,

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

    /// Messages per second one room member may publish on average (token-bucket refill); a
    /// member that exceeds it is closed with 1008 (`rate_limited`). `0`: no limit.
    #[arg(long, env = "WSOTEL_PUBLISH_RATE", default_value_t = 1000)]
    pub publish_rate: u32,

    /// Messages a room member may publish at once before the rate applies (the bucket's size).
    /// Keep it below `--outbound-queue`, so one member's burst never fills another's queue.
    #[arg(long, env = "WSOTEL_PUBLISH_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub publish_burst: u32,

    /// How long a client address whose connection was closed for exceeding the publish rate is
    /// refused new upgrades (429, `rate_limit_penalty`), so reconnecting does not refill its
    /// bucket. `0s`: no penalty.
    #[arg(long, env = "WSOTEL_RATE_LIMIT_PENALTY", default_value = "10s",
          value_parser = parse_duration_or_zero)]
    pub rate_limit_penalty: Duration,

    /// Most open WebSocket connections from one client address; further upgrades get 429
    /// (`ip_limit`). `0`: no limit.
    #[arg(long, env = "WSOTEL_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: u32,

    /// Most sockets that have not finished their upgrade, in all; a new socket beyond it is
    /// closed at once (`pending_limit`).
    #[arg(long, env = "WSOTEL_MAX_PENDING_HANDSHAKES", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes: u32,

    /// Most sockets from one address that have not finished their upgrade; a new one beyond it
    /// is closed at once (`pending_limit`).
    #[arg(long, env = "WSOTEL_MAX_PENDING_PER_IP", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_per_ip: u32,

    /// A write that makes no progress this long (a client that does not read) closes the
    /// connection (`write_timeout`).
    #[arg(long, env = "WSOTEL_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// A proxy (address or network, e.g. `10.0.0.0/8`) whose `X-Forwarded-For` names the client;
    /// repeatable. Its own sockets do not count against per-address limits.
    #[arg(
        long = "trusted-proxy",
        env = "WSOTEL_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<IpNet>,

    /// Lines per second of each connection-level log event (connection opened/closed, handshake
    /// rejected, connection errors); the rest are counted and reported every 10 s. `0`: no limit.
    #[arg(long, env = "WSOTEL_LOG_RATE", default_value_t = 50)]
    pub log_rate: u32,

    /// The NATS backplane (comma-separated URLs of a cluster's servers, e.g.
    /// `nats://127.0.0.1:4222`): room messages reach members on every instance. Unset: this
    /// instance's rooms are its own.
    #[arg(long, env = "WSOTEL_NATS_URL", value_parser = parse_nats_url)]
    pub nats_url: Option<String>,

    /// First token(s) of the backplane's subjects, so several deployments can share one NATS.
    #[arg(long, env = "WSOTEL_NATS_SUBJECT_PREFIX", default_value = "wsotel",
          value_parser = crate::backplane::parse_prefix)]
    pub nats_subject_prefix: String,

    /// Room messages that may wait in the NATS client's queue (for the connection to NATS);
    /// beyond, they are dropped (`backplane_full`) and stay local.
    #[arg(long, env = "WSOTEL_BACKPLANE_QUEUE", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub backplane_queue: u32,

    /// Authentication: a file holding the HS256 secret (at least 32 bytes) that signs tokens.
    #[arg(long, env = "WSOTEL_AUTH_HS256_SECRET_FILE", group = "auth_key")]
    pub auth_hs256_secret_file: Option<PathBuf>,

    /// Authentication: a PEM RSA public key that verifies RS256 tokens.
    #[arg(long, env = "WSOTEL_AUTH_RS256_PUBLIC_KEY_FILE", group = "auth_key")]
    pub auth_rs256_public_key_file: Option<PathBuf>,

    /// Authentication: a PEM P-256 public key that verifies ES256 tokens.
    #[arg(long, env = "WSOTEL_AUTH_ES256_PUBLIC_KEY_FILE", group = "auth_key")]
    pub auth_es256_public_key_file: Option<PathBuf>,

    /// Authentication: a JWKS file whose RS256/ES256 keys verify tokens, chosen by `kid`.
    #[arg(long, env = "WSOTEL_AUTH_JWKS_FILE", group = "auth_key")]
    pub auth_jwks_file: Option<PathBuf>,

    /// Authentication: the `aud` every token must carry.
    #[arg(long, env = "WSOTEL_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// Authentication: the `iss` every token must carry.
    #[arg(long, env = "WSOTEL_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
}

impl Config {
    /// The backplane settings: `Ok(None)` without `--nats-url`, an error for a malformed one
    /// (an embedder's `Config` is not parsed by clap).
    pub fn backplane(&self) -> Result<Option<crate::backplane::BackplaneSettings>, String> {
        let Some(url) = self.nats_url.as_deref() else {
            return Ok(None);
        };
        Ok(Some(crate::backplane::BackplaneSettings {
            servers: crate::backplane::parse_servers(url)?,
            prefix: crate::backplane::parse_prefix(&self.nats_subject_prefix)?,
            queue: self.backplane_queue as usize,
        }))
    }

    /// The authentication settings: which key (none means authentication is off), audience
    /// and issuer.
    pub fn auth(&self) -> AuthSettings {
        let key = if let Some(p) = &self.auth_hs256_secret_file {
            Some(KeySource::Hs256SecretFile(p.clone()))
        } else if let Some(p) = &self.auth_rs256_public_key_file {
            Some(KeySource::Rs256PublicKeyFile(p.clone()))
        } else if let Some(p) = &self.auth_es256_public_key_file {
            Some(KeySource::Es256PublicKeyFile(p.clone()))
        } else {
            self.auth_jwks_file.clone().map(KeySource::JwksFile)
        };
        AuthSettings {
            key,
            audience: self.auth_audience.clone(),
            issuer: self.auth_issuer.clone(),
        }
    }

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

/// Checks `--nats-url` (every comma-separated entry a NATS URL) and keeps it as given.
fn parse_nats_url(s: &str) -> Result<String, String> {
    crate::backplane::parse_servers(s).map(|_| s.to_owned())
}

/// Like [`parse_duration`], but zero is allowed (it turns the feature off).
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// The longest `--room-write-delay` accepted: beyond a few tens of milliseconds the delay is no
/// longer coalescing writes but holding messages back (a busy member then writes whenever its
/// queue is half full rather than once per window).
pub const MAX_ROOM_WRITE_DELAY: Duration = Duration::from_millis(100);

/// Parses `--room-write-delay`: a duration such as `2ms`, from `0` (off) to
/// [`MAX_ROOM_WRITE_DELAY`].
pub fn parse_room_write_delay(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d > MAX_ROOM_WRITE_DELAY {
        return Err(format!(
            "`{s}` is too long (at most {}ms)",
            MAX_ROOM_WRITE_DELAY.as_millis()
        ));
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
    fn room_write_delays() {
        let d = |s| parse_room_write_delay(s);
        assert_eq!(d("0"), Ok(Duration::ZERO), "zero turns it off");
        assert_eq!(d("0ms"), Ok(Duration::ZERO));
        assert_eq!(d("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(d("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(d("100ms"), Ok(MAX_ROOM_WRITE_DELAY));
        assert!(d("101ms").is_err(), "bounded");
        assert!(d("1s").is_err());
        assert!(d("2").is_err(), "a unit is needed, as for every duration");
        assert!(d("soon").is_err());
        let c = Config::parse_from(["wsotel", "--room-write-delay", "5ms"]);
        assert_eq!(c.room_write_delay, Duration::from_millis(5));
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
        assert_eq!(c.auth().key, None, "authentication is off by default");
        assert_eq!(c.room_write_delay, Duration::from_millis(2));
        assert!(
            c.publish_burst < c.outbound_queue,
            "one burst never fills a queue"
        );
    }

    #[test]
    fn one_auth_key_at_most() {
        let two = Config::try_parse_from([
            "wsotel",
            "--auth-hs256-secret-file",
            "a",
            "--auth-jwks-file",
            "b",
        ]);
        assert!(two.is_err());
        let c = Config::parse_from(["wsotel", "--trusted-proxy", "10.0.0.0/8,192.168.1.1"]);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(Config::try_parse_from(["wsotel", "--trusted-proxy", "10.0.0.0/99"]).is_err());
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
