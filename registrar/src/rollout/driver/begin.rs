//! The start of a new rollout: checks what runs, derives the new replicas' run request from
//! an old one, records the plan in etcd and pins the first split.

use std::collections::BTreeMap;

use catalog::{Store, Version};
use serde_json::json;

use super::agent::alive;
use super::{Options, Rollout};
use crate::api::{ContainerInfo, Network, Request, Response};
use crate::rollout::RolloutError;
use crate::rollout::plan;
use crate::rollout::state::{GateLimits, Phase, RolloutState};

impl<S: Store> Rollout<S> {
    /// Checks the service, records the plan in etcd and sets the first split.
    pub(super) async fn begin(
        &self,
        o: Options,
        revision: i64,
    ) -> Result<RolloutState, RolloutError> {
        Version::new(&o.version).map_err(|e| RolloutError::Invalid(e.to_string()))?;
        let containers = self.ps().await?;
        let old: Vec<&ContainerInfo> = containers
            .iter()
            .filter(|c| c.version != o.version && alive(c))
            .collect();
        if old.is_empty() {
            return Err(RolloutError::Invalid(format!(
                "no running replicas of {} to replace on this agent (start them with `registrar run`)",
                self.svc
            )));
        }
        for c in containers.iter().filter(|c| c.version == o.version) {
            if alive(c) {
                return Err(RolloutError::Invalid(format!(
                    "{} ({}) runs already and no rollout started it; stop it first",
                    c.name, c.version
                )));
            }
            // Left over from an earlier, rolled back attempt.
            self.agent(Request::Rm {
                name: c.name.clone(),
            })
            .await?;
        }
        let mut run = match self
            .agent(Request::Inspect {
                name: old[0].name.clone(),
            })
            .await?
        {
            Response::Spec { run } => *run,
            other => return Err(RolloutError::Agent(format!("unexpected answer {other:?}"))),
        };
        run.version = o.version.clone();
        run.image = o.image.clone();
        run.replicas = 1;
        run.first = 0;
        if !o.command.is_empty() {
            run.command = o.command.clone();
        }
        run.port = match (o.port, run.network) {
            (Some(p), _) => p,
            (None, Network::Bridge) => run.port,
            (None, Network::Host) => containers
                .iter()
                .map(|c| c.port)
                .max()
                .and_then(|p| p.checked_add(1))
                .ok_or_else(|| {
                    RolloutError::Invalid("no free port above the old replicas; pass --port".into())
                })?,
        };
        let mut from = BTreeMap::new();
        for c in &old {
            *from.entry(c.version.clone()).or_insert(0u32) += 1;
        }
        let config = self.config().await?;
        let gate = GateLimits {
            max_error_rate: o
                .max_error_rate
                .or(config.canary.as_ref().map(|g| g.max_error_rate))
                .unwrap_or(0.01),
            max_p99_ratio: o
                .max_p99_ratio
                .or(config.canary.as_ref().map(|g| g.max_p99_ratio))
                .unwrap_or(1.5),
        };
        let now = catalog::model::now_millis();
        let canary = !o.steps.is_empty();
        let mut st = RolloutState {
            service: self.svc.to_string(),
            to: o.version.clone(),
            from,
            replicas: o.replicas.unwrap_or(old.len() as u16).max(1),
            max_surge: o.max_surge.max(1),
            steps: o.steps,
            step_wait: o.step_wait,
            ready_timeout: o.ready_timeout,
            gate,
            metrics: o.metrics,
            phase: if canary {
                Phase::Starting
            } else {
                Phase::Rolling
            },
            step: 0,
            old: old.iter().map(|c| c.name.clone()).collect(),
            stopped_old: vec![],
            started_new: vec![],
            prior_split: config
                .split
                .iter()
                .map(|(v, n)| (v.to_string(), *n))
                .collect(),
            reason: None,
            last: None,
            started_at: now,
            updated_at: now,
            revision,
            run,
        };
        self.save(&mut st).await?;
        let olds: Vec<String> = st.from.iter().map(|(v, n)| format!("{n}×{v}")).collect();
        self.progress.emit(
            "begin",
            || {
                format!(
                    "rollout {}: {} → {} replicas of {} ({}; max surge {}, step wait {:?}, gates: 5xx ≤ {:.2} %, p99 ≤ {:.2}× old)",
                    self.svc,
                    olds.join(" "),
                    st.replicas,
                    st.to,
                    if canary {
                        format!("canary steps {:?} %", st.steps)
                    } else {
                        "rolling replacement".into()
                    },
                    st.max_surge,
                    st.step_wait,
                    st.gate.max_error_rate * 100.0,
                    st.gate.max_p99_ratio
                )
            },
            json!({"service": self.svc.as_str(), "to": st.to, "from": st.from, "replicas": st.replicas,
                   "steps": st.steps, "max_surge": st.max_surge, "gate": st.gate}),
        );
        // New replicas must not get traffic before the first step: pin the old versions.
        // A plain replacement lets every routable instance compete, so any split goes.
        if canary {
            self.set_split(&plan::canary_split(&st.from, &st.to, 0))
                .await?;
        } else if !st.prior_split.is_empty() {
            self.set_split(&BTreeMap::new()).await?;
        }
        Ok(st)
    }
}
