//! The list-then-watch `Watcher`: turns etcd into a stream of typed diffs.
//!
//! Algorithm (see DESIGN.md, "Watching etcd correctly"):
//!
//! 1. List every prefix with a linearizable read at one revision `R`; emit `Reset`.
//! 2. Watch each prefix from `R + 1` on one stream, with progress notifications. Every
//!    prefix keeps its own cursor: the last revision etcd confirmed for it (an event's
//!    `mod_revision`, or the revision of a progress notification meant for that watch).
//! 3. When the stream breaks (etcd restarted, network cut, no answer to a progress request),
//!    reopen it from each cursor + 1 after a jittered, capped backoff: no relist, no event
//!    lost or repeated.
//! 4. Relist and emit a new `Reset` when continuing is unsafe: the start revision was
//!    compacted, the server cancelled the watch, the cluster id changed, or the store's
//!    revision went backwards (a restore from backup).
//!
//! While etcd is unreachable nothing is emitted: consumers keep serving the last state.
//! "Could not read" is never reported as "empty". [`WatchStats::since_sync`] tells how
//! stale that state may be.

mod backoff;
mod decode;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

pub use backoff::Backoff;
pub use decode::{DecodeError, Entry, Value, decode};
pub use stats::WatchStats;

use crate::keys::{Key, Keyspace};
use crate::store::{EventKind, Listing, RawEvent, Revision, Store, WatchMessage, WatchSession};

/// A consistent view of every watched key at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub revision: Revision,
    pub entries: Vec<Entry>,
}

/// One typed change.
// `Put` is the common case and is moved once, into the consumer's table; boxing it to shrink
// the rare `Reset` would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Diff {
    /// Forget everything: this is the whole state now.
    Reset(Snapshot),
    /// A key was created or changed.
    Put(Entry),
    /// A key was deleted, or now holds a value that cannot be decoded.
    Delete(Key),
}

/// The diffs of one etcd watch response: never splits a revision (so never splits a
/// transaction). An update holding a `Reset` holds nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The highest revision this update brings the consumer to.
    pub revision: Revision,
    pub diffs: Vec<Diff>,
}

/// Tuning of a [`Watcher`]. The defaults suit every wharf part.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Prefixes to list and watch, e.g. `keyspace.services()`.
    pub prefixes: Vec<String>,
    /// How often to ask etcd to confirm the stream is current. Also bounds how long a dead
    /// stream goes unnoticed (three missed answers reopen it).
    pub progress_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Updates buffered for a slow consumer before the watcher waits for it.
    pub channel_capacity: usize,
}

impl WatchConfig {
    pub fn new(prefixes: Vec<String>) -> Self {
        Self {
            prefixes,
            progress_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            channel_capacity: 1024,
        }
    }
}

/// A running watcher: a background task feeding an update channel. The task ends soon
/// after the receiving side is dropped.
pub struct Watcher {
    updates: mpsc::Receiver<Update>,
    stats: Arc<WatchStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts watching. Must be called inside a tokio runtime. The first update is the
    /// `Reset` of the initial list, which is retried for as long as etcd is unreachable.
    pub fn spawn<S: Store>(store: S, keyspace: Keyspace, config: WatchConfig) -> Self {
        let (tx, updates) = mpsc::channel(config.channel_capacity.max(1));
        let stats = Arc::new(WatchStats::default());
        let state = WatchLoop {
            cursors: vec![0; config.prefixes.len()],
            backoff: Backoff::new(config.backoff_min, config.backoff_max),
            store,
            keyspace,
            config,
            tx,
            stats: stats.clone(),
            cluster_id: None,
        };
        let task = tokio::spawn(state.run());
        Self {
            updates,
            stats,
            task,
        }
    }

    /// The next update; `None` only after the watcher task has stopped.
    pub async fn next(&mut self) -> Option<Update> {
        self.updates.recv().await
    }

    /// Shared counters and staleness.
    pub fn stats(&self) -> Arc<WatchStats> {
        self.stats.clone()
    }

    /// Splits into the update channel and stats; the task stops when the receiver drops.
    pub fn into_parts(self) -> (mpsc::Receiver<Update>, Arc<WatchStats>) {
        (self.updates, self.stats)
    }

    /// Stops watching and waits until the background task has ended.
    pub async fn shutdown(self) {
        let Self { updates, task, .. } = self;
        drop(updates);
        let _ = task.await;
    }
}

