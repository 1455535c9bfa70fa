//! The raw byte stream under a WebSocket connection, followed frame by frame.
//!
//! tungstenite returns no more frames after its first read error (a message over the limit,
//! invalid UTF-8, a protocol violation), and what it had read ahead stays in its own buffer. The
//! server still owes the client the end of the closing handshake (RFC 6455 section 7.1.1: after
//! sending its Close, read until the client's Close, then close TCP). Closing the socket with the
//! rest of an oversized frame unread makes the kernel answer with a reset, and a browser then
//! drops the Close it had not yet processed and reports 1006 instead of the server's code.
//!
//! So the socket is wrapped in [`Watched`], which follows the frame boundaries of every byte read
//! (a header parse per frame: a few nanoseconds per message). After such an error the server knows
//! where the next frame starts, discards what follows ([`discard_until_close`]), bounded in bytes
//! and time, and sees (and counts) the client's Close reply.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The longest frame header: 2 bytes, an 8-byte extended length and a 4-byte mask.
const MAX_HEADER: usize = 14;
/// The Close opcode.
const OP_CLOSE: u8 = 0x8;

/// Follows the frame boundaries of a client's byte stream: which frame the next byte belongs
/// to, and the Close frames seen.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FrameScan {
    /// Header bytes of the next frame collected so far.
    head: [u8; MAX_HEADER],
    head_len: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// The current frame is a Close: its mask and the code bytes read so far.
    close: Option<CloseScan>,
    /// Close frames read in full.
    closes: u32,
    /// The code of the last Close frame read in full (`None`: it had no code).
    last_close_code: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CloseScan {
    mask: [u8; 4],
    code: [u8; 2],
    /// Payload bytes of the Close frame seen so far (only the first two matter).
    seen: u8,
}

impl FrameScan {
    /// Follows `bytes`, the next bytes read from the client.
    pub fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if let Some(close) = &mut self.close {
                    for &b in bytes[..n]
                        .iter()
                        .take(2usize.saturating_sub(close.seen.into()))
                    {
                        let i = usize::from(close.seen);
                        close.code[i] = b ^ close.mask[i];
                        close.seen += 1;
                    }
                }
                self.remaining -= n as u64;
                bytes = &bytes[n..];
                if self.remaining == 0 {
                    self.frame_done();
                }
                continue;
            }
            let have = usize::from(self.head_len);
            let need = header_len(&self.head[..have]);
            let take = (need - have).min(bytes.len());
            self.head[have..have + take].copy_from_slice(&bytes[..take]);
            self.head_len += take as u8;
            bytes = &bytes[take..];
            let have = usize::from(self.head_len);
            if have == header_len(&self.head[..have]) {
                self.header_done();
            }
        }
    }

    /// Whether the next byte starts a frame (the fuzz target holds the scan to it).
    pub fn at_frame_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0
    }

    /// Close frames read in full so far.
    pub fn closes(&self) -> u32 {
        self.closes
    }

    /// The code carried by the last Close frame read in full, if it had one.
    pub fn last_close_code(&self) -> Option<u16> {
        self.last_close_code
    }

    fn header_done(&mut self) {
        let h = &self.head;
        let masked = h[1] & 0x80 != 0;
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
                10,
            ),
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            h[at..at + 4].try_into().expect("4 bytes")
        } else {
            [0; 4]
        };
        self.close = (h[0] & 0x0f == OP_CLOSE).then_some(CloseScan {
            mask,
            code: [0; 2],
            seen: 0,
        });
        self.head_len = 0;
        self.remaining = len;
        if len == 0 {
            self.frame_done();
        }
    }

    fn frame_done(&mut self) {
        if let Some(close) = self.close.take() {
            self.closes = self.closes.saturating_add(1);
            self.last_close_code = (close.seen >= 2).then(|| u16::from_be_bytes(close.code));
        }
    }
}

