//! Test harness: the real `run` on loopback port 0, a `/metrics` scraper and parser, raw HTTP,
//! free ports and scratch directories; WebSocket clients (`ws`), the label pairs tests assert
//! on (`labels`), the real binary (`process`) and the OTLP receiver (`otlp`).
#![allow(dead_code)]

pub mod labels;
pub mod otlp;
pub mod process;
pub mod ws;

// Re-exported so that `use common::*` brings them; a test binary may use none of them.
#[allow(unused_imports)]
pub use labels::*;
#[allow(unused_imports)]
pub use ws::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wsotel::{Config, Telemetry};

/// A server started in-process with `run`.
pub struct TestServer {
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub telemetry: Arc<Telemetry>,
    pub handle: JoinHandle<Result<(), wsotel::ServerError>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_tests();
        adjust(&mut config);
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ws_addr, admin_addr) = (ws.local_addr().unwrap(), admin.local_addr().unwrap());
        let telemetry = Arc::new(Telemetry::standalone().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(wsotel::run(
            ws,
            admin,
            config,
            telemetry.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        TestServer {
            ws: ws_addr,
            admin: admin_addr,
            stop: Some(tx),
            telemetry,
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws, path)
    }

    /// Starts the drain; `handle` finishes when it is done.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn metrics(&self) -> Metrics {
        scrape(self.admin).await
    }

    /// The same exposition, rendered in-process: still readable after `run` has returned.
    pub fn rendered(&self) -> Metrics {
        Metrics::parse(&self.telemetry.render_prometheus().unwrap())
    }

    /// Polls `/metrics` until `pred` holds (at most 10 s), and returns that scrape.
    pub async fn metrics_when(&self, what: &str, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        scrape_when(self.admin, what, pred).await
    }

    /// Waits until no connection is open.
    pub async fn idle(&self) -> Metrics {
        idle_at(self.admin).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// `GET /metrics` on an admin listener (in-process or the binary's), parsed; it must answer 200.
pub async fn scrape(admin: SocketAddr) -> Metrics {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    Metrics::parse(&body)
}

/// Polls `admin`'s `/metrics` until `pred` holds (at most 10 s), and returns that scrape.
pub async fn scrape_when(
    admin: SocketAddr,
    what: &str,
    pred: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(admin).await;
        if pred(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no connection is open on the server of this admin listener.
pub async fn idle_at(admin: SocketAddr) -> Metrics {
    scrape_when(admin, "active connections back to 0", |m| {
        m.sum("websocket_server_active_connections", &[]) == 0.0
    })
    .await
}

/// A free loopback port for a server that is not ours to bind (it binds the port itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory for one test's files under cargo's temporary directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `<CARGO_TARGET_TMPDIR>/<name>-<pid>`, created empty.
    pub fn new(name: &str) -> Self {
        Scratch::at(
            PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("{name}-{}", std::process::id())),
        )
    }

    /// `dir`, created empty.
    pub fn at(dir: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// The path of `name` in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` in it; returns the file's path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends a raw request; returns status and body. Reads the head, then the body by
/// Content-Length or chunks, or to EOF; the connection may stay open.
pub async fn http_request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let lower = head.to_ascii_lowercase();
                let length = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let complete = match length {
                    Some(len) => body.len() >= len,
                    None if lower.contains("transfer-encoding: chunked") => {
                        body.contains("\r\n0\r\n\r\n") || body.starts_with("0\r\n")
                    }
                    None => n == 0,
                };
                if complete || n == 0 {
                    return text;
                }
            } else if n == 0 {
                return text;
            }
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("HTTP response within 10 s");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: family name to type.
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                types.insert(it.next().unwrap().to_owned(), it.next().unwrap().to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(parse_sample(line));
        }
        Metrics {
            text: text.to_owned(),
            samples,
            types,
        }
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum of the matching samples (0 when none match).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether any sample named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Sample {
    let (head, value) = line.rsplit_once(' ').unwrap();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    let (name, labels) = match head.split_once('{') {
        None => (head.to_owned(), BTreeMap::new()),
        Some((name, rest)) => {
            let rest = rest.strip_suffix('}').unwrap();
            let mut labels = BTreeMap::new();
            let mut chars = rest.chars().peekable();
            loop {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                if key.is_empty() {
                    break;
                }
                assert_eq!(chars.next(), Some('"'));
                let mut val = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('n') => val.push('\n'),
                            Some(c) => val.push(c),
                            None => break,
                        },
                        '"' => break,
                        c => val.push(c),
                    }
                }
                labels.insert(key.trim_start_matches(',').to_owned(), val);
                if chars.peek() == Some(&',') {
                    chars.next();
                }
            }
            (name.to_owned(), labels)
        }
    };
    Sample {
        name,
        labels,
        value,
    }
}
