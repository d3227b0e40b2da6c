//! The orchestration of a rollout. The CLI runs it on the node whose agent runs the
//! service's containers: containers are started, stopped and inspected through the local
//! agent's socket; split, health marks and the rollout's own state go through etcd; the
//! gate reads the balancers' `/metrics`. Every step is written to the state key before it
//! takes effect, and every move is derived from what actually runs, so a rollout killed at
//! any point can be resumed (`--resume`) or rolled back (`--abort`) from another shell.
//!
//! This file holds the options, the state-key and split writes, and the loop that moves a
//! rollout from phase to phase; `begin` starts one, `advance` runs the forward phases,
//! `finish` promotes or rolls back, `ready` and `window` are the health and metrics gates,
//! and `agent` is the local agent's socket.

mod advance;
mod agent;
mod begin;
mod finish;
mod ready;
mod window;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use catalog::{Keyspace, ServiceConfig, ServiceName, Store, Version};
use serde_json::json;

use super::RolloutError;
use super::progress::Progress;
use super::state::{self, Phase, RolloutState};

/// Options of a new rollout (from the command line).
#[derive(Debug, Clone)]
pub struct Options {
    pub version: String,
    pub image: String,
    /// Command of the new replicas; empty = the old replicas' command.
    pub command: Vec<String>,
    /// Port of the first new replica (host network); default: above every port in use.
    pub port: Option<u16>,
    /// Default: as many as the old versions run.
    pub replicas: Option<u16>,
    pub max_surge: u16,
    /// Empty: plain rolling replacement.
    pub steps: Vec<u32>,
    pub step_wait: Duration,
    pub ready_timeout: Duration,
    /// Default: the service's `canary` gates, else 1 % and 1.5×.
    pub max_error_rate: Option<f64>,
    pub max_p99_ratio: Option<f64>,
    pub metrics: Vec<String>,
}

pub enum Action {
    Start(Box<Options>),
    Resume,
    Abort,
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Succeeded,
    RolledBack(String),
}

/// How long one scrape of a balancer's `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Rollout<S> {
    store: S,
    keys: Keyspace,
    svc: ServiceName,
    socket: PathBuf,
    progress: Progress,
}

impl<S: Store> Rollout<S> {
    pub fn new(store: S, keys: Keyspace, svc: ServiceName, socket: PathBuf, json: bool) -> Self {
        Self {
            store,
            keys,
            svc,
            socket,
            progress: Progress::new(json),
        }
    }

    pub async fn run(&self, action: Action) -> Result<Outcome, RolloutError> {
        let existing = state::load(&self.store, &self.keys, &self.svc).await?;
        match action {
            Action::Start(opts) => {
                if let Some(st) = &existing
                    && !st.phase.is_terminal()
                {
                    return Err(RolloutError::Busy(format!(
                        "a rollout of {} to {} is in progress ({:?}); use --resume or --abort",
                        self.svc, st.to, st.phase
                    )));
                }
                let rev = existing.map(|s| s.revision).unwrap_or(0);
                let mut st = self.begin(*opts, rev).await?;
                self.drive(&mut st).await
            }
            Action::Resume => {
                let mut st = self.active(existing)?;
                self.progress.emit(
                    "resume",
                    || {
                        format!(
                            "resuming the rollout of {} to {} ({:?})",
                            self.svc, st.to, st.phase
                        )
                    },
                    json!({"service": self.svc.as_str(), "to": st.to, "phase": st.phase}),
                );
                self.drive(&mut st).await
            }
            Action::Abort => {
                let mut st = self.active(existing)?;
                self.rollback(&mut st, "aborted by the operator".into())
                    .await
            }
        }
    }

    fn active(&self, existing: Option<RolloutState>) -> Result<RolloutState, RolloutError> {
        match existing {
            Some(st) if !st.phase.is_terminal() => Ok(st),
            Some(st) => Err(RolloutError::Invalid(format!(
                "the last rollout of {} (to {}) is over ({:?}); nothing to resume or abort",
                self.svc, st.to, st.phase
            ))),
            None => Err(RolloutError::Invalid(format!(
                "{} has no rollout",
                self.svc
            ))),
        }
    }

    async fn config(&self) -> Result<ServiceConfig, RolloutError> {
        let key = self.keys.config(&self.svc);
        Ok(match self.store.get(&key).await? {
            Some(kv) => serde_json::from_slice(&kv.value)
                .map_err(|e| RolloutError::Invalid(format!("{key} is malformed: {e}")))?,
            None => ServiceConfig::default(),
        })
    }

    async fn set_split(&self, split: &BTreeMap<String, u32>) -> Result<(), RolloutError> {
        let split: BTreeMap<Version, u32> = split
            .iter()
            .map(|(v, n)| {
                Version::new(v)
                    .map(|v| (v, *n))
                    .map_err(|e| RolloutError::Invalid(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        crate::operator::update_config(&self.store, &self.keys, &self.svc, |c| {
            c.split = split.clone()
        })
        .await?;
        Ok(())
    }

    async fn save(&self, st: &mut RolloutState) -> Result<(), RolloutError> {
        state::save(&self.store, &self.keys, &self.svc, st).await
    }

    async fn drive(&self, st: &mut RolloutState) -> Result<Outcome, RolloutError> {
        loop {
            let step = match st.phase {
                Phase::Starting => self.start_all(st).await,
                Phase::Canary => self.canary(st).await,
                Phase::Rolling => self.rolling(st).await,
                Phase::Promoting => return self.promote(st).await,
                Phase::RollingBack => {
                    let reason = st.reason.clone().unwrap_or_default();
                    return self.rollback(st, reason).await;
                }
                Phase::Succeeded => return Ok(Outcome::Succeeded),
                Phase::RolledBack => {
                    return Ok(Outcome::RolledBack(st.reason.clone().unwrap_or_default()));
                }
            };
            match step {
                Ok(None) => {}
                Ok(Some(reason)) | Err(RolloutError::NotReady(reason)) => {
                    return self.rollback(st, reason).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
