//! The forward phases: start the new replicas (surge by surge, each ready before the
//! next), walk the canary steps, or replace the old replicas one surge at a time.

use catalog::Store;
use serde_json::json;

use super::Rollout;
use crate::api::{Network, Request, Response, RunRequest};
use crate::rollout::RolloutError;
use crate::rollout::plan::{self, PlainMove};
use crate::rollout::state::{Phase, RolloutState};

impl<S: Store> Rollout<S> {
    /// Starts `n` new replicas and waits until they pass their checks.
    async fn start_new(&self, st: &mut RolloutState, n: u16) -> Result<(), RolloutError> {
        let used: Vec<String> = self.ps().await?.into_iter().map(|c| c.name).collect();
        let mut names = Vec::new();
        for i in plan::free_indexes(&used, &st.service, &st.to, n) {
            let mut run: RunRequest = st.run.clone();
            run.first = i;
            run.replicas = 1;
            if run.network == Network::Host {
                run.port = st.run.port.checked_add(i).ok_or_else(|| {
                    RolloutError::Invalid("port out of range; pass a lower --port".into())
                })?;
            }
            if let Response::Ok { message } = self.agent(Request::Run(run)).await? {
                names.extend(message.lines().map(str::to_owned));
            }
        }
        st.started_new.extend(names.iter().cloned());
        self.save(st).await?;
        self.progress.emit(
            "started",
            || format!("started {}", names.join(" ")),
            json!({"containers": names}),
        );
        self.wait_ready(st, &names).await
    }

    pub(super) async fn start_all(
        &self,
        st: &mut RolloutState,
    ) -> Result<Option<String>, RolloutError> {
        let running = self.new_alive(st).await?;
        self.wait_ready(st, &running).await?;
        let mut have = running.len() as u16;
        while have < st.replicas {
            let n = st.max_surge.min(st.replicas - have);
            self.start_new(st, n).await?;
            have += n;
        }
        st.phase = Phase::Canary;
        self.save(st).await?;
        Ok(None)
    }

    pub(super) async fn canary(
        &self,
        st: &mut RolloutState,
    ) -> Result<Option<String>, RolloutError> {
        while st.step < st.steps.len() {
            let pct = st.steps[st.step];
            let split = plan::canary_split(&st.from, &st.to, pct);
            self.save(st).await?;
            self.set_split(&split).await?;
            let label = format!(
                "step {}/{} ({} % to {})",
                st.step + 1,
                st.steps.len(),
                pct,
                st.to
            );
            self.progress.emit(
                "step",
                || format!("{label}: split {split:?}"),
                json!({"step": st.step + 1, "of": st.steps.len(), "percent": pct, "split": split}),
            );
            if let Some(reason) = self.window(st, &label).await? {
                return Ok(Some(format!("{label}: {reason}")));
            }
            st.step += 1;
        }
        st.phase = Phase::Promoting;
        self.save(st).await?;
        Ok(None)
    }

    pub(super) async fn rolling(
        &self,
        st: &mut RolloutState,
    ) -> Result<Option<String>, RolloutError> {
        let running = self.new_alive(st).await?;
        self.wait_ready(st, &running).await?;
        loop {
            let running = self.new_alive(st).await?.len() as u16;
            let remaining = st.remaining_old();
            match plan::plain_next(
                running,
                st.replicas,
                remaining.len(),
                st.old.len(),
                st.max_surge,
            ) {
                PlainMove::Start(n) => {
                    self.start_new(st, n).await?;
                    if !st.metrics.is_empty() && !st.step_wait.is_zero() {
                        let label = format!("{}/{} of {} up", running + n, st.replicas, st.to);
                        if let Some(reason) = self.window(st, &label).await? {
                            return Ok(Some(reason));
                        }
                    }
                }
                PlainMove::Stop(n) => {
                    let victims: Vec<String> = remaining.into_iter().take(n).collect();
                    self.stop(st, &victims, true).await?;
                }
                PlainMove::Done => break,
            }
        }
        st.phase = Phase::Promoting;
        self.save(st).await?;
        Ok(None)
    }
}
