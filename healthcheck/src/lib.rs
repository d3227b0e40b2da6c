//! wharf's health checker: probes every instance (HTTP `GET` expecting 2XX, or a TCP
//! connect), applies rise/fall thresholds, and writes health marks to etcd, sharing the
//! instances among several replicas.
//!
//! # Layout
//!
//! - [`config`]: `healthcheck.toml` and [`Settings`].
//! - [`probe`]: one probe, prepared once per instance, allocation-free per run.
//! - [`rules`]: the rise/fall state machine (pure).
//! - [`shard`]: rendezvous hashing of instances over live checkers (pure).
//! - [`stall`]: loop-lag monitor; probe timeouts of a starved checker are discarded.
//! - [`task`]: the probe loop of one instance (one tokio task each).
//! - [`view`]: the watched catalog, keyed for the supervisor.
//! - [`supervisor`]: ownership, probe tasks, mark reconciliation.
//! - [`writer`]: guarded, coalesced, retried etcd writes.
//! - [`membership`]: the checker lease and `checkers/<id>`.
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin HTTP server.

pub mod admin;
pub mod config;
pub mod membership;
pub mod metrics;
pub mod probe;
pub mod rules;
pub mod shard;
pub mod stall;
pub mod status;
pub mod supervisor;
pub mod task;
pub mod view;
pub mod writer;

use std::future::Future;
use std::time::Duration;

use catalog::{Store, WatchConfig, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

pub use config::{FileConfig, Settings};

use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::stall::StallGuard;
use crate::supervisor::{Supervisor, SupervisorConfig};
use crate::writer::Writer;

/// Runs a checker until `shutdown` resolves.
///
/// Dropping the returned future instead behaves like a crash: probing stops at once and the
/// checker's lease (with its marks and presence key) runs out after its TTL.
///
/// On a clean shutdown the presence key is deleted so the other replicas take the work over
/// at once; the marks stay until the lease runs out, so the instances stay routable while the
/// new owners confirm them with a probe and rewrite them under their own leases.
pub async fn run<S: Store + Clone>(
    store: S,
    settings: Settings,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let metrics = Metrics::new();
    let keyspace = settings.keyspace.clone();
    let mut watch_config = WatchConfig::new(vec![keyspace.services(), keyspace.checkers()]);
    watch_config.progress_interval = settings.watch_progress_interval;
    let watcher = Watcher::spawn(store.clone(), keyspace.clone(), watch_config);
    let (updates, stats) = watcher.into_parts();

    let mut background = JoinSet::new();
    background.spawn(admin::serve(admin, metrics.clone(), stats));

    let (lease_tx, lease_rx) = watch::channel(None);
    let membership = Membership {
        store: store.clone(),
        keyspace: keyspace.clone(),
        id: settings.checker_id.clone(),
        ttl: settings.lease_ttl,
        metrics: metrics.clone(),
    };
    background.spawn(membership.run(lease_tx));

    let (write_tx, write_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let writer = Writer {
        store: store.clone(),
        keyspace: keyspace.clone(),
        metrics: metrics.clone(),
        concurrency: settings.write_concurrency,
    };
    background.spawn(writer.run(write_rx, done_tx, lease_rx.clone()));

    let stalls = StallGuard::new();
    background.spawn(stalls.clone().monitor(metrics.clone()));
    let config = SupervisorConfig {
        me: settings.checker_id.clone(),
        mark_refresh: settings.mark_refresh,
        min_deregister_after: settings.min_deregister_after,
        stalls,
    };
    let (supervisor, reports) = Supervisor::new(config, metrics, write_tx);
    info!(checker = %settings.checker_id, prefix = %keyspace, "health checker started");
    tokio::select! {
        _ = supervisor.run(updates, reports, done_rx, lease_rx) => {
            warn!("catalog watcher stopped; shutting down");
        }
        _ = shutdown => info!("shutting down"),
    }
    // Stop probing and keeping the lease alive, then leave the ring.
    background.abort_all();
    while background.join_next().await.is_some() {}
    let key = keyspace.checker(&settings.checker_id);
    match tokio::time::timeout(Duration::from_secs(3), store.delete(&key)).await {
        Ok(Ok(_)) => info!(key, "left the checker ring"),
        Ok(Err(e)) => {
            warn!(key, error = %e, "could not delete the presence key; it expires with the lease")
        }
        Err(_) => warn!(
            key,
            "etcd did not answer; the presence key expires with the lease"
        ),
    }
}
