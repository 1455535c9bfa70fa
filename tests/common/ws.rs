//! WebSocket clients: tungstenite ones (connect, read, close) and hand-made ones over raw TCP
//! (the upgrade written by hand, frames built byte by byte).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket client (a URL or a [`Request`]), panicking with the HTTP answer if the
/// upgrade fails.
pub async fn connect(request: impl IntoClientRequest + Unpin) -> Client {
    let request = request.into_client_request().unwrap();
    let uri = request.uri().clone();
    let (ws, resp) = tokio_tungstenite::connect_async(request)
        .await
        .unwrap_or_else(|e| panic!("connect {uri}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// The upgrade request for `url` with these extra headers.
pub fn with_headers(url: &str, headers: &[(&'static str, String)]) -> Request {
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    req
}

/// Tries an upgrade and returns the HTTP status of the refusal.
pub async fn refused_status(request: impl IntoClientRequest + Unpin) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("upgrade unexpectedly accepted"),
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Reads until a data message arrives (skipping pings and pongs).
pub async fn next_data(ws: &mut Client) -> Message {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("no error");
        if msg.is_text() || msg.is_binary() || msg.is_close() {
            return msg;
        }
    }
}

/// Sends `text` and asserts it comes back as the next data message.
pub async fn echoes(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_data(ws).await, Message::text(text));
}

/// Reads until the server's Close (at most 10 s): `Some` with its frame, or `None` when the
/// stream ends without one. An error before it fails the test.
async fn next_close<S>(ws: &mut S) -> Option<Option<CloseFrame>>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a Close within 10 s")
        {
            Some(Ok(Message::Close(frame))) => return Some(frame),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before Close: {e}"),
            None => return None,
        }
    }
}

/// Reads until the server's Close arrives; returns its code (`None`: a Close without one, or
/// the stream ended first).
pub async fn close_code(ws: &mut Client) -> Option<u16> {
    next_close(ws).await.flatten().map(|f| u16::from(f.code))
}

/// Reads until the server's Close, which must come and carry a code; returns its code and
/// reason.
pub async fn close_frame<S>(ws: &mut S) -> (u16, String)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    match next_close(ws).await {
        Some(Some(f)) => (u16::from(f.code), f.reason.to_string()),
        Some(None) => panic!("a Close without a code"),
        None => panic!("the connection ended before a Close"),
    }
}

/// Finishes the closing handshake from the client's side: reads to the end (at most 5 s).
pub async fn finish<S>(ws: &mut S)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Closes a client and reads to the end of the closing handshake.
pub async fn bye(mut ws: Client) {
    ws.close(None).await.unwrap();
    finish(&mut ws).await;
}

// ---- by hand over raw TCP -----------------------------------------------------------------

/// A TCP connection to `server` with a 4 KiB receive buffer: a client that does not read
/// pushes back on the server at once.
pub async fn connect_small_buffer(server: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(server).await.unwrap()
}

/// The upgrade request line and headers for a hand-made handshake.
pub fn upgrade_head(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// Completes a WebSocket handshake for `path` by hand on `s` (it must answer 101) and returns
/// the raw socket.
pub async fn raw_upgrade(mut s: TcpStream, path: &str) -> TcpStream {
    s.write_all(upgrade_head(path).as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A WebSocket on `path` of `server` upgraded by hand: the raw socket.
pub async fn raw_ws(server: SocketAddr, path: &str) -> TcpStream {
    raw_upgrade(TcpStream::connect(server).await.unwrap(), path).await
}

/// One client frame. `mask: None` leaves it unmasked (illegal from a client).
pub fn client_frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![first_byte];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}
