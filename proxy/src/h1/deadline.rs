//! Timeouts on the fast path with one timer per connection side instead of one per read
//! or write.
//!
//! A keep-alive request waits twice (for the client's next request, for the backend's
//! answer); wrapping each wait in `tokio::time::timeout` inserts a timer into the runtime's
//! wheel and removes it again every time. A [`Watchdog`] keeps one timer armed and moves it
//! lazily: an operation that completes at once never looks at the timer; one that has to
//! wait computes its deadline and leaves the timer where it is when that fires no later
//! (an earlier operation's deadline). When the timer fires before the waiting operation's
//! own deadline, it is re-armed at that deadline and the wait goes on. With the same limit
//! for every wait on a side, the timer moves once per limit, not once per request.
use std::{
    future::{poll_fn, Future},
    pin::{pin, Pin},
    task::Poll,
    time::Duration,
};

use tokio::time::{Instant, Sleep};

/// The operation did not finish within its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// One lazily moved timer for the operations on one side of a connection.
#[derive(Debug, Default)]
pub struct Watchdog {
    timer: Option<Pin<Box<Sleep>>>,
}

impl Watchdog {
    /// Runs `op`, failing with [`TimedOut`] when it waits longer than `limit`.
    pub async fn run<F: Future>(&mut self, limit: Duration, op: F) -> Result<F::Output, TimedOut> {
        let mut op = pin!(op);
        let mut deadline = None;
        poll_fn(|cx| {
            if let Poll::Ready(v) = op.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + limit);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            loop {
                match timer.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if timer.deadline() >= deadline => {
                        return Poll::Ready(Err(TimedOut))
                    }
                    // Armed for an earlier operation: wait on for this one.
                    Poll::Ready(()) => timer.as_mut().reset(deadline),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_operation_that_waits_too_long_times_out() {
        let mut w = Watchdog::default();
        let r = w
            .run(
                Duration::from_secs(5),
                tokio::time::sleep(Duration::from_secs(10)),
            )
            .await;
        assert_eq!(r, Err(TimedOut));
    }

    #[tokio::test(start_paused = true)]
    async fn each_operation_gets_its_whole_limit() {
        let mut w = Watchdog::default();
        // Three waits of 4 s under a 5 s limit: the timer armed by the first fires during
        // the second, which must not time out.
        for _ in 0..3 {
            let r = w
                .run(
                    Duration::from_secs(5),
                    tokio::time::sleep(Duration::from_secs(4)),
                )
                .await;
            assert_eq!(r, Ok(()));
        }
        // A shorter limit after longer ones is honoured too.
        let r = w
            .run(
                Duration::from_secs(1),
                tokio::time::sleep(Duration::from_secs(2)),
            )
            .await;
        assert_eq!(r, Err(TimedOut));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_operation_never_arms_the_timer() {
        let mut w = Watchdog::default();
        assert_eq!(w.run(Duration::ZERO, async { 7 }).await, Ok(7));
        assert!(w.timer.is_none());
    }
}
