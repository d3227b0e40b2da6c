//! The checker's lease and its presence key `checkers/<id>`.
//!
//! Every mark hangs off this one lease: if the checker dies, its marks expire with it and
//! the other replicas, seeing its presence key go, take its instances over. When the lease
//! is lost (etcd expired it, or could not confirm it for a whole TTL) a new one is granted,
//! the presence key is put again, and the supervisor — told through the lease channel —
//! rewrites every mark under the new lease.

use std::sync::Arc;
use std::time::Duration;

use catalog::store::{Compare, Op};
use catalog::watch::Backoff;
use catalog::{Checker, CheckerId, Keyspace, LeaseKeeper, Store, StoreError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::writer::LeaseInfo;

pub struct Membership<S> {
    pub store: S,
    pub keyspace: Keyspace,
    pub id: CheckerId,
    pub ttl: Duration,
    pub metrics: Arc<Metrics>,
}

impl<S: Store + Clone> Membership<S> {
    /// Keeps a lease and the presence key for as long as it runs. Dropping the future stops
    /// the keep-alive (the lease then runs out, like a crashed checker's).
    pub async fn run(self, lease_tx: watch::Sender<Option<LeaseInfo>>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut generation = 0;
        let value = Checker {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started: catalog::model::now_millis(),
        };
        let value = serde_json::to_vec(&value).unwrap_or_default();
        loop {
            let keeper = match LeaseKeeper::grant(self.store.clone(), self.ttl).await {
                Ok(k) => k,
                Err(e) => {
                    warn!(error = %e, "granting the checker lease failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if !self.register(&keeper, &value, &mut backoff).await {
                continue; // the new lease was lost before the key could be put
            }
            backoff.reset();
            generation += 1;
            info!(checker = %self.id, lease = keeper.id(), ttl = ?keeper.ttl(), "checker registered");
            let _ = lease_tx.send(Some(LeaseInfo {
                id: keeper.id(),
                generation,
            }));
            let loss = keeper.lost().await;
            self.metrics.lease_losses.inc();
            warn!(checker = %self.id, ?loss, "checker lease lost; granting a new one and rewriting every mark");
            let _ = lease_tx.send(None);
        }
    }

    /// Puts `checkers/<id>` under the lease, waiting while another live lease holds the id
    /// (a replica started twice with one id, or our own previous lease not yet expired).
    /// `false` if the lease was lost meanwhile.
    async fn register(&self, keeper: &LeaseKeeper, value: &[u8], backoff: &mut Backoff) -> bool {
        let key = self.keyspace.checker(&self.id);
        let mut warned = false;
        loop {
            if keeper.loss().is_some() {
                return false;
            }
            match self.try_register(&key, value, keeper.id()).await {
                Ok(true) => return true,
                Ok(false) => {
                    if !warned {
                        warn!(checker = %self.id, key, "checker id is held by another lease (a second replica with the same id, or this checker's previous lease); waiting for it to expire");
                        warned = true;
                    }
                    tokio::time::sleep((self.ttl / 4).max(Duration::from_millis(100))).await;
                }
                Err(e) => {
                    warn!(error = %e, "registering the checker failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn try_register(&self, key: &str, value: &[u8], lease: i64) -> Result<bool, StoreError> {
        let created = self
            .store
            .txn(
                vec![Compare::CreateRevision(key.to_owned(), 0)],
                vec![Op::Put {
                    key: key.to_owned(),
                    value: value.to_vec(),
                    lease: Some(lease),
                }],
            )
            .await?;
        if created {
            return Ok(true);
        }
        // An earlier attempt may have succeeded without us hearing the answer.
        Ok(self
            .store
            .get(key)
            .await?
            .is_some_and(|kv| kv.lease == lease))
    }
}
