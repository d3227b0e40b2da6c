//! Busy polling (`busy_polling = true`, HAProxy's `busy-polling`): while client connections
//! are open, each worker thread polls for I/O without ever sleeping in `epoll_wait`.
//!
//! Why: a worker that sleeps must be woken for the next packet, and on a virtual machine
//! that wake-up (an inter-processor interrupt to a halted vCPU) is paid by whoever sends
//! the packet — the client, the upstream, or the load generator of a benchmark — and by
//! the latency of the request. A spinning worker is never asleep, so the kernel only queues
//! the data and the next `epoll_wait(0)` finds it. The price is a full core per worker
//! while connections are open; with none open the workers sleep as usual, and a draining
//! process (SIGTERM, self-upgrade) stops spinning.
//!
//! How: one task per worker that yields in a loop. A yielded task is woken only after the
//! runtime has polled the driver with a zero timeout (tokio's `park_yield`), so the loop
//! is "run what is ready, `epoll_wait(0)`, repeat" with no sleep in between.

use std::sync::Arc;

use tokio::sync::watch;

use crate::server::ConnTracker;

/// Starts the spinning tasks, one per worker thread of the current runtime, and returns
/// the connection tracker whose accepts wake them (the listeners must count with it).
pub fn start(shutdown: watch::Receiver<bool>) -> Arc<ConnTracker> {
    let tracker = Arc::new(ConnTracker::with_busy_polling());
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    for _ in 0..workers {
        tokio::spawn(spin(tracker.clone(), shutdown.clone()));
    }
    tracker
}

async fn spin(tracker: Arc<ConnTracker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        if tracker.open() > 0 {
            tokio::task::yield_now().await;
            continue;
        }
        // No connection: sleep until one opens (or shutdown starts). Registered before the
        // check so an accept between the check and the wait is not missed.
        let Some(opened) = tracker.opened() else {
            return; // Not a `start` tracker: nothing would wake this task.
        };
        tokio::pin!(opened);
        opened.as_mut().enable();
        if tracker.open() > 0 {
            continue;
        }
        tokio::select! {
            () = opened => {}
            r = shutdown.changed() => if r.is_err() { return },
        }
    }
}
