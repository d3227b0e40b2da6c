//! Busy polling (`busy_polling = true`, HAProxy's `busy-polling`): while traffic flows,
//! each worker thread polls for I/O without ever sleeping in `epoll_wait`.
//!
//! Why: a worker that sleeps must be woken for the next packet, and on a virtual machine
//! that wake-up (an inter-processor interrupt to a halted vCPU) is paid by whoever sends
//! the packet — the client, the upstream, or the load generator of a benchmark — and by
//! the latency of the request. A spinning worker is never asleep, so the kernel only queues
//! the data and the next `epoll_wait(0)` finds it. The price is a full core per worker
//! while it spins. So it spins only while there is traffic: once nothing has been accepted
//! or read for [`IDLE_AFTER`] (no connection open, or only idle keep-alive ones), the
//! workers sleep as usual until the next accept or read; a draining process (SIGTERM,
//! self-upgrade) stops spinning.
//!
//! How: one task per worker that yields in a loop. A yielded task is woken only after the
//! runtime has polled the driver with a zero timeout (tokio's `park_yield`), so the loop
//! is "run what is ready, `epoll_wait(0)`, repeat" with no sleep in between.
//!
//! Traffic is told by [`mark`], called on every accept and every read that returned
//! (client and upstream streams, the TCP relay). It is one load of a flag that is already
//! set, except right after a spinner has taken it: so it costs nothing measurable without
//! busy polling (nobody ever clears the flag) and little with it (the spinners clear it
//! about once every 64 polls; the next read sets it again).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{Notify, watch};

use crate::endpoint::now_ms;

/// A spinner sleeps once nothing has been accepted or read for this long.
pub const IDLE_AFTER: Duration = Duration::from_millis(100);
/// Spins (yields) between two looks at the clock and the traffic flag: a yield costs
/// about a microsecond, a clock read a few dozen nanoseconds.
const CHECK_EVERY: u32 = 64;

/// Set by [`mark`]; taken by the spinners.
static ACTIVE: AtomicBool = AtomicBool::new(true);
/// `now_ms()` when a spinner last found [`ACTIVE`] set (shared by the spinners, so that
/// the one that took the flag does not leave the others thinking all is quiet).
static LAST_ACTIVE: AtomicU64 = AtomicU64::new(0);
/// Wakes sleeping spinners when the flag goes from clear to set.
static WOKEN: Notify = Notify::const_new();

/// Something was accepted or read: traffic is flowing.
#[inline]
pub fn mark() {
    if !ACTIVE.load(Ordering::Relaxed) {
        set_active();
    }
}

#[cold]
fn set_active() {
    if !ACTIVE.swap(true, Ordering::Relaxed) {
        WOKEN.notify_waiters();
    }
}

/// Starts the spinning tasks, one per worker thread of the current runtime. They spin
/// while [`mark`] reports traffic; `spinning` counts the ones that do.
pub fn start(shutdown: watch::Receiver<bool>, spinning: IntGauge) {
    // Quiet until the first accept: the spinners go to sleep at their first look.
    ACTIVE.store(false, Ordering::Relaxed);
    LAST_ACTIVE.store(0, Ordering::Relaxed);
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    for _ in 0..workers {
        let state = Spinning {
            gauge: spinning.clone(),
            on: false,
        };
        tokio::spawn(spin(shutdown.clone(), state));
    }
}

/// One spinner's share of the `balancer_busy_polling_workers` gauge.
struct Spinning {
    gauge: IntGauge,
    on: bool,
}

impl Spinning {
    fn set(&mut self, on: bool) {
        if on != self.on {
            self.on = on;
            if on {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
        }
    }
}

/// Whether nothing was accepted or read for [`IDLE_AFTER`]; takes the traffic flag.
fn quiet() -> bool {
    let now = now_ms();
    if ACTIVE.swap(false, Ordering::Relaxed) {
        LAST_ACTIVE.store(now, Ordering::Relaxed);
    }
    now.saturating_sub(LAST_ACTIVE.load(Ordering::Relaxed)) >= IDLE_AFTER.as_millis() as u64
}

async fn spin(mut shutdown: watch::Receiver<bool>, mut state: Spinning) {
    let mut polls = 0u32;
    loop {
        if *shutdown.borrow() {
            state.set(false);
            return;
        }
        polls = polls.wrapping_add(1);
        if !(polls.is_multiple_of(CHECK_EVERY) && quiet()) {
            state.set(true);
            tokio::task::yield_now().await;
            continue;
        }
        // Quiet: sleep until the next accept or read (or shutdown). Registered before the
        // flag is cleared, so a `mark` after the clear always wakes this task; a `mark`
        // before it shows as a set flag.
        let woken = WOKEN.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if ACTIVE.swap(false, Ordering::Relaxed) {
            // Traffic since the look: spin on.
            LAST_ACTIVE.store(now_ms(), Ordering::Relaxed);
            continue;
        }
        state.set(false);
        tokio::select! {
            () = woken => LAST_ACTIVE.store(now_ms(), Ordering::Relaxed),
            r = shutdown.changed() => if r.is_err() { return },
        }
    }
}
