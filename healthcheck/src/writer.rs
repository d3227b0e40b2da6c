//! The only code that writes health marks: guarded transactions, coalesced per instance,
//! retried while etcd is unreachable, never blocking the probes.
//!
//! Every write is `if mod_revision(instance key) == guard then …`: a verdict about a
//! registration that has since been replaced (or removed) is dropped by etcd itself, with no
//! read-modify-write race. Only the newest wish per instance is kept, so an instance that
//! flaps while etcd is down costs one write when etcd comes back, not one per flap.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use catalog::store::{Compare, Guarded, LeaseId, MAX_BATCH, Op};
use catalog::watch::Backoff;
use catalog::{Health, InstanceId, Keyspace, ServiceName, Store, StoreError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// One instance, as the writer and the supervisor name it.
pub type Item = (ServiceName, InstanceId);

/// The checker's current lease, and a counter that changes with every new grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: LeaseId,
    pub generation: u64,
}

/// What to do to one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteKind {
    /// Put the health mark under the checker's lease.
    Mark(Health),
    /// Delete a health mark left by an earlier registration of the instance, or by an
    /// instance that is gone (guard 0).
    Unmark,
    /// Delete the instance's registration (and its mark): `deregister_after` ran out.
    Deregister,
}

impl WriteKind {
    pub fn name(&self) -> &'static str {
        match self {
            WriteKind::Mark(_) => "mark",
            WriteKind::Unmark => "unmark",
            WriteKind::Deregister => "deregister",
        }
    }
}

/// A wish of the supervisor.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub item: Item,
    /// Identifies the wish, so the supervisor can match the answer with what it still wants.
    pub ticket: u64,
    /// `mod_revision` the instance key must still have; 0: the instance key must be absent.
    pub guard: i64,
    pub kind: WriteKind,
}

/// How a write ended (failures are retried, not reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    /// Applied, under the lease of this generation (0 for deletes).
    Applied { lease_generation: u64 },
    /// The guard failed: the instance changed or is gone; the verdict was dropped.
    Stale,
}

#[derive(Debug, Clone)]
pub struct WriteDone {
    pub item: Item,
    pub ticket: u64,
    pub kind: &'static str,
    pub result: WriteResult,
}

/// The writer's settings.
pub struct Writer<S> {
    pub store: S,
    pub keyspace: Keyspace,
    pub metrics: std::sync::Arc<Metrics>,
    /// Transactions in flight at once, each carrying up to [`MAX_BATCH`] instances' writes
    /// (a fleet-wide flip, or a start-up, is thousands of writes).
    pub concurrency: usize,
}

/// A batch of wishes on its way to etcd, and how it ended.
type Sent = (Vec<WriteRequest>, Result<Vec<WriteResult>, StoreError>);

