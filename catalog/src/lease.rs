//! Keeping one lease alive, and noticing when it is gone.
//!
//! One lease per node agent and per checker (never one per key): every key the owner writes
//! hangs off it, so a dead host's keys disappear after one TTL. A keep-alive is sent every
//! TTL/3, as etcd's Go client does. The lease is reported lost when etcd says it no longer
//! exists, or when no keep-alive has been acknowledged for a whole TTL (etcd has then most
//! likely expired it). The owner reacts by granting a new lease and putting its keys again.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::store::{Lease, LeaseId, Store, StoreError};

/// Why a lease was given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLoss {
    /// etcd answered that the lease does not exist (it expired or was revoked).
    Expired,
    /// etcd did not acknowledge a keep-alive for a whole TTL.
    Unconfirmed,
}

/// A granted lease with a background keep-alive loop.
pub struct LeaseKeeper {
    lease: Lease,
    lost: watch::Receiver<Option<LeaseLoss>>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of (at least) `ttl` and starts keeping it alive.
    pub async fn grant<S: Store + Clone>(store: S, ttl: Duration) -> Result<Self, StoreError> {
        let lease = store.lease_grant(ttl).await?;
        let (tx, lost) = watch::channel(None);
        let task = tokio::spawn(keep_alive_loop(store, lease, tx));
        Ok(Self { lease, lost, task })
    }

    pub fn id(&self) -> LeaseId {
        self.lease.id
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.lease.ttl
    }

    /// Why the lease was lost, if it was.
    pub fn loss(&self) -> Option<LeaseLoss> {
        self.lost.borrow().clone()
    }

    /// Resolves when the lease is lost. Cancel-safe.
    pub async fn lost(&self) -> LeaseLoss {
        let mut rx = self.lost.clone();
        loop {
            if let Some(loss) = rx.borrow_and_update().clone() {
                return loss;
            }
            if rx.changed().await.is_err() {
                // The loop only ends after reporting a loss, or when we drop it.
                return LeaseLoss::Unconfirmed;
            }
        }
    }

    /// Stops the keep-alive loop and revokes the lease, deleting every key attached to it.
    pub async fn revoke<S: Store>(self, store: &S) -> Result<(), StoreError> {
        self.task.abort();
        store.lease_revoke(self.lease.id).await
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        // Dropping without revoking lets the lease run out after its TTL, which is what a
        // crashed owner would do too.
        self.task.abort();
    }
}

async fn keep_alive_loop<S: Store>(store: S, lease: Lease, lost: watch::Sender<Option<LeaseLoss>>) {
    let period = (lease.ttl / 3).max(Duration::from_millis(100));
    let retry = period.min(Duration::from_secs(1));
    let mut confirmed = Instant::now();
    loop {
        let wait = match store.lease_keep_alive(lease.id).await {
            Ok(Some(ttl)) => {
                debug!(lease = lease.id, ?ttl, "lease refreshed");
                confirmed = Instant::now();
                period
            }
            Ok(None) => {
                warn!(lease = lease.id, "lease expired");
                let _ = lost.send(Some(LeaseLoss::Expired));
                return;
            }
            Err(e) => {
                if confirmed.elapsed() >= lease.ttl {
                    warn!(lease = lease.id, error = %e, "lease unconfirmed for a whole TTL");
                    let _ = lost.send(Some(LeaseLoss::Unconfirmed));
                    return;
                }
                warn!(lease = lease.id, error = %e, "lease keep-alive failed; retrying");
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[tokio::test]
    async fn keeps_alive_then_reports_revocation() {
        let store = MemStore::new();
        let keeper = LeaseKeeper::grant(store.clone(), Duration::from_millis(300))
            .await
            .unwrap();
        store
            .put("/k", b"v".to_vec(), Some(keeper.id()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(store.get("/k").await.unwrap().is_some(), "kept alive");
        store.lease_revoke(keeper.id()).await.unwrap();
        let loss = tokio::time::timeout(Duration::from_secs(2), keeper.lost())
            .await
            .unwrap();
        assert_eq!(loss, LeaseLoss::Expired);
    }
}
