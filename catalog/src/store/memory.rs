//! An in-memory [`Store`] with etcd's revision, lease, compaction and watch semantics, for
//! unit tests of pure logic (feature `test-util`). It is not a test of etcd behaviour: every
//! feature is also tested against a real etcd server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Compare, EventKind, Head, KeyValue, Lease, LeaseId, Listing, Op, RawEvent, Revision, Store,
    StoreError, WatchMessage, WatchSession,
};

const CLUSTER_ID: u64 = 0x5747_4152_4621;

#[derive(Default)]
struct State {
    revision: Revision,
    compacted: Revision,
    kvs: BTreeMap<String, KeyValue>,
    history: Vec<RawEvent>,
    leases: HashMap<LeaseId, (Duration, Instant)>,
    next_lease: LeaseId,
}

impl State {
    fn record(&mut self, kind: EventKind, kv: KeyValue) {
        self.history.push(RawEvent { kind, kv });
    }

    fn put(&mut self, key: String, value: Vec<u8>, lease: Option<LeaseId>) {
        let rev = self.revision;
        let create_revision = self.kvs.get(&key).map_or(rev, |kv| kv.create_revision);
        let kv = KeyValue {
            key: key.clone().into_bytes(),
            value,
            create_revision,
            mod_revision: rev,
            lease: lease.unwrap_or(0),
        };
        self.kvs.insert(key, kv.clone());
        self.record(EventKind::Put, kv);
    }

    fn delete(&mut self, key: &str) -> bool {
        let rev = self.revision;
        match self.kvs.remove(key) {
            Some(_) => {
                let kv = KeyValue {
                    key: key.as_bytes().to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: rev,
                    lease: 0,
                };
                self.record(EventKind::Delete, kv);
                true
            }
            None => false,
        }
    }

    /// Deletes the keys of leases past their deadline, one revision per lease, as etcd does.
    fn expire_leases(&mut self) -> bool {
        let now = Instant::now();
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.revoke(*id);
        }
        !expired.is_empty()
    }

    fn revoke(&mut self, id: LeaseId) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, kv)| kv.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            self.revision += 1;
            for k in keys {
                self.delete(&k);
            }
        }
    }
}

/// In-memory etcd look-alike. Clones share the same key space.
#[derive(Clone, Default)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl MemStore {
    pub fn new() -> Self {
        let store = Self::default();
        store.lock().revision = 1;
        store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another test thread panicked; the data is still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.expire_leases() {
            self.changed.notify_waiters();
        }
        state
    }

    /// Forgets history up to `revision`, like etcd's compaction.
    pub fn compact(&self, revision: Revision) {
        let mut s = self.lock();
        s.compacted = s.compacted.max(revision);
        let floor = s.compacted;
        s.history.retain(|e| e.kv.mod_revision > floor);
        drop(s);
        self.changed.notify_waiters();
    }

    fn apply(&self, f: impl FnOnce(&mut State) -> bool) -> Revision {
        let mut s = self.lock();
        s.revision += 1;
        if !f(&mut s) {
            // Nothing changed: etcd does not bump the revision for a no-op.
            s.revision -= 1;
        }
        let rev = s.revision;
        drop(s);
        self.changed.notify_waiters();
        rev
    }
}

fn matches(prefix: &str, key: &[u8]) -> bool {
    key.starts_with(prefix.as_bytes())
}

fn holds(s: &State, c: &Compare) -> bool {
    match c {
        Compare::ModRevision(k, r) => s.kvs.get(k).map_or(0, |kv| kv.mod_revision) == *r,
        Compare::CreateRevision(k, r) => s.kvs.get(k).map_or(0, |kv| kv.create_revision) == *r,
    }
}

impl Store for MemStore {
    type Watch = MemWatch;

    async fn list(&self, prefixes: &[String]) -> Result<Listing, StoreError> {
        let s = self.lock();
        let kvs = prefixes
            .iter()
            .flat_map(|p| {
                s.kvs
                    .range(p.clone()..)
                    .take_while(move |(k, _)| k.starts_with(p.as_str()))
                    .map(|(_, kv)| kv.clone())
            })
            .collect();
        Ok(Listing {
            revision: s.revision,
            cluster_id: CLUSTER_ID,
            kvs,
        })
    }

