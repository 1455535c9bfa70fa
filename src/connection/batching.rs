//! Adaptive write batching for request/response handlers.
//!
//! Feeding a reply and writing only when no more input is ready saves a write per message
//! when clients pipeline, but costs an extra (empty) read per message when they do not; so
//! replies are fed only while recent probes found more input waiting, and one reply in
//! [`Batching::PROBE_EVERY`] probes again.

#[derive(Debug, Default)]
pub(crate) struct Batching {
    /// Replies were fed and not yet written.
    pub(crate) unflushed: bool,
    /// Feeding mode is on.
    on: bool,
    /// Consecutive probes that found nothing waiting.
    misses: u8,
    /// Replies since the last probe, in direct mode.
    since_probe: u8,
}

impl Batching {
    /// How often direct mode probes for pipelining.
    pub(crate) const PROBE_EVERY: u8 = 32;
    /// Consecutive empty probes that turn feeding off.
    pub(crate) const MAX_MISSES: u8 = 4;

    /// Whether this reply is fed (and the next read probes for more input first) or written
    /// directly.
    pub(crate) fn feeding(&mut self) -> bool {
        if self.on {
            return true;
        }
        self.since_probe += 1;
        if self.since_probe >= Self::PROBE_EVERY {
            self.since_probe = 0;
            return true;
        }
        false
    }

    /// A probe found input waiting.
    pub(crate) fn hit(&mut self) {
        self.on = true;
        self.misses = 0;
    }

    /// A probe found nothing: what was fed is written now (`unflushed` is cleared once that
    /// write has succeeded).
    pub(crate) fn miss(&mut self) {
        self.misses = self.misses.saturating_add(1);
        if self.misses >= Self::MAX_MISSES {
            self.on = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Batching;

    #[test]
    fn direct_until_a_probe_finds_pipelining() {
        let mut b = Batching::default();
        let fed: Vec<bool> = (0..64).map(|_| b.feeding()).collect();
        let probes: Vec<usize> = (0..64).filter(|&i| fed[i]).collect();
        assert_eq!(probes, vec![31, 63], "one reply in 32 probes");
        b.hit();
        assert!((0..100).all(|_| b.feeding()), "feeding while pipelined");
    }

    #[test]
    fn four_empty_probes_turn_feeding_off() {
        let mut b = Batching::default();
        b.hit();
        for _ in 0..Batching::MAX_MISSES - 1 {
            b.miss();
            assert!(b.feeding(), "still on");
        }
        b.hit();
        for _ in 0..Batching::MAX_MISSES {
            b.miss();
        }
        assert!(!b.feeding(), "off after four misses in a row");
    }
}
