//! Guard against false criticals when the checker itself is starved.
//!
//! A probe's timeout is measured by the checker's own clock and its own event loop. If the
//! process is not running — stopped (SIGSTOP, a debugger, a VM pause), throttled by its
//! cgroup CPU quota, or its runtime threads are busy — a healthy backend's answer sits in
//! the socket buffer while the timeout timer expires, and the probe "times out" although
//! the backend did nothing wrong. Counting that as a failure would mark healthy instances
//! critical exactly when the checker is in trouble, taking them out of every balancer.
//!
//! Two independent signals catch it:
//!
//! - **Loop lag**: a monitor task asks to wake every [`PERIOD`] and measures how late it is
//!   woken. Late wake-ups are recorded as stall windows (merged, bounded) and exported as
//!   `healthcheck_event_loop_lag_seconds`; long ones are logged as warnings.
//! - **Timer lateness**: a timed-out probe knows when its timeout should have fired; if it
//!   fired much later, the probe's own task was starved.
//!
//! A timed-out probe is judged only once the monitor has looked at the whole probe window
//! (so a stall that just ended is not missed because the probe task ran first after it).
//! If stalls covered at least a quarter of its timeout budget (or its timer fired that
//! late), the probe is discarded — neither a pass nor a failure — and redone at once.
//! Only timeouts are discarded: a refused connection or a 500 is the backend's answer,
//! however late the checker reads it. The price: a checker starved for a quarter of every
//! probe window cannot mark a hung backend critical; it says so loudly (warnings, lag
//! histogram, `healthcheck_probes_discarded_total`) instead of blaming the backends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;

/// How often the monitor asks to be woken.
pub const PERIOD: Duration = Duration::from_millis(25);
/// Wake-up lateness recorded as a stall window (below: ordinary scheduling noise).
pub const RECORD_LAG: Duration = Duration::from_millis(10);
/// Wake-up lateness logged as a warning.
pub const WARN_LAG: Duration = Duration::from_millis(250);
/// Stall windows older than this are forgotten (longer than any sane probe timeout).
const KEEP: Duration = Duration::from_secs(120);
/// Bound on remembered windows (a chronically lagging loop merges them anyway).
const MAX_WINDOWS: usize = 256;

/// Shared by the monitor task (writer) and every probe task (readers).
pub struct StallGuard {
    windows: Mutex<VecDeque<(Instant, Instant)>>,
    /// The instant up to which the monitor has looked for stalls.
    observed: watch::Sender<Instant>,
}

impl Default for StallGuard {
    fn default() -> Self {
        Self {
            windows: Mutex::new(VecDeque::new()),
            observed: watch::Sender::new(Instant::now()),
        }
    }
}

impl StallGuard {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The monitor loop; runs until dropped.
    pub async fn monitor(self: Arc<Self>, metrics: Arc<Metrics>) {
        let mut last = Instant::now();
        let mut last_warn: Option<Instant> = None;
        let mut suppressed = 0u64;
        loop {
            let expected = last + PERIOD;
            tokio::time::sleep_until(expected).await;
            let now = Instant::now();
            let lag = now.saturating_duration_since(expected);
            metrics.loop_lag.observe(lag.as_secs_f64());
            if lag >= RECORD_LAG {
                // Nothing ran in between as far as we can tell: the whole span since the
                // previous wake-up is suspect.
                self.record(last, now);
            }
            if lag >= WARN_LAG {
                metrics.stalls.inc();
                // At most one line every 10 s, however often it happens.
                if last_warn.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                    warn!(
                        lag_ms = lag.as_millis() as u64,
                        similar_since_last_warning = suppressed,
                        "the checker was starved (stopped, throttled or overloaded): \
                         probe timeouts overlapping the stall are discarded, not counted as failures"
                    );
                    last_warn = Some(now);
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
            }
            self.observed.send_replace(now);
            last = now;
        }
    }

    fn record(&self, from: Instant, to: Instant) {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        match w.back_mut() {
            Some(back) if from <= back.1 => back.1 = back.1.max(to),
            _ => w.push_back((from, to)),
        }
        while w.len() > MAX_WINDOWS || w.front().is_some_and(|f| to.duration_since(f.1) > KEEP) {
            w.pop_front();
        }
    }

    /// Whether a probe that ran from `start` to `end` and timed out after `timeout` was
    /// starved enough for its timeout to mean nothing about the backend. Waits (briefly)
    /// until the monitor has looked at the whole window.
    pub async fn starved(&self, start: Instant, end: Instant, timeout: Duration) -> bool {
        let budget = timeout / 4;
        // The probe's own timer: a timeout that fired far past its deadline is proof enough.
        if end.saturating_duration_since(start) >= timeout + budget {
            return true;
        }
        let mut observed = self.observed.subscribe();
        // An error means the monitor is gone (shutting down): judge with what we have.
        let _ = observed.wait_for(|t| *t >= end).await;
        self.overlap(start, end) >= budget.max(RECORD_LAG)
    }

    /// Total time of recorded stalls within `[start, end]`.
    fn overlap(&self, start: Instant, end: Instant) -> Duration {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.iter()
            .rev()
            .take_while(|(_, to)| *to > start)
            .map(|(from, to)| (*to).min(end).saturating_duration_since((*from).max(start)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_sums_the_part_inside_the_window() {
        let g = StallGuard::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        g.record(ms(0), ms(100));
        g.record(ms(50), ms(150)); // merged with the previous one
        g.record(ms(400), ms(500));
        assert_eq!(g.windows.lock().unwrap().len(), 2);
        assert_eq!(g.overlap(ms(100), ms(450)), Duration::from_millis(100));
        assert_eq!(g.overlap(ms(160), ms(390)), Duration::ZERO);
        assert_eq!(g.overlap(ms(0), ms(1000)), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn a_late_timer_or_an_overlapping_stall_discards_a_timeout() {
        let g = StallGuard::new();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let timeout = Duration::from_millis(200);
        // The timeout fired 300 ms late: starved, no need to ask the monitor.
        assert!(g.starved(ms(0), ms(500), timeout).await);
        // The monitor has seen up to 1 s and recorded a 60 ms stall inside the window.
        g.record(ms(700), ms(760));
        g.observed.send_replace(ms(1000));
        assert!(g.starved(ms(600), ms(800), timeout).await);
        // A 20 ms stall is less than a quarter of the budget: the timeout counts.
        g.record(ms(900), ms(920));
        assert!(!g.starved(ms(850), ms(1000), timeout).await);
    }

    #[tokio::test]
    async fn judging_waits_for_the_monitor_to_cover_the_window() {
        let g = StallGuard::new();
        let t0 = Instant::now();
        let timeout = Duration::from_millis(200);
        let end = t0 + timeout;
        let judged = tokio::spawn({
            let g = g.clone();
            async move { g.starved(t0, end, timeout).await }
        });
        tokio::task::yield_now().await;
        assert!(!judged.is_finished(), "judged before the monitor looked");
        // The monitor now reports the stall that covered most of the probe.
        g.record(t0, end);
        g.observed.send_replace(end);
        assert!(judged.await.unwrap());
    }
}
