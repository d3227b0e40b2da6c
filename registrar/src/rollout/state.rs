//! The rollout's state in etcd (`services/<svc>/rollout`, no lease, written only by the
//! operator CLI): everything needed to resume or roll back an interrupted rollout from
//! another shell. Every write is guarded by the key's `mod_revision`, so two operators
//! never drive the same service at once without noticing.

use std::collections::BTreeMap;
use std::time::Duration;

use catalog::store::{Compare, Op};
use catalog::{Keyspace, ServiceName, Store};
use serde::{Deserialize, Serialize};

use super::RolloutError;
use super::gate::Observation;
use crate::api::RunRequest;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// New replicas are being started (canary: before the first step).
    Starting,
    /// Canary step `step` (an index into `steps`) is live and being judged.
    Canary,
    /// Plain rolling replacement in progress.
    Rolling,
    /// Every step passed; the old replicas are being drained and removed.
    Promoting,
    /// A breach or `--abort`: old replicas back, new ones being drained.
    RollingBack,
    Succeeded,
    RolledBack,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack)
    }
}

/// Gate limits as stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateLimits {
    pub max_error_rate: f64,
    pub max_p99_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub service: String,
    /// The new version.
    pub to: String,
    /// Old versions → replica count when the rollout began.
    pub from: BTreeMap<String, u32>,
    /// How each new replica runs (image, command, env, limits; `port` is the base port).
    pub run: RunRequest,
    pub replicas: u16,
    pub max_surge: u16,
    /// Canary steps in percent; empty for a plain rolling replacement.
    pub steps: Vec<u32>,
    #[serde(with = "catalog::model::duration_str")]
    pub step_wait: Duration,
    #[serde(with = "catalog::model::duration_str")]
    pub ready_timeout: Duration,
    pub gate: GateLimits,
    /// The balancers' metrics pages.
    pub metrics: Vec<String>,
    pub phase: Phase,
    /// Index into `steps` of the current canary step.
    #[serde(default)]
    pub step: usize,
    /// Containers of the old versions when the rollout began.
    pub old: Vec<String>,
    /// Old containers this rollout has stopped (a rollback starts them again).
    #[serde(default)]
    pub stopped_old: Vec<String>,
    /// New containers this rollout has started.
    #[serde(default)]
    pub started_new: Vec<String>,
    /// The service's split before the rollout (restored by a rollback).
    #[serde(default)]
    pub prior_split: BTreeMap<String, u32>,
    /// Why it rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last gate window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Observation>,
    pub started_at: u64,
    pub updated_at: u64,
    /// etcd `mod_revision` this copy was read at / written with (0 = absent).
    #[serde(skip)]
    pub revision: i64,
}

impl RolloutState {
    /// Old containers this rollout has not stopped yet.
    pub fn remaining_old(&self) -> Vec<String> {
        self.old
            .iter()
            .filter(|n| !self.stopped_old.contains(n))
            .cloned()
            .collect()
    }
}

/// Reads the state; `Ok(None)` when the service never had a rollout.
pub async fn load<S: Store>(
    store: &S,
    keys: &Keyspace,
    svc: &ServiceName,
) -> Result<Option<RolloutState>, RolloutError> {
    let key = keys.rollout(svc);
    let Some(kv) = store.get(&key).await? else {
        return Ok(None);
    };
    let mut st: RolloutState = serde_json::from_slice(&kv.value).map_err(|e| {
        RolloutError::Invalid(format!("{key} is malformed ({e}); delete it to start over"))
    })?;
    st.revision = kv.mod_revision;
    Ok(Some(st))
}

/// Writes the state if nobody else wrote it since we read it.
pub async fn save<S: Store>(
    store: &S,
    keys: &Keyspace,
    svc: &ServiceName,
    st: &mut RolloutState,
) -> Result<(), RolloutError> {
    let key = keys.rollout(svc);
    st.updated_at = catalog::model::now_millis();
    let value = serde_json::to_vec(st).expect("state serializes");
    let applied = store
        .txn(
            vec![Compare::ModRevision(key.clone(), st.revision)],
            vec![Op::Put {
                key: key.clone(),
                value,
                lease: None,
            }],
        )
        .await?;
    if !applied {
        return Err(RolloutError::Busy(format!(
            "{key} was changed by someone else (another `registrar rollout`?)"
        )));
    }
    // Read back our own revision for the next guarded write.
    st.revision = store
        .get(&key)
        .await?
        .map(|kv| kv.mod_revision)
        .unwrap_or_default();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::store::MemStore;

    fn state() -> RolloutState {
        RolloutState {
            service: "web".into(),
            to: "v2".into(),
            from: [("v1".to_string(), 2)].into(),
            run: serde_json::from_str(
                r#"{"service":"web","version":"v2","image":"/img","port":8090,"command":["httpd"]}"#,
            )
            .unwrap(),
            replicas: 2,
            max_surge: 1,
            steps: vec![5, 100],
            step_wait: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(60),
            gate: GateLimits {
                max_error_rate: 0.01,
                max_p99_ratio: 1.5,
            },
            metrics: vec![],
            phase: Phase::Starting,
            step: 0,
            old: vec!["web-v1-0".into(), "web-v1-1".into()],
            stopped_old: vec![],
            started_new: vec![],
            prior_split: BTreeMap::new(),
            reason: None,
            last: None,
            started_at: 1,
            updated_at: 1,
            revision: 0,
        }
    }

    #[tokio::test]
    async fn saves_and_loads_and_refuses_a_concurrent_writer() {
        let store = MemStore::new();
        let keys = Keyspace::default();
        let web = ServiceName::new("web").unwrap();
        assert!(load(&store, &keys, &web).await.unwrap().is_none());
        let mut mine = state();
        save(&store, &keys, &web, &mut mine).await.unwrap();
        let mut theirs = load(&store, &keys, &web).await.unwrap().unwrap();
        assert_eq!(theirs.old, mine.old);
        assert_eq!(theirs.revision, mine.revision);
        theirs.phase = Phase::Canary;
        save(&store, &keys, &web, &mut theirs).await.unwrap();
        mine.step = 1;
        assert!(matches!(
            save(&store, &keys, &web, &mut mine).await,
            Err(RolloutError::Busy(_))
        ));
        // The stored key decodes as the catalog's rollout kind, ignored by other parts.
        let kv = store.get(&keys.rollout(&web)).await.unwrap().unwrap();
        let e = catalog::watch::decode(&keys, &kv).unwrap();
        assert!(matches!(e.value, catalog::Value::Rollout(_)));
    }
}