impl<S: Store + Clone> Writer<S> {
    /// Runs until `requests` closes.
    pub async fn run(
        self,
        mut requests: mpsc::UnboundedReceiver<WriteRequest>,
        done: mpsc::UnboundedSender<WriteDone>,
        mut lease: watch::Receiver<Option<LeaseInfo>>,
    ) {
        let mut pending: HashMap<Item, WriteRequest> = HashMap::new();
        let mut order: VecDeque<Item> = VecDeque::new();
        let mut in_flight: HashSet<Item> = HashSet::new();
        let mut running: JoinSet<Sent> = JoinSet::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut resume_at = Instant::now();
        let mut failing = false;
        loop {
            let current = *lease.borrow();
            // Start what may start: not paused by a failure, and with a lease for marks.
            // Whatever queued up while the previous transactions were in flight goes out
            // together: one etcd commit for up to MAX_BATCH instances.
            while running.len() < self.concurrency.max(1) && Instant::now() >= resume_at {
                let mut batch = Vec::new();
                while batch.len() < MAX_BATCH {
                    let Some(item) = order.pop_front() else { break };
                    if in_flight.contains(&item) {
                        continue; // queued again when the running write ends
                    }
                    let Some(req) = pending.remove(&item) else {
                        continue;
                    };
                    if matches!(req.kind, WriteKind::Mark(_)) && current.is_none() {
                        // No lease right now: wait for the next one.
                        pending.insert(item.clone(), req);
                        order.push_front(item);
                        break;
                    }
                    in_flight.insert(item);
                    batch.push(req);
                }
                if batch.is_empty() {
                    break;
                }
                let store = self.store.clone();
                let keyspace = self.keyspace.clone();
                running.spawn(async move {
                    let result = attempt(&store, &keyspace, &batch, current).await;
                    (batch, result)
                });
            }
            let paused = Instant::now() < resume_at && !order.is_empty();
            tokio::select! {
                req = requests.recv() => {
                    let Some(mut req) = req else { return };
                    // Take every wish already queued, so that they share transactions.
                    loop {
                        let item = req.item.clone();
                        if pending.insert(item.clone(), req).is_none() {
                            order.push_back(item);
                        }
                        match requests.try_recv() {
                            Ok(next) => req = next,
                            Err(_) => break,
                        }
                    }
                },
                Some(joined) = running.join_next() => {
                    let Ok((batch, result)) = joined else { continue };
                    match result {
                        Ok(results) => {
                            if failing {
                                warn!("etcd writes succeed again");
                                failing = false;
                            }
                            backoff.reset();
                            for (req, result) in batch.into_iter().zip(results) {
                                let label = match result {
                                    WriteResult::Applied { .. } => "applied",
                                    WriteResult::Stale => "stale",
                                };
                                self.metrics.writes.with_label_values(&[req.kind.name(), label]).inc();
                                let item = req.item;
                                in_flight.remove(&item);
                                if pending.contains_key(&item) {
                                    order.push_back(item.clone());
                                }
                                let _ = done.send(WriteDone { item, ticket: req.ticket, kind: req.kind.name(), result });
                            }
                        }
                        Err(e) => {
                            self.metrics.write_errors.inc();
                            if !failing {
                                warn!(error = %e, writes = batch.len(), "etcd write failed; retrying with backoff");
                                failing = true;
                            } else {
                                debug!(error = %e, writes = batch.len(), "etcd write failed again");
                            }
                            resume_at = Instant::now() + backoff.next_delay();
                            for req in batch {
                                let item = req.item.clone();
                                in_flight.remove(&item);
                                // Retry unless a newer wish replaced this one meanwhile.
                                pending.entry(item.clone()).or_insert(req);
                                order.push_back(item);
                            }
                        }
                    }
                },
                _ = tokio::time::sleep_until(resume_at), if paused => {},
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                },
            }
        }
    }
}

/// The guarded transaction of one wish: `if mod_revision(instance) == guard then …`.
fn guarded(
    keyspace: &Keyspace,
    req: &WriteRequest,
    lease: Option<LeaseInfo>,
) -> Result<Guarded, StoreError> {
    let (svc, id) = &req.item;
    let instance_key = keyspace.instance(svc, id);
    let health_key = keyspace.health(svc, id);
    let compares = if req.guard == 0 {
        vec![Compare::CreateRevision(instance_key.clone(), 0)]
    } else {
        vec![Compare::ModRevision(instance_key.clone(), req.guard)]
    };
    let ops = match &req.kind {
        WriteKind::Mark(health) => {
            let lease = lease.ok_or_else(|| StoreError::Other("no checker lease".into()))?;
            let value = serde_json::to_vec(health).map_err(|e| StoreError::Other(e.to_string()))?;
            vec![Op::Put {
                key: health_key,
                value,
                lease: Some(lease.id),
            }]
        }
        WriteKind::Unmark => vec![Op::Delete { key: health_key }],
        WriteKind::Deregister => vec![
            Op::Delete { key: instance_key },
            Op::Delete { key: health_key },
        ],
    };
    Ok(Guarded { compares, ops })
}

/// Writes a batch of wishes (distinct instances, so distinct keys) in one request.
async fn attempt<S: Store>(
    store: &S,
    keyspace: &Keyspace,
    batch: &[WriteRequest],
    lease: Option<LeaseInfo>,
) -> Result<Vec<WriteResult>, StoreError> {
    let txns = batch
        .iter()
        .map(|req| guarded(keyspace, req, lease))
        .collect::<Result<Vec<_>, _>>()?;
    let applied = store.txn_batch(txns).await?;
    Ok(batch
        .iter()
        .zip(applied)
        .map(|(req, applied)| match (applied, &req.kind) {
            (false, _) => WriteResult::Stale,
            (true, WriteKind::Mark(_)) => WriteResult::Applied {
                lease_generation: lease.map_or(0, |l| l.generation),
            },
            (true, _) => WriteResult::Applied {
                lease_generation: 0,
            },
        })
        .collect())
}
