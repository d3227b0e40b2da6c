//! The orchestration of a rollout. The CLI runs it on the node whose agent runs the
//! service's containers: containers are started, stopped and inspected through the local
//! agent's socket; split, health marks and the rollout's own state go through etcd; the
//! gate reads the balancers' `/metrics`. Every step is written to the state key before it
//! takes effect, and every move is derived from what actually runs, so a rollout killed at
//! any point can be resumed (`--resume`) or rolled back (`--abort`) from another shell.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use catalog::{HealthStatus, Instance, Key, Keyspace, ServiceConfig, ServiceName, Store, Version};
use serde_json::json;
use tokio::time::Instant;

use super::RolloutError;
use super::gate::{self, Counts, Limits, Verdict};
use super::plan::{self, PlainMove};
use super::progress::Progress;
use super::scrape;
use super::state::{self, GateLimits, Phase, RolloutState};
use crate::api::{self, ContainerInfo, Network, Request, Response, RunRequest};

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

/// Time a step may take to stop one container: drain timeout + grace, plus slack.
const STOP_GRACE: Duration = Duration::from_secs(10);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// A new p99 under this never breaches the ratio gate (sub-millisecond ratios are noise).
const P99_FLOOR: f64 = 0.005;
/// Fewer new-version answers than this: the error rate is taken over this many.
const MIN_REQUESTS: f64 = 50.0;

pub struct Rollout<S> {
    store: S,
    keys: Keyspace,
    svc: ServiceName,
    socket: PathBuf,
    progress: Progress,
}

