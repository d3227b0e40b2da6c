//! The keys this node owns in etcd, all under one node lease.
//!
//! Every put goes through here so that the set of owned keys is always known: when the
//! lease is lost (expired or unconfirmed for a whole TTL) a new one is granted and every
//! owned key is put again. A write that fails while etcd is unreachable is remembered and
//! retried by the periodic resync, so a registration is never silently lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use catalog::{LeaseKeeper, Store, StoreError};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::metrics::Metrics;

struct Inner {
    lease: Option<Arc<LeaseKeeper>>,
    owned: BTreeMap<String, Vec<u8>>,
    /// Owned keys whose last write failed.
    dirty: BTreeSet<String>,
    /// Keys whose delete failed: retried, or they would live on under our kept-alive lease.
    undeleted: BTreeSet<String>,
}

/// Owned keys plus the node lease they hang off.
pub struct Registry<S> {
    store: S,
    ttl: Duration,
    /// How often every owned key is compared with etcd and fixed if it drifted (deleted or
    /// overwritten behind our back).
    audit_every: Duration,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl<S: Store + Clone> Registry<S> {
    /// Grants the node lease.
    pub async fn start(
        store: S,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        Self::start_with_audit(store, ttl, Duration::from_secs(30), metrics).await
    }

    /// [`Registry::start`] with a chosen drift-audit period.
    pub async fn start_with_audit(
        store: S,
        ttl: Duration,
        audit_every: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let lease = LeaseKeeper::grant(store.clone(), ttl).await?;
        info!(lease = lease.id(), ttl = ?lease.ttl(), "node lease granted");
        Ok(Arc::new(Self {
            store,
            ttl,
            audit_every,
            inner: Mutex::new(Inner {
                lease: Some(Arc::new(lease)),
                owned: BTreeMap::new(),
                dirty: BTreeSet::new(),
                undeleted: BTreeSet::new(),
            }),
            metrics,
        }))
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Puts `key` under the node lease and remembers it as owned.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().await;
        inner.owned.insert(key.to_owned(), value.clone());
        inner.undeleted.remove(key);
        let lease = inner.lease.as_ref().map(|l| l.id());
        match self.store.put(key, value, lease).await {
            Ok(_) => {
                inner.dirty.remove(key);
                Ok(())
            }
            Err(e) => {
                self.metrics.etcd_errors.inc();
                inner.dirty.insert(key.to_owned());
                Err(e)
            }
        }
    }

    /// Deletes `key` and forgets it.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().await;
        inner.owned.remove(key);
        inner.dirty.remove(key);
        match self.store.delete(key).await {
            Ok(_) => {
                inner.undeleted.remove(key);
                Ok(())
            }
            Err(e) => {
                self.metrics.etcd_errors.inc();
                inner.undeleted.insert(key.to_owned());
                Err(e)
            }
        }
    }

    pub async fn owns(&self, key: &str) -> bool {
        self.inner.lock().await.owned.contains_key(key)
    }