    async fn head(&self) -> Result<Head, StoreError> {
        Ok(Head {
            revision: self.lock().revision,
            cluster_id: CLUSTER_ID,
        })
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        if let Some(l) = lease
            && !self.lock().leases.contains_key(&l)
        {
            return Err(StoreError::Other("requested lease not found".into()));
        }
        Ok(self.apply(|s| {
            s.put(key.to_owned(), value, lease);
            true
        }))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut deleted = false;
        self.apply(|s| {
            deleted = s.delete(key);
            deleted
        });
        Ok(deleted)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, StoreError> {
        let mut ok = false;
        self.apply(|s| {
            ok = compares.iter().all(|c| holds(s, c));
            if !ok {
                return false;
            }
            let mut changed = false;
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => {
                        s.put(key, value, lease);
                        changed = true;
                    }
                    Op::Delete { key } => changed |= s.delete(&key),
                }
            }
            changed
        });
        Ok(ok)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let mut s = self.lock();
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(id, (ttl, Instant::now() + ttl));
        Ok(Lease { id, ttl })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Option<Duration>, StoreError> {
        let mut s = self.lock();
        Ok(s.leases.get_mut(&id).map(|(ttl, deadline)| {
            *deadline = Instant::now() + *ttl;
            *ttl
        }))
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut s = self.lock();
        s.revoke(id);
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn watch(&self, watches: &[(String, Revision)]) -> Result<MemWatch, StoreError> {
        Ok(MemWatch {
            store: self.clone(),
            prefixes: watches.iter().map(|(p, _)| p.clone()).collect(),
            cursors: watches.iter().map(|(_, r)| *r).collect(),
            created: 0,
            canceled: vec![false; watches.len()],
            progress_requested: false,
        })
    }
}

/// A watch on a [`MemStore`].
pub struct MemWatch {
    store: MemStore,
    prefixes: Vec<String>,
    /// Next revision each prefix's watch will deliver.
    cursors: Vec<Revision>,
    created: usize,
    canceled: Vec<bool>,
    progress_requested: bool,
}

impl MemWatch {
    fn poll_once(&mut self) -> Option<WatchMessage> {
        let s = self.store.lock();
        if self.created < self.prefixes.len() {
            self.created += 1;
            return Some(WatchMessage::Created {
                watch_id: self.created as i64 - 1,
                cluster_id: CLUSTER_ID,
                revision: s.revision,
            });
        }
        for (i, prefix) in self.prefixes.iter().enumerate() {
            if self.canceled[i] {
                continue;
            }
            if self.cursors[i] <= s.compacted {
                self.canceled[i] = true;
                return Some(WatchMessage::Canceled {
                    watch_id: i as i64,
                    compact_revision: s.compacted + 1,
                    reason: "required revision has been compacted".into(),
                });
            }
            let events: Vec<RawEvent> = s
                .history
                .iter()
                .filter(|e| e.kv.mod_revision >= self.cursors[i] && matches(prefix, &e.kv.key))
                .cloned()
                .collect();
            self.cursors[i] = s.revision + 1;
            if !events.is_empty() {
                return Some(WatchMessage::Events {
                    watch_id: i as i64,
                    cluster_id: CLUSTER_ID,
                    events,
                });
            }
        }
        if std::mem::take(&mut self.progress_requested) {
            return Some(WatchMessage::Progress {
                watch_id: None,
                cluster_id: CLUSTER_ID,
                revision: s.revision,
            });
        }
        None
    }
}

impl WatchSession for MemWatch {
    async fn next(&mut self) -> Result<Option<WatchMessage>, StoreError> {
        loop {
            let changed = self.store.changed.clone();
            let notified = changed.notified();
            if let Some(m) = self.poll_once() {
                return Ok(Some(m));
            }
            // Wake up now and then to expire leases even when nobody writes.
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    async fn request_progress(&mut self) -> Result<(), StoreError> {
        self.progress_requested = true;
        Ok(())
    }
}