/// Why the watch loop left a stream.
enum Exit {
    /// Reopen from the cursors after a backoff.
    Reconnect,
    /// Throw the state away and list again.
    Relist(&'static str),
    /// The consumer is gone.
    Stop,
}

struct WatchLoop<S> {
    store: S,
    keyspace: Keyspace,
    config: WatchConfig,
    tx: mpsc::Sender<Update>,
    stats: Arc<WatchStats>,
    backoff: Backoff,
    /// Per prefix: the last revision known to be delivered. Resume from cursor + 1.
    cursors: Vec<Revision>,
    /// The cluster the current state came from.
    cluster_id: Option<u64>,
}

impl<S: Store> WatchLoop<S> {
    async fn run(mut self) {
        let mut need_list = true;
        // Every path that waits checks for a departed consumer, so that a watcher whose
        // receiver is dropped while etcd is down stops instead of retrying forever.
        while !self.tx.is_closed() {
            if need_list {
                match self.relist().await {
                    Ok(true) => need_list = false,
                    Ok(false) => return,
                    Err(()) => {
                        if !self.pause().await {
                            return;
                        }
                        continue;
                    }
                }
            } else if let Some(exit) = self.check_head().await {
                match exit {
                    Exit::Relist(reason) => {
                        info!(reason, "relisting the catalog");
                        need_list = true;
                    }
                    _ => {
                        self.stats.add_reconnect();
                        if !self.pause().await {
                            return;
                        }
                    }
                }
                continue;
            }
            match self.follow().await {
                Exit::Stop => return,
                Exit::Relist(reason) => {
                    info!(reason, "relisting the catalog");
                    need_list = true;
                }
                Exit::Reconnect => {
                    self.stats.add_reconnect();
                    if !self.pause().await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits out the backoff; `false` when the consumer went away meanwhile.
    async fn pause(&mut self) -> bool {
        let delay = self.backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.tx.closed() => false,
        }
    }

    /// Before resuming a watch: is the store still the one our state came from? A linearizable
    /// read (unlike the header of a watch response, which on etcd 3.4 can lag behind events
    /// already delivered, or behind the log while a restarted member replays it) is the
    /// reliable witness of a restore from backup or of another cluster behind the endpoint.
    async fn check_head(&mut self) -> Option<Exit> {
        match self.store.head().await {
            Ok(head) if !self.same_cluster(head.cluster_id) => {
                Some(Exit::Relist("etcd cluster id changed"))
            }
            Ok(head) if head.revision < self.max_cursor() => {
                warn!(revision = head.revision, cursors = ?self.cursors, "etcd is behind our state");
                Some(Exit::Relist("etcd revision went backwards"))
            }
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "etcd unreachable; will retry");
                Some(Exit::Reconnect)
            }
        }
    }

    /// Lists and emits a `Reset`. `Ok(false)` when the consumer is gone.
    async fn relist(&mut self) -> Result<bool, ()> {
        let listing = match self.store.list(&self.config.prefixes).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listing the catalog failed; will retry");
                return Err(());
            }
        };
        let Listing {
            revision,
            cluster_id,
            kvs,
        } = listing;
        let entries = kvs
            .iter()
            .filter_map(|kv| self.decode_or_count(kv))
            .collect();
        self.cursors.iter_mut().for_each(|c| *c = revision);
        self.cluster_id = Some(cluster_id);
        self.backoff.reset();
        self.stats.add_reset();
        self.stats.synced(revision);
        let update = Update {
            revision,
            diffs: vec![Diff::Reset(Snapshot { revision, entries })],
        };
        Ok(self.tx.send(update).await.is_ok())
    }

