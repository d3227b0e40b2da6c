//! The two ends of a rollout: promotion (old replicas drained and removed, split cleared)
//! and rollback (old replicas back, new ones drained and removed, split restored).

use std::collections::BTreeMap;

use catalog::Store;
use serde_json::json;

use super::agent::alive;
use super::{Outcome, Rollout};
use crate::api::Request;
use crate::rollout::RolloutError;
use crate::rollout::plan;
use crate::rollout::state::{Phase, RolloutState};

impl<S: Store> Rollout<S> {
    pub(super) async fn promote(&self, st: &mut RolloutState) -> Result<Outcome, RolloutError> {
        let remaining = st.remaining_old();
        self.stop(st, &remaining, true).await?;
        let old = st.old.clone();
        self.remove(&old).await?;
        self.set_split(&BTreeMap::new()).await?;
        st.phase = Phase::Succeeded;
        self.save(st).await?;
        self.progress.emit(
            "succeeded",
            || {
                format!(
                    "rollout of {} to {} succeeded; split cleared, old replicas removed",
                    self.svc, st.to
                )
            },
            json!({"service": self.svc.as_str(), "to": st.to}),
        );
        Ok(Outcome::Succeeded)
    }

    /// Old replicas back, traffic back, new replicas drained and removed, split restored.
    pub(super) async fn rollback(
        &self,
        st: &mut RolloutState,
        reason: String,
    ) -> Result<Outcome, RolloutError> {
        if st.phase != Phase::RollingBack {
            st.phase = Phase::RollingBack;
            st.reason = Some(reason.clone());
            self.save(st).await?;
        }
        self.progress.emit(
            "rollback",
            || format!("rolling back: {reason}"),
            json!({"reason": reason}),
        );
        let containers = self.ps().await?;
        let back: Vec<String> = containers
            .iter()
            .filter(|c| st.stopped_old.contains(&c.name) && !alive(c))
            .map(|c| c.name.clone())
            .collect();
        for n in &back {
            self.agent(Request::Start { name: n.clone() }).await?;
        }
        if !back.is_empty() {
            self.progress.emit(
                "restarted",
                || format!("started old replicas again: {}", back.join(" ")),
                json!({"containers": back}),
            );
        }
        // Every old replica must serve again before the new ones go.
        let old_alive: Vec<String> = self
            .ps()
            .await?
            .into_iter()
            .filter(|c| st.old.contains(&c.name) && alive(c))
            .map(|c| c.name)
            .collect();
        if let Err(e) = self.wait_ready(st, &old_alive).await {
            self.progress.emit(
                "warning",
                || format!("old replicas are not all passing ({e}); continuing the rollback"),
                json!({"warning": e.to_string()}),
            );
        }
        st.stopped_old.retain(|n| !back.contains(n));
        if !st.steps.is_empty() {
            self.set_split(&plan::canary_split(&st.from, &st.to, 0))
                .await?;
        }
        let new = self.new_alive(st).await?;
        self.stop(st, &new, false).await?;
        let all_new: Vec<String> = self
            .ps()
            .await?
            .into_iter()
            .filter(|c| c.version == st.to)
            .map(|c| c.name)
            .collect();
        self.remove(&all_new).await?;
        self.set_split(&st.prior_split.clone()).await?;
        st.phase = Phase::RolledBack;
        self.save(st).await?;
        self.progress.emit(
            "rolled_back",
            || {
                format!(
                    "rolled back {}: all traffic on {:?} again, {} replicas removed",
                    self.svc,
                    st.from.keys().collect::<Vec<_>>(),
                    st.to
                )
            },
            json!({"service": self.svc.as_str(), "reason": reason}),
        );
        Ok(Outcome::RolledBack(reason))
    }
}
