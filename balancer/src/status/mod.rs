//! The operator's view of a running balancer, served on the admin port:
//!
//! - `/` and `/status`: a self-contained live page (HTML/CSS/JS embedded from
//!   `balancer/assets/`, no external fetch; everything from etcd is inserted as text, never
//!   as markup);
//! - `/api/status`: the same data as JSON;
//! - `/api/status/stream`: server-sent events, one JSON document per update (every second
//!   and on every catalog change).
//!
//! Data sources, none of them on the request path except [`stats`]:
//! - [`stats::RequestStats`] in each `Endpoint`: relaxed atomic counters and a fixed-bucket
//!   latency histogram bumped per answer;
//! - [`catalog::CatalogSummary`]: every instance with its state and health mark, rebuilt by
//!   the discovery loop after each update (routable or not);
//! - [`events::EventLog`]: a bounded ring of recent events;
//! - [`sampler`]: a once-a-second task that turns counter deltas over a short window into
//!   req/s, error rate and p99, and publishes the JSON through a `watch` channel.

pub mod catalog;
pub mod events;
pub mod http;
pub mod sampler;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{Notify, watch};

use crate::builder::TableBuilder;
pub use stats::RequestStats;

/// Shared by the discovery loop (writer of catalog summaries and events), the sampler
/// (writer of the published JSON) and the admin server (reader).
pub struct StatusHub {
    pub events: events::EventLog,
    summary: ArcSwap<catalog::CatalogSummary>,
    loaded: AtomicBool,
    /// Wakes the sampler to republish at once (catalog change, reload).
    changed: Notify,
    published: watch::Sender<Bytes>,
    started: Instant,
    /// Discovery from etcd is configured.
    etcd: bool,
}

impl StatusHub {
    pub fn new(etcd: bool) -> Arc<Self> {
        Arc::new(Self {
            events: events::EventLog::default(),
            summary: ArcSwap::from_pointee(catalog::CatalogSummary::default()),
            loaded: AtomicBool::new(false),
            changed: Notify::new(),
            published: watch::channel(Bytes::new()).0,
            started: Instant::now(),
            etcd,
        })
    }

    /// After the builder applied a catalog update or a new configuration: refresh the
    /// summary, log what changed, republish.
    pub fn catalog_changed(&self, builder: &TableBuilder) {
        let old = self.summary.load();
        let new = catalog::summarize(builder, &old);
        if *old.as_ref() == new {
            return;
        }
        if self.loaded.swap(true, Ordering::Relaxed) {
            catalog::diff_events(&old, &new, &self.events);
        } else {
            self.events.push(
                "loaded",
                None,
                None,
                format!(
                    "catalog loaded: {} service(s), {} instance(s)",
                    new.services.len(),
                    new.instances
                ),
            );
        }
        self.summary.store(Arc::new(new));
        self.changed.notify_one();
    }

    /// After a SIGHUP: `failed` keeps the old configuration (details in the log).
    pub fn reloaded(&self, builder: &TableBuilder, failed: bool) {
        if failed {
            self.events.push(
                "reload_failed",
                None,
                None,
                "configuration reload failed; the running configuration stays (see the log)".into(),
            );
        } else {
            self.events
                .push("reload", None, None, "configuration reloaded".into());
        }
        self.catalog_changed(builder);
        self.changed.notify_one();
    }

    pub fn summary(&self) -> Arc<catalog::CatalogSummary> {
        self.summary.load_full()
    }

    /// The latest published JSON (empty before the sampler's first run).
    pub fn latest(&self) -> Bytes {
        self.published.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Bytes> {
        self.published.subscribe()
    }

    fn publish(&self, json: Bytes) {
        self.published.send_replace(json);
    }
}