    fn decode_or_count(&self, kv: &crate::store::KeyValue) -> Option<Entry> {
        match decode(&self.keyspace, kv) {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(error = %e, "skipping malformed catalog entry");
                self.stats.add_malformed();
                None
            }
        }
    }

    /// Follows one watch stream until it has to be left.
    async fn follow(&mut self) -> Exit {
        let watches: Vec<(String, Revision)> = self
            .config
            .prefixes
            .iter()
            .zip(&self.cursors)
            .map(|(p, c)| (p.clone(), c + 1))
            .collect();
        let mut session = match self.store.watch(&watches).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "opening the etcd watch failed; will retry");
                return Exit::Reconnect;
            }
        };
        let mut tick = tokio::time::interval(self.config.progress_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let deadline = self.config.progress_interval * 3;
        loop {
            tokio::select! {
                msg = session.next() => match msg {
                    Ok(Some(msg)) => {
                        last_heard = Instant::now();
                        if let Some(exit) = self.handle(msg).await {
                            return exit;
                        }
                    }
                    Ok(None) => {
                        warn!("etcd closed the watch stream; resuming");
                        return Exit::Reconnect;
                    }
                    Err(e) => {
                        warn!(error = %e, "etcd watch stream failed; resuming");
                        return Exit::Reconnect;
                    }
                },
                _ = tick.tick() => {
                    if last_heard.elapsed() > deadline {
                        warn!(?deadline, "etcd watch stream went silent; resuming");
                        return Exit::Reconnect;
                    }
                    if let Err(e) = session.request_progress().await {
                        warn!(error = %e, "etcd progress request failed; resuming");
                        return Exit::Reconnect;
                    }
                }
                _ = self.tx.closed() => return Exit::Stop,
            }
        }
    }

    fn max_cursor(&self) -> Revision {
        self.cursors.iter().copied().max().unwrap_or(0)
    }

    fn same_cluster(&self, cluster_id: u64) -> bool {
        self.cluster_id.is_none_or(|c| c == cluster_id)
    }

    /// Applies one message; `Some(exit)` when the stream must be left.
    async fn handle(&mut self, msg: WatchMessage) -> Option<Exit> {
        match msg {
            WatchMessage::Created {
                cluster_id,
                revision,
                ..
            } => {
                if !self.same_cluster(cluster_id) {
                    return Some(Exit::Relist("etcd cluster id changed"));
                }
                debug!(revision, "watch created");
                self.backoff.reset();
                self.stats.synced(self.max_cursor());
                None
            }
            WatchMessage::Progress {
                watch_id,
                cluster_id,
                revision,
            } => {
                if !self.same_cluster(cluster_id) {
                    return Some(Exit::Relist("etcd cluster id changed"));
                }
                match watch_id.and_then(|i| usize::try_from(i).ok()) {
                    // Sent by etcd only to a watch that is caught up: safe to resume after.
                    Some(i) if i < self.cursors.len() => {
                        self.cursors[i] = self.cursors[i].max(revision);
                    }
                    // An answer to our progress request proves the stream is alive, nothing
                    // more: on etcd 3.4 its revision may be behind or ahead of the events
                    // delivered so far, so it never moves a cursor.
                    _ => debug!(revision, "stream progress"),
                }
                self.stats.synced(self.max_cursor());
                None
            }
            WatchMessage::Canceled {
                compact_revision,
                reason,
                ..
            } => {
                if compact_revision > 0 {
                    warn!(compact_revision, "watch start revision was compacted");
                    Some(Exit::Relist("history compacted"))
                } else {
                    warn!(reason, "etcd cancelled the watch");
                    Some(Exit::Relist("watch cancelled"))
                }
            }
            WatchMessage::Events {
                watch_id,
                cluster_id,
                events,
            } => {
                if !self.same_cluster(cluster_id) {
                    return Some(Exit::Relist("etcd cluster id changed"));
                }
                let Some(i) = usize::try_from(watch_id)
                    .ok()
                    .filter(|i| *i < self.cursors.len())
                else {
                    debug!(watch_id, "events for an unknown watch id");
                    return None;
                };
                let update = self.apply_events(i, events);
                self.stats.synced(self.max_cursor());
                match update {
                    Some(u) => self.tx.send(u).await.err().map(|_| Exit::Stop),
                    None => None,
                }
            }
        }
    }

    /// Decodes events past the prefix's cursor into one update.
    fn apply_events(&mut self, i: usize, events: Vec<RawEvent>) -> Option<Update> {
        // etcd never repeats an event on one stream, but a resumed stream must not either:
        // drop anything at or below what was already delivered. Several events may share a
        // revision (one transaction), and a response never splits a revision, so the floor
        // is fixed for the whole response.
        let floor = self.cursors[i];
        let mut diffs = Vec::with_capacity(events.len());
        for event in events {
            let rev = event.kv.mod_revision;
            if rev <= floor {
                continue;
            }
            self.cursors[i] = self.cursors[i].max(rev);
            diffs.extend(self.diff_for(event));
        }
        if diffs.is_empty() {
            return None;
        }
        self.stats.add_events(diffs.len());
        self.backoff.reset();
        Some(Update {
            revision: self.cursors[i],
            diffs,
        })
    }

    fn diff_for(&self, event: RawEvent) -> Option<Diff> {
        match event.kind {
            EventKind::Put => match decode(&self.keyspace, &event.kv) {
                Ok(entry) => Some(Diff::Put(entry)),
                Err(e) => {
                    warn!(error = %e, "skipping malformed catalog entry");
                    self.stats.add_malformed();
                    // A key that now holds garbage must not keep its last good value.
                    self.keyspace.parse(&event.kv.key).ok().map(Diff::Delete)
                }
            },
            EventKind::Delete => match self.keyspace.parse(&event.kv.key) {
                Ok(key) => Some(Diff::Delete(key)),
                Err(e) => {
                    debug!(error = %e, "ignoring delete of a foreign key");
                    None
                }
            },
        }
    }
}
