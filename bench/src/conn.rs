//! Opening client connections: real WebSocket handshakes (masked frames, as any client must
//! send) over TCP with `TCP_NODELAY`, optionally from a spread of loopback source addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::run::Failures;

/// A client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Connector {
    /// The server's address, resolved once.
    pub addr: SocketAddr,
    /// Source addresses to spread connections over; empty: the kernel chooses.
    sources: Vec<Ipv4Addr>,
    config: WebSocketConfig,
    timeout: Duration,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect to {addr} failed: {err}")]
    Tcp {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("WebSocket handshake failed: {0}")]
    Handshake(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("connect did not finish within {0:?}")]
    Timeout(Duration),
}

impl Connector {
    /// Resolves `url`'s host once. `spread` source addresses (127.0.0.2, ...) are used only
    /// when the server is on IPv4 loopback.
    pub async fn new(url: &str, spread: u16, timeout: Duration) -> Result<Self, String> {
        let req = url
            .into_client_request()
            .map_err(|e| format!("`{url}` is not a WebSocket URL: {e}"))?;
        let uri = req.uri();
        let host = uri
            .host()
            .ok_or_else(|| format!("`{url}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        match uri.scheme_str() {
            Some("ws") => {}
            Some(other) => {
                return Err(format!(
                    "`{url}`: scheme {other} is not supported (ws only)"
                ));
            }
            None => return Err(format!("`{url}` has no scheme")),
        }
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} resolves to no address"))?;
        let sources = match addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => (0..spread.min(253))
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Connector {
            addr,
            sources,
            // A small read buffer: tungstenite zero-fills all of it before each read, and the
            // bench's messages are small. Writes are buffered until each flush (the default),
            // so a batch of messages goes out in one write.
            config: WebSocketConfig::default().read_buffer_size(8 * 1024),
            timeout,
        })
    }

    /// Source addresses in use (0: the kernel chooses).
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// Opens connection number `index` to `url` (which must name the same server).
    pub async fn connect(&self, url: &str, index: u64) -> Result<Ws, ConnectError> {
        tokio::time::timeout(self.timeout, self.connect_inner(url, index))
            .await
            .map_err(|_| ConnectError::Timeout(self.timeout))?
    }

    async fn connect_inner(&self, url: &str, index: u64) -> Result<Ws, ConnectError> {
        let tcp_err = |err| ConnectError::Tcp {
            addr: self.addr,
            err,
        };
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(tcp_err)?;
        if !self.sources.is_empty() {
            let src = self.sources[(index % self.sources.len() as u64) as usize];
            // Choose the port at connect time, per destination, not at bind time: without
            // this every bound socket needs a port of its own per source address.
            set_bind_address_no_port(&socket);
            socket
                .bind(SocketAddr::new(IpAddr::V4(src), 0))
                .map_err(tcp_err)?;
        }
        let stream = socket.connect(self.addr).await.map_err(tcp_err)?;
        stream.set_nodelay(true).map_err(tcp_err)?;
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(self.config)).await?;
        Ok(ws)
    }
}

/// Opens `n` connections to `url`, `concurrency` handshakes at a time. Any failure is a
/// failure of the run: a load that starts short of connections measures something else.
pub async fn connect_all(
    connector: &Connector,
    url: &str,
    n: u32,
    concurrency: usize,
    failures: &Failures,
) -> Result<Vec<Ws>, String> {
    connect_many(
        connector,
        vec![url.to_string(); n as usize],
        concurrency,
        failures,
    )
    .await
}

/// Opens one connection per URL (all on the connector's server), in order.
pub async fn connect_many(
    connector: &Connector,
    urls: Vec<String>,
    concurrency: usize,
    failures: &Failures,
) -> Result<Vec<Ws>, String> {
    let n = urls.len();
    let urls: Vec<(u64, String)> = urls
        .into_iter()
        .enumerate()
        .map(|(i, u)| (i as u64, u))
        .collect();
    let opened = try_connect_many(connector, urls, concurrency, None).await;
    if let Some(e) = opened.first_error {
        let msg = format!("{} of {n} connections failed; first: {e}", opened.failed);
        failures.fail(msg.clone());
        return Err(format!("cannot open the connections: {msg}"));
    }
    Ok(opened.conns)
}

/// Connections opened by [`try_connect_many`], and how many could not be.
pub struct Opened {
    pub conns: Vec<Ws>,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Opens a connection for each `(index, url)`, `concurrency` at a time and at most `rate`
/// per second; failures are counted, not fatal.
pub async fn try_connect_many(
    connector: &Connector,
    urls: Vec<(u64, String)>,
    concurrency: usize,
    rate: Option<f64>,
) -> Opened {
    let t0 = tokio::time::Instant::now();
    let rate = rate.filter(|r| *r > 0.0 && r.is_finite());
    let results: Vec<Result<Ws, ConnectError>> =
        futures_util::stream::iter(urls.into_iter().enumerate())
            .map(|(k, (index, url))| async move {
                if let Some(r) = rate {
                    tokio::time::sleep_until(t0 + Duration::from_secs_f64(k as f64 / r)).await;
                }
                connector.connect(&url, index).await
            })
            .buffered(concurrency.max(1))
            .collect()
            .await;
    let mut opened = Opened {
        conns: Vec::with_capacity(results.len()),
        failed: 0,
        first_error: None,
    };
    for r in results {
        match r {
            Ok(ws) => opened.conns.push(ws),
            Err(e) => {
                opened.failed += 1;
                opened.first_error.get_or_insert(e.to_string());
            }
        }
    }
    opened
}

/// Sends a normal Close and waits for the server's Close, ignoring data still arriving.
pub async fn close_gracefully(ws: &mut Ws, timeout: Duration) -> Result<(), String> {
    close_reading(ws, timeout, |_| Ok(())).await
}

/// Sends a normal Close and waits for the server's Close, handing every message that still
/// arrives meanwhile to `on_message` (an error from it ends the wait with that error).
pub async fn close_reading(
    ws: &mut Ws,
    timeout: Duration,
    mut on_message: impl FnMut(tokio_tungstenite::tungstenite::Message) -> Result<(), String>,
) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::Error;
    let work = async {
        match ws.close(None).await {
            Ok(()) | Err(Error::ConnectionClosed | Error::AlreadyClosed) => {}
            Err(e) => return Err(format!("sending Close failed: {e}")),
        }
        loop {
            match ws.next().await {
                None | Some(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => return Ok(()),
                Some(Ok(msg)) => on_message(msg)?,
                Some(Err(e)) => return Err(format!("closing handshake failed: {e}")),
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("the server did not answer Close within {timeout:?}"))?
}

fn set_bind_address_no_port(socket: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value that outlives the call. Failure only
    // means ports are chosen at bind time, which still works for fewer connections.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_urls_and_spreads_only_on_loopback() {
        let c = Connector::new("ws://127.0.0.1:9/ws/echo", 3, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(c.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.source_count(), 3);
        assert!(
            Connector::new("http://127.0.0.1:9/", 0, Duration::from_secs(1))
                .await
                .is_err()
        );
        assert!(
            Connector::new("not a url", 0, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
