//! The heartbeat: the server pings every interval and an unanswered ping ends the connection.
//! The same timer ends the connection when its token expires.

use std::time::Duration;

use tokio::time::Instant;

/// What the heartbeat wants done when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The connection's token has expired.
    Expired,
    /// The outstanding ping's pong is overdue: the peer is presumed dead.
    PongOverdue,
    /// Woken early (the deadline moved): wait for [`Heartbeat::deadline`] again.
    NotYet,
    /// Send a ping with this payload (made outstanding by [`Heartbeat::ping`]).
    Ping([u8; 8]),
}

/// Ping schedule and the ping awaiting its pong.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    /// Sequence number and send time of the ping awaiting its pong.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
    /// When the connection's token expires.
    expires_at: Option<Instant>,
}

impl Heartbeat {
    pub(crate) fn new(interval: Duration, timeout: Duration, expires_at: Option<Instant>) -> Self {
        Heartbeat {
            interval,
            timeout,
            next_ping: Instant::now() + interval,
            outstanding: None,
            seq: 0,
            expires_at,
        }
    }

    /// When the timer should fire next: the pong deadline, else the next ping, or the token's
    /// expiry if that is sooner.
    pub(crate) fn deadline(&self) -> Instant {
        let beat = self.pong_due().unwrap_or(self.next_ping);
        self.expires_at.map_or(beat, |e| e.min(beat))
    }

    /// When the outstanding ping's pong is overdue.
    pub(crate) fn pong_due(&self) -> Option<Instant> {
        self.outstanding.map(|(_, sent)| sent + self.timeout)
    }

    /// When a write that cannot progress would be overtaken by the heartbeat: the outstanding
    /// ping's pong deadline, or, with none outstanding, that of the next ping (which a stalled
    /// socket cannot even send).
    pub(crate) fn stall_deadline(&self) -> Instant {
        self.pong_due().unwrap_or(self.next_ping + self.timeout)
    }

    /// The timer fired at `now`: what to do. A ping it asks for is already outstanding.
    pub(crate) fn fire(&mut self, now: Instant) -> Beat {
        if self.expires_at.is_some_and(|e| now >= e) {
            return Beat::Expired;
        }
        if self.pong_due().is_some_and(|due| now >= due) {
            return Beat::PongOverdue;
        }
        if now < self.next_ping || self.outstanding.is_some() {
            return Beat::NotYet;
        }
        Beat::Ping(self.ping(now))
    }

    /// Makes a ping outstanding at `now` and returns its payload.
    pub(crate) fn ping(&mut self, now: Instant) -> [u8; 8] {
        self.seq += 1;
        self.outstanding = Some((self.seq, now));
        self.seq.to_be_bytes()
    }

    /// Returns the round trip when `payload` answers the outstanding ping; the next ping is
    /// then due an interval after this one was sent (at once if that has passed).
    pub(crate) fn pong(&mut self, payload: &[u8]) -> Option<Duration> {
        let (seq, sent) = self.outstanding?;
        if payload != seq.to_be_bytes() {
            return None;
        }
        self.outstanding = None;
        let now = Instant::now();
        self.next_ping = (sent + self.interval).max(now);
        Some(now - sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn pings_on_schedule_and_measures_the_round_trip() {
        let mut hb = Heartbeat::new(10 * SECOND, 5 * SECOND, None);
        let start = Instant::now();
        assert_eq!(hb.deadline(), start + 10 * SECOND);
        assert_eq!(hb.fire(start + 9 * SECOND), Beat::NotYet);

        tokio::time::advance(10 * SECOND).await;
        let Beat::Ping(payload) = hb.fire(Instant::now()) else {
            panic!("a ping is due");
        };
        assert_eq!(payload, 1u64.to_be_bytes());
        assert_eq!(
            hb.deadline(),
            Instant::now() + 5 * SECOND,
            "now the pong is due"
        );
        assert_eq!(hb.fire(Instant::now()), Beat::NotYet, "one ping at a time");

        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(
            hb.pong(&2u64.to_be_bytes()),
            None,
            "not the outstanding ping's payload"
        );
        assert_eq!(hb.pong(&payload), Some(Duration::from_millis(40)));
        assert_eq!(hb.pong(&payload), None, "answered once");
        assert_eq!(
            hb.deadline(),
            start + 20 * SECOND,
            "an interval after the ping was sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_ends_the_connection() {
        let mut hb = Heartbeat::new(SECOND, 2 * SECOND, None);
        tokio::time::advance(SECOND).await;
        assert!(matches!(hb.fire(Instant::now()), Beat::Ping(_)));
        tokio::time::advance(2 * SECOND - Duration::from_millis(1)).await;
        assert_eq!(hb.fire(Instant::now()), Beat::NotYet);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(hb.fire(Instant::now()), Beat::PongOverdue);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_pong_pings_again_at_once_and_expiry_comes_first() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(SECOND, 10 * SECOND, Some(start + 30 * SECOND));
        tokio::time::advance(SECOND).await;
        let Beat::Ping(payload) = hb.fire(Instant::now()) else {
            panic!("a ping is due");
        };
        tokio::time::advance(3 * SECOND).await;
        assert_eq!(hb.pong(&payload), Some(3 * SECOND));
        assert_eq!(
            hb.deadline(),
            Instant::now(),
            "the next ping is overdue already"
        );
        assert_eq!(hb.stall_deadline(), Instant::now() + 10 * SECOND);

        tokio::time::advance(30 * SECOND).await;
        assert_eq!(hb.fire(Instant::now()), Beat::Expired);
    }
}
