//! The metrics gate over one step window: the balancers' counters scraped before and during
//! the window, judged every second, a breach ending it at once.

use std::time::Duration;

use catalog::Store;
use tokio::time::Instant;

use super::{Rollout, SCRAPE_TIMEOUT};
use crate::rollout::RolloutError;
use crate::rollout::gate::{self, Counts, Limits, Verdict};
use crate::rollout::scrape;
use crate::rollout::state::RolloutState;

/// A new p99 under this never breaches the ratio gate (sub-millisecond ratios are noise).
const P99_FLOOR: f64 = 0.005;
/// Fewer new-version answers than this: the error rate is taken over this many.
const MIN_REQUESTS: f64 = 50.0;

impl<S: Store> Rollout<S> {
    async fn scrape_all(&self, st: &RolloutState) -> Result<Counts, RolloutError> {
        let mut counts = Counts::new();
        for url in &st.metrics {
            let samples = scrape::scrape(url, SCRAPE_TIMEOUT).await?;
            gate::accumulate(&mut counts, &samples, &st.service);
        }
        Ok(counts)
    }

    /// Watches one step window: live figures every second, a breach ends it at once.
    /// `Some(reason)` on a breach.
    pub(super) async fn window(
        &self,
        st: &mut RolloutState,
        label: &str,
    ) -> Result<Option<String>, RolloutError> {
        if st.metrics.is_empty() {
            tokio::time::sleep(st.step_wait).await;
            return Ok(None);
        }
        let limits = Limits {
            max_error_rate: st.gate.max_error_rate,
            max_p99_ratio: st.gate.max_p99_ratio,
            p99_floor: P99_FLOOR,
            min_requests: MIN_REQUESTS,
        };
        let before = self.scrape_all(st).await?;
        let t0 = Instant::now();
        loop {
            let left = st.step_wait.saturating_sub(t0.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            let now = self.scrape_all(st).await?;
            let (verdict, obs) = gate::judge(&gate::delta(&before, &now), &st.to, &limits);
            let done = t0.elapsed() >= st.step_wait;
            let breach = matches!(verdict, Verdict::Breach(_));
            self.progress.window(
                if done || breach { "window" } else { "live" },
                label,
                &st.to,
                &obs,
            );
            st.last = Some(obs);
            match verdict {
                Verdict::Breach(reason) => return Ok(Some(reason)),
                Verdict::Pass if done => {
                    self.save(st).await?;
                    return Ok(None);
                }
                Verdict::Pass => {}
            }
        }
    }
}
