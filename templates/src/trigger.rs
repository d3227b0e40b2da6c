//! Change notifications: one etcd watch stream over every prefix the resources read, waking
//! the resources whose prefixes a changed key falls under.
//!
//! The trigger never feeds data to a template: every run lists its prefixes afresh at one
//! revision (see [`crate::runner`]), so a missed or repeated event can at worst cost a run,
//! never a wrong file. It still resumes from per-prefix cursors after a disconnect (no
//! event lost), and on compaction, cancellation or a revision that goes backwards it starts
//! over and wakes every resource.

use std::sync::Arc;
use std::time::Duration;

use catalog::Store;
use catalog::store::{Revision, WatchMessage, WatchSession};
use catalog::watch::Backoff;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

/// A resource's interest: wake `notify` for keys under any of `prefixes`.
#[derive(Clone)]
pub struct Subscriber {
    pub prefixes: Vec<String>,
    pub notify: Arc<Notify>,
}

/// How often the stream is asked to prove it is alive; three missed answers reopen it.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Watches until the task is aborted.
pub async fn run<S: Store>(store: Arc<S>, subscribers: Vec<Subscriber>) {
    let mut prefixes: Vec<String> = subscribers
        .iter()
        .flat_map(|s| s.prefixes.iter().cloned())
        .collect();
    prefixes.sort();
    prefixes.dedup();
    if prefixes.is_empty() {
        return; // no resources: nothing to watch
    }
    let wake_all = || subscribers.iter().for_each(|s| s.notify.notify_one());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    'relist: loop {
        // The listing only fixes the revision to watch from; resources read their own.
        let start = match store.list(&prefixes).await {
            Ok(l) => l.revision,
            Err(e) => {
                warn!(error = %e, "etcd list for the change watch failed; will retry");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let mut cursors: Vec<Revision> = vec![start; prefixes.len()];
        wake_all();
        loop {
            let watches: Vec<(String, Revision)> = prefixes
                .iter()
                .zip(&cursors)
                .map(|(p, c)| (p.clone(), c + 1))
                .collect();
            let mut session = match store.watch(&watches).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "opening the etcd watch failed; will retry");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut last_heard = Instant::now();
            let relist = loop {
                tokio::select! {
                    msg = session.next() => {
                        let msg = match msg {
                            Ok(Some(m)) => m,
                            Ok(None) => { warn!("etcd closed the watch stream; resuming"); break false; }
                            Err(e) => { warn!(error = %e, "etcd watch stream failed; resuming"); break false; }
                        };
                        last_heard = Instant::now();
                        match msg {
                            WatchMessage::Created { revision, .. } => {
                                if revision < cursors.iter().copied().max().unwrap_or(0) {
                                    break true;
                                }
                                backoff.reset();
                            }
                            WatchMessage::Progress { watch_id: Some(i), revision, .. } => {
                                if let Some(c) = usize::try_from(i).ok().and_then(|i| cursors.get_mut(i)) {
                                    *c = (*c).max(revision);
                                }
                            }
                            WatchMessage::Progress { .. } => {}
                            WatchMessage::Canceled { reason, .. } => {
                                info!(reason, "change watch cancelled; starting over");
                                break true;
                            }
                            WatchMessage::Events { watch_id, events, .. } => {
                                let Some(c) = usize::try_from(watch_id).ok().and_then(|i| cursors.get_mut(i)) else {
                                    continue;
                                };
                                for ev in events {
                                    if ev.kv.mod_revision <= *c {
                                        continue;
                                    }
                                    *c = ev.kv.mod_revision;
                                    let key = String::from_utf8_lossy(&ev.kv.key);
                                    debug!(%key, "catalog change");
                                    for s in &subscribers {
                                        if s.prefixes.iter().any(|p| key.starts_with(p.as_str())) {
                                            s.notify.notify_one();
                                        }
                                    }
                                }
                            }
                        }
                    }
                    _ = tick.tick() => {
                        if last_heard.elapsed() > PROGRESS_INTERVAL * 3 {
                            warn!("etcd watch stream went silent; resuming");
                            break false;
                        }
                        if let Err(e) = session.request_progress().await {
                            warn!(error = %e, "etcd progress request failed; resuming");
                            break false;
                        }
                    }
                }
            };
            if relist {
                continue 'relist;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            // A run may have failed while etcd was away: let every resource try again.
            wake_all();
        }
    }
}
