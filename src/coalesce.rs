//! Write coalescing for room members (`--room-write-delay`).
//!
//! A busy room hands each member many small messages a second. Written as they come, nearly
//! every message costs its member one `sendto`: in a 100-member room at 1,500 messages a second
//! most of the server's CPU went to the kernel. A member whose last write was recent therefore
//! waits until one window after that write, letting the room queue more, and then writes
//! everything queued at once: at most one write per window per member however busy the room,
//! and no message waits longer than the window. A message for a member that has not written
//! within the window (sparse traffic, the first message of a burst) goes out at once, so quiet
//! rooms pay no latency and nothing else (no timer is armed, nothing is allocated).
//!
//! While it waits, the messages stay in the member's bounded outbound queue: the queue's
//! bound and the slow-consumer rule are unchanged, and the room wakes the member early once its
//! queue is half full (`rooms`), so the delay never makes a member that keeps up look slow. A
//! close or shutdown does not wait for a held write: what is still held or queued then is
//! counted as dropped (`connection_closed`), as without the delay. Only the decision lives
//! here, pure, so it is tested on its own; the member's loop (`routes::Member::serve`) does the
//! waiting.

use std::time::Duration;

use tokio::time::Instant;

/// When a room member writes what is queued for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteDelay {
    /// The coalescing window; zero writes every message at once.
    window: Duration,
    /// When the member last wrote (started writing) what was queued.
    last_write: Option<Instant>,
}

impl WriteDelay {
    /// Writes at most once per `window` while messages keep coming; zero turns it off.
    pub(crate) fn new(window: Duration) -> Self {
        WriteDelay {
            window,
            last_write: None,
        }
    }

    /// Whether it is on (a non-zero window).
    pub(crate) fn is_on(&self) -> bool {
        !self.window.is_zero()
    }

    /// A message is ready for the member at `now`: `None` to write it (and whatever else is
    /// queued) at once, or the instant to wait for. The wait ends one window after the last
    /// write, so it is never longer than the window.
    pub(crate) fn hold_until(&self, now: Instant) -> Option<Instant> {
        let due = self.last_write? + self.window;
        (now < due).then_some(due)
    }

    /// A message is ready for the member at `now`: [`hold_until`](Self::hold_until), and when
    /// that says to write at once, that write is recorded as started.
    pub(crate) fn ready(&mut self, now: Instant) -> Option<Instant> {
        let due = self.hold_until(now);
        if due.is_none() {
            self.wrote(now);
        }
        due
    }

    /// A member that was waiting (a held message, or a look at a busy queue) starts writing at
    /// `at`: when to look at its queue again. It is busy, so the room's sends need not wake it
    /// before then; if that look finds the queue empty it is idle again, and a message after
    /// that goes out at once ([`ready`](Self::ready) says so: the window has passed).
    pub(crate) fn next_look(&mut self, at: Instant) -> Instant {
        self.wrote(at);
        at + self.window
    }

    /// The member started writing at `at`.
    pub(crate) fn wrote(&mut self, at: Instant) {
        if self.is_on() {
            self.last_write = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn off_never_holds() {
        let t0 = Instant::now();
        let mut d = WriteDelay::new(Duration::ZERO);
        assert!(!d.is_on());
        d.wrote(t0);
        assert_eq!(d.hold_until(t0), None);
        assert_eq!(d.hold_until(t0 + MS / 10), None);
    }

    #[test]
    fn the_first_message_goes_out_at_once() {
        let d = WriteDelay::new(2 * MS);
        assert_eq!(
            d.hold_until(Instant::now()),
            None,
            "an idle member writes at once"
        );
    }

    #[test]
    fn a_recent_write_holds_until_one_window_after_it() {
        let t0 = Instant::now();
        let mut d = WriteDelay::new(2 * MS);
        d.wrote(t0);
        assert_eq!(d.hold_until(t0), Some(t0 + 2 * MS));
        assert_eq!(
            d.hold_until(t0 + MS / 2),
            Some(t0 + 2 * MS),
            "the wait is what is left of the window, never a whole new one"
        );
        assert_eq!(d.hold_until(t0 + 2 * MS), None, "the window is over");
        assert_eq!(d.hold_until(t0 + 50 * MS), None, "sparse traffic: at once");
    }

    /// The member's loop (`routes::Member::serve`) on a message every `every`, from 0 to
    /// `until`: when it writes, and how many times it wakes (a message to an idle member, a
    /// message held, the timer).
    fn simulate(window: Duration, every: Duration, until: Duration) -> (Vec<Duration>, usize) {
        let t0 = Instant::now();
        let mut d = WriteDelay::new(window);
        let (mut writes, mut wakes) = (Vec::new(), 0);
        let mut queued = 0;
        let mut timer: Option<Instant> = None;
        let mut next_msg = t0;
        let end = t0 + until;
        while next_msg <= end || timer.is_some() {
            match timer {
                // The timer first when it is due before the next message.
                Some(at) if at <= next_msg || next_msg > end => {
                    wakes += 1;
                    if queued > 0 {
                        queued = 0;
                        writes.push(at - t0);
                        timer = Some(d.next_look(at));
                    } else {
                        timer = None;
                    }
                }
                Some(_) => {
                    queued += 1; // waiting: the send does not wake the member
                    next_msg += every;
                }
                None => {
                    wakes += 1;
                    match d.ready(next_msg) {
                        None => writes.push(next_msg - t0),
                        Some(at) => {
                            queued += 1;
                            timer = Some(at);
                        }
                    }
                    next_msg += every;
                }
            }
        }
        (writes, wakes)
    }

    #[test]
    fn under_steady_load_writes_are_one_window_apart_and_wake_once_each() {
        // A message every 100 us for 20 ms, a 2 ms window.
        let (writes, wakes) = simulate(2 * MS, MS / 10, 20 * MS);
        // The message at 20 ms comes just after the write at 20 ms: it goes at 22 ms.
        let want: Vec<Duration> = (0..=11).map(|i| i * 2 * MS).collect();
        assert_eq!(writes, want, "the first at once, then one write per window");
        // One wake per write, the first held message, and the last look that finds nothing.
        assert_eq!(wakes, writes.len() + 2);
    }

    #[test]
    fn sparse_messages_go_out_at_once_with_one_wake_each() {
        let (writes, wakes) = simulate(2 * MS, 5 * MS, 20 * MS);
        let want: Vec<Duration> = (0..=4).map(|i| i * 5 * MS).collect();
        assert_eq!(writes, want);
        assert_eq!(
            wakes,
            writes.len(),
            "no timer for a member that is never busy"
        );
    }

    #[test]
    fn a_pause_longer_than_the_window_makes_the_member_idle_again() {
        let t0 = Instant::now();
        let mut d = WriteDelay::new(5 * MS);
        assert_eq!(d.ready(t0), None);
        assert_eq!(d.ready(t0 + MS), Some(t0 + 5 * MS));
        d.wrote(t0 + 5 * MS);
        assert_eq!(d.ready(t0 + 30 * MS), None, "at once after a quiet spell");
        assert_eq!(d.ready(t0 + 31 * MS), Some(t0 + 35 * MS));
    }
}
