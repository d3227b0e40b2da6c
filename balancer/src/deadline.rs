//! A coarse per-connection timer: one `tokio::time::Sleep` reused for every deadline of
//! the connection (header read, upstream response), re-armed only when it would fire too
//! late or fires early — not once per request. Registering and cancelling a tokio timer
//! per request costs a lock in the timer driver each time; here a busy keep-alive
//! connection touches the timer wheel about once per timeout period.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline passed")]
pub struct Elapsed;

/// Runs `fut` until it finishes or `dur` has passed, using `timer` for the wake-up.
pub async fn within<F: Future>(
    timer: Pin<&mut Sleep>,
    dur: Duration,
    fut: F,
) -> Result<F::Output, Elapsed> {
    within_at(timer, Instant::now() + dur, fut).await
}

/// Runs `fut` until it finishes or `deadline` has passed (for a caller that already read
/// the clock).
pub async fn within_at<F: Future>(
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    fut: F,
) -> Result<F::Output, Elapsed> {
    if timer.deadline() > deadline || timer.is_elapsed() {
        timer.as_mut().reset(deadline);
    }
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = fut.as_mut() => return Ok(out),
            _ = timer.as_mut() => {
                if Instant::now() >= deadline {
                    return Err(Elapsed);
                }
                // Fired for an earlier (since passed) deadline: wait for ours.
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// A timer that will not fire for a long time (set before the first deadline).
pub fn idle_timer() -> Sleep {
    tokio::time::sleep(Duration::from_secs(86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_the_latest_deadline_only() {
        let timer = idle_timer();
        tokio::pin!(timer);
        // A short deadline arms the timer; the next, longer one must not fire early.
        assert_eq!(
            within(timer.as_mut(), Duration::from_millis(10), async {}).await,
            Ok(())
        );
        let start = Instant::now();
        let r = within(
            timer.as_mut(),
            Duration::from_millis(150),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(r, Err(Elapsed));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        // A shorter deadline after a longer one re-arms earlier.
        let start = Instant::now();
        let r = within(
            timer.as_mut(),
            Duration::from_millis(20),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(r, Err(Elapsed));
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}
