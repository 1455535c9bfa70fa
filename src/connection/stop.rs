//! Waiting for the connection to be told to stop, at the cost of an atomic load per wait.
//!
//! A connection waits for its next message, its heartbeat and its stop signal (the server's
//! shutdown, or a [`Closer`](super::Closer)) at once. Waiting on a `CancellationToken` the
//! usual way makes a new `cancelled()` future for every wait: a mutex to read the flag, a
//! mutex to join the token's waiter list and a mutex to leave it, on one token shared by every
//! connection. At one message in flight that is three contended locks per message (2% of the
//! server's CPU). Here the waiter joins the list once, with the task's waker, and stays there;
//! each wait reads the stop flags, which are set before the token is cancelled, with plain
//! loads. It joins again only when the task's waker changes (the `WebSocket` moved to another
//! task) or the token does (a closer was made).
//!
//! The standing registration is two small allocations (the token's 72-byte waiter and a
//! 24-byte box holding it and a waker, by their types' sizes), so
//! only a connection that has shown it is busy gets one ([`STANDING_AFTER`] messages): an idle
//! connection keeps waiting the usual way and costs not a byte more.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Data messages a connection receives or sends before it keeps a standing registration (a
/// room member that only listens waits once per delivery too).
pub(super) const STANDING_AFTER: u64 = 16;

/// A standing registration with a token's waiters.
pub(super) struct StopWait {
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker the registration wakes.
    waker: Waker,
}

/// Ready once `requested` says so; else makes sure `token` will wake this task when cancelled.
/// `requested` must turn true before `token` is cancelled (the server sets its `stopping` flag
/// and a closer its reason first), so a wake always finds it true.
pub(super) fn poll_stop(
    wait: &mut Option<Box<StopWait>>,
    token: &CancellationToken,
    requested: bool,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if requested {
        return Poll::Ready(());
    }
    if wait.as_ref().is_some_and(|w| w.waker.will_wake(cx.waker())) {
        return Poll::Pending;
    }
    let w = wait.get_or_insert_with(|| {
        Box::new(StopWait {
            cancelled: Box::pin(token.clone().cancelled_owned()),
            waker: cx.waker().clone(),
        })
    });
    w.waker.clone_from(cx.waker());
    // Joins the waiter list with this waker (or moves the registration to it); also ready when
    // the token is cancelled for a reason `requested` does not cover.
    w.cancelled.as_mut().poll(cx)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn registers_once_and_a_cancel_wakes_the_task() {
        let token = CancellationToken::new();
        let mut wait = None;
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..3 {
            assert!(poll_stop(&mut wait, &token, false, &mut cx).is_pending());
        }
        assert!(wait.is_some(), "one standing registration");
        // The flag is set before the cancel, as the server and closers do.
        token.cancel();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the cancel woke the task"
        );
        assert!(poll_stop(&mut wait, &token, true, &mut cx).is_ready());
    }

    #[test]
    fn a_new_waker_moves_the_registration() {
        let token = CancellationToken::new();
        let mut wait = None;
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        let mut cx = Context::from_waker(&first_waker);
        assert!(poll_stop(&mut wait, &token, false, &mut cx).is_pending());
        let mut cx = Context::from_waker(&second_waker);
        assert!(poll_stop(&mut wait, &token, false, &mut cx).is_pending());
        token.cancel();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the task that waits now is woken"
        );
    }

    #[test]
    fn a_token_cancelled_before_registering_is_ready() {
        let token = CancellationToken::new();
        token.cancel();
        let (_, waker) = counting();
        let mut wait = None;
        assert!(poll_stop(&mut wait, &token, false, &mut Context::from_waker(&waker)).is_ready());
    }
}
