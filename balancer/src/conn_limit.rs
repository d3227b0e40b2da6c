//! `max_connections` on a listener (HAProxy's `maxconn` on a frontend): at the limit the
//! accept loop stops accepting, so new connections wait in the kernel's listen backlog
//! (not refused, not reset) until one of the open ones closes. Protects the balancer's
//! memory and descriptors, and the instances behind it, from a flood.
//!
//! Counting costs two relaxed atomics per connection, limit or not (a SIGHUP may set one
//! for a listener that had none, and must know how many are open).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

pub struct ConnLimit {
    /// 0: no limit.
    max: AtomicUsize,
    open: AtomicUsize,
    freed: Notify,
    /// `balancer_listener_full_total{listener}`: times accepting paused at the limit.
    full: prometheus::IntCounter,
}

/// An open connection, counted until dropped.
pub struct Counted(Arc<ConnLimit>);

impl ConnLimit {
    pub fn new(max: Option<usize>, full: prometheus::IntCounter) -> Arc<Self> {
        Arc::new(Self {
            max: AtomicUsize::new(max.unwrap_or(0)),
            open: AtomicUsize::new(0),
            freed: Notify::new(),
            full,
        })
    }

    /// A SIGHUP's new limit; a raised (or removed) one lets a waiting accept loop go on.
    pub fn set_max(&self, max: Option<usize>) {
        self.max.store(max.unwrap_or(0), Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// Below the limit (or none): the accept loop's fast check.
    pub fn has_room(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        max == 0 || self.open.load(Ordering::Relaxed) < max
    }

    /// Returns once a connection may be accepted (at once below the limit).
    pub async fn room(&self) {
        if self.has_room() {
            return;
        }
        self.full.inc();
        loop {
            // Registered before the check: a close between the two is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }

    /// Counts an accepted connection.
    pub fn enter(self: &Arc<Self>) -> Counted {
        self.open.fetch_add(1, Ordering::Relaxed);
        Counted(self.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        if self.0.max.load(Ordering::Relaxed) != 0 {
            self.0.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn accepting_waits_at_the_limit_until_a_connection_closes_or_it_is_raised() {
        let full = prometheus::IntCounter::new("f", "f").unwrap();
        let limit = ConnLimit::new(Some(2), full.clone());
        let (a, b) = (limit.enter(), limit.enter());
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.room().await }
        });
        // Still waiting after its first poll (the counter says it met the limit).
        tokio::time::timeout(Duration::from_secs(5), async {
            while full.get() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(!waiting.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        // Full again, then the limit goes: room at once.
        let _c = limit.enter();
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.room().await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while full.get() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        limit.set_max(None);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        drop(b);
    }
}