    /// Keeps the lease: on loss, grants a new one and puts every owned key again; every
    /// few seconds retries writes that failed. Runs until `shutdown` resolves.
    pub async fn maintain(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut resync = tokio::time::interval(Duration::from_secs(2));
        let mut audit = tokio::time::interval(self.audit_every);
        audit.tick().await;
        loop {
            let lease = self.inner.lock().await.lease.clone();
            let lost = async {
                match &lease {
                    Some(l) => l.lost().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                loss = lost => {
                    warn!(?loss, "node lease lost; granting a new one and re-putting owned keys");
                    self.regrant().await;
                }
                _ = resync.tick() => self.retry_dirty().await,
                _ = audit.tick() => self.audit().await,
            }
        }
    }

    async fn regrant(&self) {
        let mut delay = Duration::from_millis(250);
        loop {
            match LeaseKeeper::grant(self.store.clone(), self.ttl).await {
                Ok(lease) => {
                    self.metrics.lease_regrants.inc();
                    let mut inner = self.inner.lock().await;
                    info!(lease = lease.id(), "new node lease");
                    inner.lease = Some(Arc::new(lease));
                    let all: Vec<String> = inner.owned.keys().cloned().collect();
                    inner.dirty.extend(all);
                    drop(inner);
                    self.retry_dirty().await;
                    return;
                }
                Err(e) => {
                    self.metrics.etcd_errors.inc();
                    warn!(error = %e, ?delay, "lease grant failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn retry_dirty(&self) {
        let mut inner = self.inner.lock().await;
        let undeleted: Vec<String> = inner.undeleted.iter().cloned().collect();
        for key in undeleted {
            match self.store.delete(&key).await {
                Ok(_) => {
                    inner.undeleted.remove(&key);
                }
                Err(e) => {
                    self.metrics.etcd_errors.inc();
                    warn!(%key, error = %e, "delete failed; will retry");
                    return;
                }
            }
        }
        if inner.dirty.is_empty() {
            return;
        }
        let lease = inner.lease.as_ref().map(|l| l.id());
        let keys: Vec<String> = inner.dirty.iter().cloned().collect();
        for key in keys {
            let Some(value) = inner.owned.get(&key).cloned() else {
                inner.dirty.remove(&key);
                continue;
            };
            match self.store.put(&key, value, lease).await {
                Ok(_) => {
                    inner.dirty.remove(&key);
                }
                Err(e) => {
                    self.metrics.etcd_errors.inc();
                    warn!(%key, error = %e, "re-put failed; will retry");
                    return;
                }
            }
        }
    }

    /// Compares every owned key with etcd and re-puts the ones that drifted. Writes only on
    /// a difference, so a quiet node never wakes the watchers.
    async fn audit(&self) {
        let owned: Vec<(String, Vec<u8>)> = {
            let inner = self.inner.lock().await;
            inner
                .owned
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let lease = self.inner.lock().await.lease.as_ref().map(|l| l.id());
        for (key, value) in owned {
            match self.store.get(&key).await {
                Ok(Some(kv)) if kv.value == value && Some(kv.lease) == lease => {}
                Ok(_) => {
                    warn!(%key, "owned key drifted in etcd; putting it again");
                    self.inner.lock().await.dirty.insert(key);
                }
                Err(e) => {
                    self.metrics.etcd_errors.inc();
                    warn!(error = %e, "audit read failed");
                    return;
                }
            }
        }
        self.retry_dirty().await;
    }

    /// Revokes the lease: every key of this node disappears at once.
    pub async fn revoke(&self) {
        let lease = self.inner.lock().await.lease.take();
        if let Some(l) = lease
            && let Ok(l) = Arc::try_unwrap(l)
            && let Err(e) = l.revoke(&self.store).await
        {
            warn!(error = %e, "lease revoke failed; keys expire after the TTL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::store::MemStore;

    #[tokio::test]
    async fn re_puts_owned_keys_after_lease_loss() {
        let store = MemStore::new();
        let reg = Registry::start(
            store.clone(),
            Duration::from_millis(300),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap();
        reg.put("/a", b"1".to_vec()).await.unwrap();
        reg.put("/b", b"2".to_vec()).await.unwrap();
        reg.delete("/b").await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(reg.clone().maintain(async {
            let _ = stop_rx.await;
        }));
        let old = store.get("/a").await.unwrap().unwrap().lease;
        store.lease_revoke(old).await.unwrap();
        assert!(store.get("/a").await.unwrap().is_none());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(kv) = store.get("/a").await.unwrap() {
                assert_ne!(kv.lease, old);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "key not re-put");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            store.get("/b").await.unwrap().is_none(),
            "deleted key stays deleted"
        );
        let _ = stop_tx.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn audit_repairs_keys_changed_behind_our_back() {
        let store = MemStore::new();
        let reg = Registry::start_with_audit(
            store.clone(),
            Duration::from_secs(10),
            Duration::from_millis(100),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap();
        reg.put("/a", b"1".to_vec()).await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(reg.clone().maintain(async {
            let _ = stop_rx.await;
        }));
        store.delete("/a").await.unwrap();
        store.put("/a-other", b"x".to_vec(), None).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while store.get("/a").await.unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "deleted key not repaired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.put("/a", b"tampered".to_vec(), None).await.unwrap();
        loop {
            let kv = store.get("/a").await.unwrap().unwrap();
            if kv.value == b"1" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "overwritten key not repaired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(());
        task.await.unwrap();
    }
}
