//! A Prometheus-style scraper: `GET <url>` every interval during the run, as a real Prometheus
//! would, so that what the server pays for a scrape is part of the measurement.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Scrapes done and failed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scrapes {
    pub ok: u64,
    pub failed: u64,
    pub bytes: u64,
}

/// `http://host:port/path` split into the address to connect to, the Host header and the path.
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("scrape URL `{url}` must start with http://"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if hostport.is_empty() {
        return Err(format!("scrape URL `{url}` has no host"));
    }
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok((hostport, path.to_string()))
}

/// One scrape: returns the body length, or why it failed.
async fn scrape_once(hostport: &str, path: &str, timeout: Duration) -> Result<u64, String> {
    let work = async {
        let mut s = TcpStream::connect(hostport)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: text/plain\r\n\
             User-Agent: wsotel-bench\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(64 * 1024);
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let head_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP header")?;
        let status = String::from_utf8_lossy(&buf[..buf.len().min(12)]).to_string();
        if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
            return Err(format!("status `{status}`"));
        }
        Ok((buf.len() - head_end - 4) as u64)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Scrapes `url` every `interval` until `stop`; the first scrape happens at once.
pub fn spawn(
    url: &str,
    interval: Duration,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<Scrapes>, String> {
    let (hostport, path) = split_url(url)?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut totals = Scrapes::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match scrape_once(&hostport, &path, interval.max(Duration::from_secs(2))).await {
                Ok(n) => {
                    totals.ok += 1;
                    totals.bytes += n;
                }
                Err(_) => totals.failed += 1,
            }
        }
        totals
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:9464/metrics").unwrap(),
            ("127.0.0.1:9464".into(), "/metrics".into())
        );
        assert_eq!(
            split_url("http://localhost").unwrap(),
            ("localhost:80".into(), "/metrics".into())
        );
        assert!(split_url("https://x/metrics").is_err());
    }
}