/// The length of the header that begins with `head` (2 until the length byte is known).
fn header_len(head: &[u8]) -> usize {
    let Some(&second) = head.get(1) else {
        return 2;
    };
    let ext = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// A socket whose reads are followed by a [`FrameScan`]. Writes pass through untouched.
#[derive(Debug)]
pub struct Watched<S> {
    io: S,
    scan: FrameScan,
}

impl<S> Watched<S> {
    /// Wraps `io`, which must be at a frame boundary (right after the upgrade).
    pub fn new(io: S) -> Self {
        Watched {
            io,
            scan: FrameScan::default(),
        }
    }

    /// What the scan has seen of everything read so far.
    pub fn scan(&self) -> &FrameScan {
        &self.scan
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.scan.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// How a [`discard_until_close`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// The client's Close arrived: `closes` is the scan's count of Close frames by then.
    Close,
    /// The client closed TCP (or it failed) first.
    Eof,
    /// `max_bytes` were read without a Close.
    TooMuch,
    /// `timeout` passed without a Close.
    Timeout,
}

/// Reads and discards what the client sends until a Close frame beyond the first `closes_before`
/// has been read in full (or the stream ends, `max_bytes` are read, or `timeout` passes).
/// Whatever tungstenite had read ahead was scanned already, so a Close among it counts at once.
pub async fn discard_until_close<S: AsyncRead + Unpin>(
    io: &mut Watched<S>,
    closes_before: u32,
    max_bytes: u64,
    timeout: Duration,
) -> Discarded {
    let mut buf = [0u8; 2048];
    let mut read = 0u64;
    let drain = async {
        loop {
            if io.scan.closes() > closes_before {
                return Discarded::Close;
            }
            if read >= max_bytes {
                return Discarded::TooMuch;
            }
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return Discarded::Eof,
                Ok(n) => read += n as u64,
            }
        }
    };
    tokio::time::timeout(timeout, drain)
        .await
        .unwrap_or(Discarded::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: FIN set, masked with `mask`.
    fn frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn close(code: u16) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        frame(OP_CLOSE, &p, [9, 8, 7, 6])
    }

    #[test]
    fn follows_frames_in_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(0x1, b"hello", [1, 2, 3, 4]));
        stream.extend(frame(0x2, &[7u8; 300], [5, 6, 7, 8]));
        stream.extend(frame(0x2, &[1u8; 70_000], [0, 0, 0, 1]));
        stream.extend(frame(0x9, b"", [1, 1, 1, 1]));
        stream.extend(close(1001));
        // Every split point, one and two cuts: the scan must not depend on read sizes.
        for cut in (0..stream.len()).step_by(97).chain([1, 2, 5, 6, 7]) {
            let mut s = FrameScan::default();
            s.scan(&stream[..cut]);
            for chunk in stream[cut..].chunks(13) {
                s.scan(chunk);
            }
            assert_eq!(s.closes(), 1, "cut at {cut}");
            assert_eq!(s.last_close_code(), Some(1001), "cut at {cut}");
            assert!(s.at_frame_boundary(), "cut at {cut}");
        }
    }

    #[test]
    fn close_without_code_and_partial_frames() {
        let mut s = FrameScan::default();
        s.scan(&frame(OP_CLOSE, b"", [1, 2, 3, 4]));
        assert_eq!((s.closes(), s.last_close_code()), (1, None));
        // A Close frame still arriving is not counted.
        let c = close(4000);
        s.scan(&c[..c.len() - 1]);
        assert_eq!(s.closes(), 1);
        s.scan(&c[c.len() - 1..]);
        assert_eq!((s.closes(), s.last_close_code()), (2, Some(4000)));
    }

    #[test]
    fn skips_the_rest_of_a_huge_frame() {
        // The header of a frame claiming 2^40 bytes: the scan waits for its payload, and a
        // Close inside that payload is only payload.
        let mut s = FrameScan::default();
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 40).to_be_bytes());
        h.extend_from_slice(&[0; 4]);
        s.scan(&h);
        s.scan(&close(1000));
        assert_eq!(s.closes(), 0);
        assert_eq!(s.remaining, (1u64 << 40) - close(1000).len() as u64);
    }

    #[tokio::test]
    async fn discard_stops_at_the_close_and_is_bounded() {
        // The rest of an oversized frame, then the client's Close.
        let mut wire = frame(0x2, &[3u8; 5000], [1, 2, 3, 4]);
        let close_at = wire.len();
        wire.extend(close(1000));
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut watched = Watched::new(server);
        // Simulate tungstenite having read the first 100 bytes before its error.
        watched.scan.scan(&wire[..100]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &wire[100..])
            .await
            .unwrap();
        let out = discard_until_close(&mut watched, 0, 1 << 20, Duration::from_secs(5)).await;
        assert_eq!(out, Discarded::Close);
        assert_eq!(watched.scan().last_close_code(), Some(1000));
        assert!(close_at > 100);

        // No Close and the client keeps the socket open: the byte bound ends it.
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut watched = Watched::new(server);
        let flood = frame(0x2, &[0u8; 40_000], [0; 4]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &flood)
            .await
            .unwrap();
        let out = discard_until_close(&mut watched, 0, 10_000, Duration::from_secs(5)).await;
        assert_eq!(out, Discarded::TooMuch);

        // Nothing at all: the time bound ends it.
        let (_client, server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(server);
        let out = discard_until_close(&mut watched, 0, 10_000, Duration::from_millis(50)).await;
        assert_eq!(out, Discarded::Timeout);

        // The client hangs up.
        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        let mut watched = Watched::new(server);
        let out = discard_until_close(&mut watched, 0, 10_000, Duration::from_secs(5)).await;
        assert_eq!(out, Discarded::Eof);
    }
}
