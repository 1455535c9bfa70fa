//! Message payloads the bench sends and the checks on what comes back.
//!
//! Every payload carries who sent it, a sequence number and a send timestamp, padded to the
//! requested size with bytes derived from the sequence number, so a reply that is truncated,
//! corrupted, reordered or from another sender is caught rather than counted.

use std::sync::OnceLock;
use std::time::Instant;

use tokio_tungstenite::tungstenite::Bytes;

/// Marks an echo/ingest/churn payload.
const ECHO_MAGIC: &[u8; 4] = b"wsob";
/// Marks a room publication.
const ROOM_MAGIC: &[u8; 4] = b"wsor";

/// Smallest echo payload: seq (8) + timestamp (8) + connection (4) + magic (4).
pub const ECHO_HEADER: usize = 24;
/// Smallest room payload: seq, timestamp, room, publisher, magic, size.
pub const ROOM_HEADER: usize = 32;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the first call in this process: the timestamps inside payloads.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `t` on the payload clock (0 for instants before the clock started).
pub fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_nanos() as u64
}

/// Padding byte `i` of a payload with sequence number `seq`.
fn pad_byte(seq: u64, i: usize) -> u8 {
    seq as u8 ^ (i as u8).wrapping_mul(31) ^ 0xa5
}

fn pad(buf: &mut [u8], seq: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pad_byte(seq, i);
    }
}

/// Whether `buf` is the padding of sequence number `seq` (compared in place: a room member
/// checks every one of ~150,000 deliveries a second, so no copy is made).
fn padded(buf: &[u8], seq: u64) -> bool {
    buf.iter().enumerate().all(|(i, &b)| b == pad_byte(seq, i))
}

/// An echo payload of `size` bytes (at least [`ECHO_HEADER`]).
pub fn echo_message(size: usize, conn: u32, seq: u64, ts_ns: u64) -> Bytes {
    let mut v = vec![0u8; size.max(ECHO_HEADER)];
    v[0..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&ts_ns.to_le_bytes());
    v[16..20].copy_from_slice(&conn.to_le_bytes());
    v[20..24].copy_from_slice(ECHO_MAGIC);
    pad(&mut v[ECHO_HEADER..], seq);
    Bytes::from(v)
}

/// Describes how `got` differs from `want`, or `None` when they are equal.
pub fn echo_mismatch(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    if want.len() != got.len() {
        return Some(format!(
            "echo has {} bytes, {} were sent",
            got.len(),
            want.len()
        ));
    }
    let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
    let field = match at {
        0..8 => "sequence number (reordered, lost or duplicated message?)",
        8..16 => "timestamp",
        16..20 => "connection id (another connection's message?)",
        20..24 => "marker",
        _ => "padding",
    };
    Some(format!(
        "echo differs from what was sent at byte {at} ({field})"
    ))
}

/// A room publication of `size` bytes (at least [`ROOM_HEADER`]).
pub fn room_message(size: usize, room: u32, publisher: u32, seq: u64, ts_ns: u64) -> Bytes {
    let size = size.max(ROOM_HEADER);
    let mut v = vec![0u8; size];
    v[0..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&ts_ns.to_le_bytes());
    v[16..20].copy_from_slice(&room.to_le_bytes());
    v[20..24].copy_from_slice(&publisher.to_le_bytes());
    v[24..28].copy_from_slice(ROOM_MAGIC);
    v[28..32].copy_from_slice(&(size as u32).to_le_bytes());
    pad(&mut v[ROOM_HEADER..], seq);
    Bytes::from(v)
}

/// A publication as read back by a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomMessage {
    pub publisher: u32,
    pub seq: u64,
    pub ts_ns: u64,
}

/// Checks a message a member of `room` received: well formed, intact, for this room.
pub fn check_room_message(b: &[u8], room: u32) -> Result<RoomMessage, String> {
    if b.len() < ROOM_HEADER || &b[24..28] != ROOM_MAGIC {
        return Err(format!(
            "a {}-byte message that is not a publication",
            b.len()
        ));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(28) as usize != b.len() {
        return Err(format!(
            "publication of {} bytes arrived with {}",
            u32_at(28),
            b.len()
        ));
    }
    if u32_at(16) != room {
        return Err(format!(
            "a message from room {} arrived in room {room}",
            u32_at(16)
        ));
    }
    let seq = u64_at(0);
    if !padded(&b[ROOM_HEADER..], seq) {
        return Err("publication padding corrupted".into());
    }
    Ok(RoomMessage {
        publisher: u32_at(20),
        seq,
        ts_ns: u64_at(8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_roundtrip_and_mismatches() {
        let m = echo_message(64, 7, 42, 1000);
        assert_eq!(m.len(), 64);
        assert_eq!(echo_mismatch(&m, &m), None);
        let other = echo_message(64, 7, 43, 1000);
        assert!(echo_mismatch(&m, &other).unwrap().contains("sequence"));
        let mut corrupt = m.to_vec();
        corrupt[50] ^= 1;
        assert!(echo_mismatch(&m, &corrupt).unwrap().contains("padding"));
        assert!(echo_mismatch(&m, &m[..63]).unwrap().contains("63 bytes"));
    }

    #[test]
    fn room_roundtrip_and_mismatches() {
        let m = room_message(100, 3, 1, 9, 77);
        assert_eq!(
            check_room_message(&m, 3),
            Ok(RoomMessage {
                publisher: 1,
                seq: 9,
                ts_ns: 77
            })
        );
        assert!(check_room_message(&m, 4).unwrap_err().contains("room 3"));
        assert!(check_room_message(&m[..99], 3).is_err());
        let mut bad = m.to_vec();
        bad[99] ^= 0xff;
        assert!(check_room_message(&bad, 3).unwrap_err().contains("padding"));
        assert!(check_room_message(&echo_message(64, 0, 0, 0), 3).is_err());
    }
}
