//! Readiness of new (or restarted) replicas: registered, passing their health checks for
//! that registration, and reported up by every balancer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use catalog::{HealthStatus, Instance, Key, Store};
use serde_json::json;
use tokio::time::Instant;

use super::agent::alive;
use super::{Rollout, SCRAPE_TIMEOUT};
use crate::rollout::RolloutError;
use crate::rollout::scrape;
use crate::rollout::state::RolloutState;

impl<S: Store> Rollout<S> {
    /// Waits until each named container's instance is registered, its health mark is
    /// passing for that registration, and every balancer reports it up.
    pub(super) async fn wait_ready(
        &self,
        st: &RolloutState,
        names: &[String],
    ) -> Result<(), RolloutError> {
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
}
