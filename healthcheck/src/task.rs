//! The probe loop of one instance: one lightweight tokio task per instance.
//!
//! The task owns the rise/fall tracker and talks to the supervisor only when something
//! matters for the mark (a status change, or a taken-over verdict confirmed), so a steady
//! fleet costs a timer wake-up and a probe per instance per interval, nothing else. The
//! supervisor aborts the task when the instance goes away or changes hands; an in-flight
//! probe is dropped with it (the connection is closed) and its result never reported.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics::ServiceMetrics;
use crate::probe::{Outcome, Target, Verdict};
use crate::rules::{Status, Step, Tracker};
use crate::stall::StallGuard;
use crate::writer::Item;

/// A message from a probe task.
#[derive(Debug)]
pub struct Report {
    pub item: Item,
    /// The task that sent it; reports of a replaced task are ignored.
    pub generation: u64,
    pub step: Step,
    pub consecutive: u32,
    pub output: String,
}

/// A running probe task, aborted when dropped.
pub struct ProbeTask(JoinHandle<()>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything a probe task needs.
pub struct ProbeJob {
    pub item: Item,
    pub generation: u64,
    pub target: Arc<Target>,
    pub initial: Status,
    pub metrics: Arc<ServiceMetrics>,
    pub stalls: Arc<StallGuard>,
    pub reports: mpsc::UnboundedSender<Report>,
}

impl ProbeJob {
    pub fn spawn(self) -> ProbeTask {
        ProbeTask(tokio::spawn(self.run()))
    }

    async fn run(self) {
        let target = &self.target;
        let mut tracker = Tracker::new(self.initial, target.rise, target.fall);
        let interval = target.interval;
        // A random first offset spreads a fleet's probes over the whole interval, so
        // neither the checker nor the backends see a thundering herd at start-up.
        let first = rand::rng().random_range(Duration::ZERO..interval);
        let mut next = Instant::now() + first;
        // At most one re-spread and one immediate redo in a row, so that a chronically
        // starved checker still probes every interval rather than never or non-stop.
        let mut may_respread = true;
        let mut may_redo = true;
        loop {
            tokio::time::sleep_until(next).await;
            let started = Instant::now();
            if may_respread && started.saturating_duration_since(next) > interval {
                may_respread = false;
                // Woken more than an interval late: the checker was stopped or starved, and
                // every task is waking at once. Spread the probes out again instead of
                // firing them all together (which would starve the checker some more).
                next = started + rand::rng().random_range(Duration::ZERO..interval);
                continue;
            }
            may_respread = true;
            let outcome = target.probe().await;
            let ended = Instant::now();
            if outcome == Outcome::Timeout
                && self.stalls.starved(started, ended, target.timeout).await
            {
                // The timeout says nothing about the backend: redo the probe right away.
                self.metrics.discard();
                next = if may_redo {
                    Instant::now()
                } else {
                    started + interval
                };
                may_redo = false;
                continue;
            }
            may_redo = true;
            let verdict = target.judge(outcome);
            self.metrics
                .observe(verdict, ended.duration_since(started).as_secs_f64());
            let step = tracker.record(verdict == Verdict::Pass);
            if step != Step::Unchanged {
                let report = Report {
                    item: self.item.clone(),
                    generation: self.generation,
                    step,
                    consecutive: tracker.consecutive(),
                    output: target.describe(outcome),
                };
                if self.reports.send(report).is_err() {
                    return; // the supervisor is gone
                }
            }
            // ±10 % jitter keeps probes from lining up again over time.
            let jittered = interval.mul_f64(rand::rng().random_range(0.9..1.1));
            next = next_due(next, jittered, Instant::now());
        }
    }
}

/// When the probe after one that was due at `due` is due: one (jittered) interval later,
/// counted from when it was *due*, not from when it ran. Counting from a late wake-up made
/// every probe of a busy checker drift later, and the fleet's probe rate fell well below one
/// per interval (6,700/s for 10,000 instances at 1 s). Never in the past: a task that fell
/// behind probes again at once, then keeps its rhythm.
fn next_due(due: Instant, jittered: Duration, now: Instant) -> Instant {
    (due + jittered).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_does_not_drift_with_late_wake_ups() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        // Due at t0, woken and probed 300 ms late: the next one is still due at t0 + 1 s.
        assert_eq!(next_due(t0, s, t0 + ms(300)), t0 + s);
        // A busy checker that runs the task only every 1.3 s still probes once a second:
        // 39 probes in 39 s (counting from the wake-ups gave one per wake-up, 30).
        let (mut due, mut probes) = (t0, 0);
        for wake in 1..=30u32 {
            let now = t0 + ms(1300) * wake;
            while due <= now {
                probes += 1;
                due = next_due(due, s, now);
                if due == now {
                    // Behind: probed again at once (the next wake of the task), then on time.
                    probes += 1;
                    due = next_due(due, s, now + ms(1));
                }
            }
        }
        assert!((38..=40).contains(&probes), "{probes} probes in 39 s");
        // Never in the past.
        assert_eq!(next_due(t0, s, t0 + ms(2500)), t0 + ms(2500));
    }
}