fn alive(c: &ContainerInfo) -> bool {
    c.state != "exited"
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

    async fn agent(&self, req: Request) -> Result<Response, RolloutError> {
        match api::call(&self.socket, &req)
            .await
            .map_err(|e| RolloutError::Agent(e.to_string()))?
        {
            Response::Error { message } => Err(RolloutError::Agent(message)),
            r => Ok(r),
        }
    }

    /// This service's containers on the agent.
    async fn ps(&self) -> Result<Vec<ContainerInfo>, RolloutError> {
        match self.agent(Request::Ps).await? {
            Response::Containers { containers } => Ok(containers
                .into_iter()
                .filter(|c| c.service == self.svc.as_str())
                .collect()),
            other => Err(RolloutError::Agent(format!("unexpected answer {other:?}"))),
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

    /// Checks the service, records the plan in etcd and sets the first split.
    async fn begin(&self, o: Options, revision: i64) -> Result<RolloutState, RolloutError> {
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

    /// Alive containers of the new version.
    async fn new_alive(&self, st: &RolloutState) -> Result<Vec<String>, RolloutError> {
        Ok(self
            .ps()
            .await?
            .into_iter()
            .filter(|c| c.version == st.to && alive(c))
            .map(|c| c.name)
            .collect())
    }

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

    async fn start_all(&self, st: &mut RolloutState) -> Result<Option<String>, RolloutError> {
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

    async fn canary(&self, st: &mut RolloutState) -> Result<Option<String>, RolloutError> {
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

    async fn rolling(&self, st: &mut RolloutState) -> Result<Option<String>, RolloutError> {
        let running = self.new_alive(st).await?;
        self.wait_ready(st, &running).await?;
        loop {
            let running = self.new_alive(st).await?.len() as u16;
            let remaining: Vec<String> = st
                .old
                .iter()
                .filter(|n| !st.stopped_old.contains(n))
                .cloned()
                .collect();
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

    /// Drains and stops containers together (each: draining → drain timeout → SIGTERM →
    /// grace → SIGKILL → key deleted, done by the agent).
    async fn stop(
        &self,
        st: &mut RolloutState,
        names: &[String],
        old: bool,
    ) -> Result<(), RolloutError> {
        if names.is_empty() {
            return Ok(());
        }
        if old {
            // Recorded first: if we die while they drain, a rollback starts them again.
            st.stopped_old.extend(names.iter().cloned());
            self.save(st).await?;
        }
        self.progress.emit(
            "draining",
            || format!("draining {}", names.join(" ")),
            json!({"containers": names}),
        );
        let stops = names.iter().map(|n| {
            self.agent(Request::Stop {
                name: n.clone(),
                version: None,
                grace: STOP_GRACE,
            })
        });
        for r in futures::future::join_all(stops).await {
            match r {
                Ok(_) => {}
                // Already gone is what we want.
                Err(RolloutError::Agent(m)) if m.starts_with("no container") => {}
                Err(e) => return Err(e),
            }
        }
        self.progress.emit(
            "stopped",
            || format!("stopped {}", names.join(" ")),
            json!({"containers": names}),
        );
        Ok(())
    }

    async fn remove(&self, names: &[String]) -> Result<(), RolloutError> {
        for n in names {
            match self.agent(Request::Rm { name: n.clone() }).await {
                Ok(_) => {}
                Err(RolloutError::Agent(m)) if m.starts_with("no container") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn promote(&self, st: &mut RolloutState) -> Result<Outcome, RolloutError> {
        let remaining: Vec<String> = st
            .old
            .iter()
            .filter(|n| !st.stopped_old.contains(n))
            .cloned()
            .collect();
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
    async fn rollback(
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

    /// Waits until each named container's instance is registered, its health mark is
    /// passing for that registration, and every balancer reports it up.
    async fn wait_ready(&self, st: &RolloutState, names: &[String]) -> Result<(), RolloutError> {
        if names.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let deadline = t0 + st.ready_timeout;
        let mut pending: BTreeSet<String> = names.iter().cloned().collect();
        let mut ids: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let ps = self.ps().await?;
            if let Some(dead) = ps.iter().find(|c| pending.contains(&c.name) && !alive(c)) {
                return Err(RolloutError::NotReady(format!(
                    "{} exited (code {:?}) before passing its checks",
                    dead.name, dead.exit_code
                )));
            }
            let passing = self.passing(&pending).await?;
            for (name, id) in passing {
                ids.insert(name.clone(), id);
            }
            let mut up = true;
            for url in &st.metrics {
                let samples = scrape::scrape(url, SCRAPE_TIMEOUT).await?;
                up &= ids.len() == pending.len()
                    && ids.values().all(|id| {
                        samples.iter().any(|s| {
                            s.name == "balancer_backend_up"
                                && s.label("service") == Some(st.service.as_str())
                                && s.label("instance_id").or(s.label("instance"))
                                    == Some(id.as_str())
                                && s.value == 1.0
                        })
                    });
            }
            if ids.len() == pending.len() && up {
                break;
            }
            if Instant::now() >= deadline {
                let missing: Vec<&String> =
                    pending.iter().filter(|n| !ids.contains_key(*n)).collect();
                return Err(RolloutError::NotReady(format!(
                    "not ready within {:?}: {}",
                    st.ready_timeout,
                    if missing.is_empty() {
                        "a balancer does not route to them yet".to_string()
                    } else {
                        format!("{missing:?} not passing")
                    }
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pending.clear();
        self.progress.emit(
            "ready",
            || {
                format!(
                    "{} passing and routable after {:.1}s",
                    names.join(" "),
                    t0.elapsed().as_secs_f64()
                )
            },
            json!({"containers": names, "after_s": t0.elapsed().as_secs_f64()}),
        );
        Ok(())
    }

    /// Containers (by name) whose current registration has a passing mark → instance id.
    async fn passing(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, String>, RolloutError> {
        let listing = self.store.list(&[self.keys.service(&self.svc)]).await?;
        let mut instances: BTreeMap<String, (Instance, i64)> = BTreeMap::new();
        let mut health = BTreeMap::new();
        for kv in &listing.kvs {
            match self.keys.parse(&kv.key) {
                Ok(Key::Instance(_, id)) => {
                    if let Ok(i) = serde_json::from_slice::<Instance>(&kv.value) {
                        instances.insert(id.to_string(), (i, kv.mod_revision));
                    }
                }
                Ok(Key::Health(_, id)) => {
                    if let Ok(h) = serde_json::from_slice::<catalog::Health>(&kv.value) {
                        health.insert(id.to_string(), h);
                    }
                }
                _ => {}
            }
        }
        Ok(instances
            .into_iter()
            .filter_map(|(id, (inst, rev))| {
                let name = inst.attrs.get("container")?;
                let h = health.get(&id)?;
                (names.contains(name)
                    && inst.state == catalog::InstanceState::Serving
                    && h.status == HealthStatus::Passing
                    && h.observed_mod_rev == rev)
                    .then(|| (name.clone(), id))
            })
            .collect())
    }

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
    async fn window(
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
