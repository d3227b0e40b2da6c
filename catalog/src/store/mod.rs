//! The `Store` trait: the few etcd v3 operations wharf needs, with etcd's semantics.
//!
//! Every part talks to etcd through this trait so that the list-then-watch logic, lease
//! handling and guarded writes are written once. [`EtcdStore`] is the real implementation;
//! [`MemStore`] (feature `test-util`) mimics etcd's revisions, leases, compaction and watch
//! for unit tests of pure logic.

mod etcd;
#[cfg(any(test, feature = "test-util"))]
mod memory;

use std::future::Future;
use std::time::Duration;

pub use etcd::{EtcdConfig, EtcdStore, TlsFiles};
#[cfg(any(test, feature = "test-util"))]
pub use memory::MemStore;

/// An etcd revision: the logical clock of the whole key space.
pub type Revision = i64;
/// An etcd lease id.
pub type LeaseId = i64;

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: LeaseId,
}

/// The result of a consistent read of one or more prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The store revision the read was taken at; every key is as of this revision.
    pub revision: Revision,
    /// Identity of the cluster that answered; a change means "another etcd", so relist.
    pub cluster_id: u64,
    pub kvs: Vec<KeyValue>,
}

/// Where the store is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub revision: Revision,
    pub cluster_id: u64,
}

/// A condition of a guarded transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals the value (0 = the key is absent).
    ModRevision(String, Revision),
    /// The key's `create_revision` equals the value (0 = the key is absent).
    CreateRevision(String, Revision),
}

/// An operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// One guarded transaction of a [`Store::txn_batch`]: `ops` apply if every compare holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// Most transactions [`Store::txn_batch`] takes at once (etcd's `--max-txn-ops` defaults to
/// 128 operations per transaction level).
pub const MAX_BATCH: usize = 100;

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL etcd granted, which may exceed the one asked for.
    pub ttl: Duration,
}

/// What happened to a key in a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and `kv.mod_revision` is the
/// revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The watch with this id exists; `revision` is the store revision when it was created.
    Created {
        watch_id: i64,
        cluster_id: u64,
        revision: Revision,
    },
    /// Changes, in revision order; one revision is never split across two messages.
    Events {
        watch_id: i64,
        cluster_id: u64,
        events: Vec<RawEvent>,
    },
    /// No change up to `revision`. `watch_id` is `None` for an answer to
    /// [`WatchSession::request_progress`], which only proves the stream is alive.
    Progress {
        watch_id: Option<i64>,
        cluster_id: u64,
        revision: Revision,
    },
    /// The watch is over. `compact_revision > 0` means the start revision was compacted.
    Canceled {
        watch_id: i64,
        compact_revision: Revision,
        reason: String,
    },
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd watch stream closed")]
    StreamClosed,
    #[error("invalid etcd configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

/// A live watch stream over one or more prefixes.
pub trait WatchSession: Send {
    /// The next message; `Ok(None)` when the server closed the stream.
    fn next(&mut self) -> impl Future<Output = Result<Option<WatchMessage>, StoreError>> + Send;
    /// Asks the server to answer with a [`WatchMessage::Progress`] soon.
    fn request_progress(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The etcd v3 operations wharf uses.
pub trait Store: Send + Sync + 'static {
    type Watch: WatchSession + 'static;

    /// Linearizable read of every key under each prefix, all as of one revision.
    fn list(&self, prefixes: &[String])
    -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// Linearizable read of the current revision and cluster id.
    fn head(&self) -> impl Future<Output = Result<Head, StoreError>> + Send;

    /// Linearizable read of one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Writes `value`, attached to `lease` if given; returns the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Deletes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Applies `ops` if every compare holds; returns whether it did.
    fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Applies independent guarded transactions in one request; each applies if and only if
    /// its own compares hold, and the result says, per transaction, whether it did. On etcd
    /// this is one transaction of nested transactions: one round trip and one commit (one
    /// revision) for the whole batch, which is what lets a checker write thousands of marks
    /// a second. No two transactions may touch the same key; at most [`MAX_BATCH`] of them.
    ///
    /// The default runs them one by one (fine for the in-memory store).
    fn txn_batch(
        &self,
        txns: Vec<Guarded>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        async move {
            let mut applied = Vec::with_capacity(txns.len());
            for t in txns {
                applied.push(self.txn(t.compares, t.ops).await?);
            }
            Ok(applied)
        }
    }

    fn lease_grant(&self, ttl: Duration) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Refreshes a lease once; `Ok(None)` when the lease no longer exists.
    fn lease_keep_alive(
        &self,
        id: LeaseId,
    ) -> impl Future<Output = Result<Option<Duration>, StoreError>> + Send;

    fn lease_revoke(&self, id: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Opens one watch stream with a watch per `(prefix, start revision)` (start inclusive),
    /// with progress notifications. Watch ids are the index of the prefix in `watches`.
    fn watch(
        &self,
        watches: &[(String, Revision)],
    ) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
}
