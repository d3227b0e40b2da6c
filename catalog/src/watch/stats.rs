//! Counters a watcher keeps about itself. Plain atomics, so the catalog does not pick a
//! metrics library for its users: each binary exports these through its own registry.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared, lock-free (apart from one timestamp) view of a watcher's health.
#[derive(Debug, Default)]
pub struct WatchStats {
    malformed: AtomicU64,
    events: AtomicU64,
    resets: AtomicU64,
    reconnects: AtomicU64,
    revision: AtomicU64,
    last_sync: Mutex<Option<Instant>>,
}

impl WatchStats {
    /// Key/values skipped because their key or value could not be decoded.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Put and delete events applied.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Full relists (initial list included).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Watch streams re-opened after an error.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Highest etcd revision the watcher has confirmed.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// Time since etcd last confirmed this watcher is current; `None` before the first list.
    pub fn since_sync(&self) -> Option<Duration> {
        self.lock().map(|t| t.elapsed())
    }

    fn lock(&self) -> Option<Instant> {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add_malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_events(&self, n: usize) {
        self.events.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn synced(&self, revision: i64) {
        self.revision
            .fetch_max(revision.max(0) as u64, Ordering::Relaxed);
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}
