//! The daemon: one task per template resource (debounce, list, apply), the change trigger,
//! SIGHUP re-reads of the resources, and `--onetime`.
//!
//! Every run lists exactly the prefixes its resource reads, in one linearizable etcd read
//! pinned to one revision, so a template always sees one consistent snapshot and never a
//! cache: there is nothing to render before the first successful list, and nothing stale to
//! render from while etcd is unreachable (the list fails, the old file stays, the run is
//! retried with backoff).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use catalog::watch::Backoff;
use catalog::{Keyspace, Store};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::apply::{self, ApplyOptions, Outcome, RunError};
use crate::config::{Resource, Settings, load_resources};
use crate::context::{self, CatalogData};
use crate::metrics::{Metrics, Stage};
use crate::trigger::{self, Subscriber};

/// Renders every resource once. Returns the errors (empty when all succeeded).
pub async fn run_once<S: Store>(
    store: &S,
    settings: &Settings,
    resources: &[Resource],
    metrics: &Metrics,
    opts: ApplyOptions,
) -> Vec<RunError> {
    let keyspace = settings.keyspace();
    let mut errors = Vec::new();
    for r in resources {
        let result = match list(store, r, &keyspace, metrics).await {
            Ok(data) => apply::apply(r, &data, opts, metrics).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => info!(resource = %r.name, ?outcome, "resource rendered"),
            Err(e) => errors.push(e),
        }
    }
    errors
}

async fn list<S: Store>(
    store: &S,
    resource: &Resource,
    keyspace: &Keyspace,
    metrics: &Metrics,
) -> Result<CatalogData, RunError> {
    let prefixes = context::prefixes_for(resource, keyspace);
    match store.list(&prefixes).await {
        Ok(listing) => {
            let data = CatalogData::from_listing(listing, keyspace);
            metrics.revision.set(data.revision);
            metrics.malformed.inc_by(data.malformed as u64);
            Ok(data)
        }
        Err(e) => {
            metrics.failed(&resource.name, Stage::List);
            Err(RunError {
                resource: resource.name.clone(),
                stage: Stage::List.as_str(),
                message: format!("reading the catalog from etcd: {e}"),
            })
        }
    }
}

/// The running daemon's moving parts for one set of resources.
struct Active {
    tasks: Vec<JoinHandle<()>>,
    trigger: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Active {
    fn start<S: Store>(
        store: &Arc<S>,
        settings: &Settings,
        resources: Vec<Resource>,
        metrics: &Arc<Metrics>,
        opts: ApplyOptions,
    ) -> Self {
        let keyspace = settings.keyspace();
        let (stop, stopped) = watch::channel(false);
        metrics.resources.set(resources.len() as i64);
        let mut subscribers = Vec::new();
        let mut tasks = Vec::new();
        for r in resources {
            let notify = Arc::new(Notify::new());
            subscribers.push(Subscriber {
                prefixes: context::prefixes_for(&r, &keyspace),
                notify: notify.clone(),
            });
            let task = ResourceTask {
                store: store.clone(),
                resource: r,
                keyspace: keyspace.clone(),
                notify,
                metrics: metrics.clone(),
                opts,
                resync: settings.resync_interval,
                stop: stopped.clone(),
            };
            tasks.push(tokio::spawn(task.run()));
        }
        let trigger = tokio::spawn(trigger::run(store.clone(), subscribers));
        Self {
            tasks,
            trigger,
            stop,
        }
    }

    /// Lets every resource finish the run it is in (a reload is never cut in half), then
    /// stops.
    async fn stop(self) {
        self.trigger.abort();
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Runs until `shutdown` completes. Every message on `hup` re-reads the template resources
/// (new files are picked up); an invalid set is reported and the running one kept.
pub async fn run<S: Store>(
    store: S,
    settings: Settings,
    resources: Vec<Resource>,
    metrics: Arc<Metrics>,
    opts: ApplyOptions,
    mut hup: mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) {
    let store = Arc::new(store);
    info!(resources = resources.len(), "render started");
    let mut active = Active::start(&store, &settings, resources, &metrics, opts);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = hup.recv() => match load_resources(&settings) {
                Ok(resources) => {
                    info!(resources = resources.len(), "template resources re-read");
                    active.stop().await;
                    active = Active::start(&store, &settings, resources, &metrics, opts);
                }
                Err(errors) => {
                    metrics.config_reload_failures.inc();
                    for e in errors {
                        error!(error = %e, "invalid template resource; keeping the running set");
                    }
                }
            },
        }
    }
    info!("shutting down");
    active.stop().await;
}

struct ResourceTask<S> {
    store: Arc<S>,
    resource: Resource,
    keyspace: Keyspace,
    notify: Arc<Notify>,
    metrics: Arc<Metrics>,
    opts: ApplyOptions,
    resync: Duration,
    stop: watch::Receiver<bool>,
}

impl<S: Store> ResourceTask<S> {
    async fn run(mut self) {
        loop {
            // Wait for a change (the trigger wakes every resource once at start) or the
            // periodic resync.
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(self.resync) => {}
                _ = self.stop.changed() => return,
            }
            if !self.debounce().await {
                return;
            }
            if !self.run_until_listed().await {
                return;
            }
        }
    }

    /// Waits until the catalog has been quiet for `wait.min`, at most `wait.max` after the
    /// first change. `false` when asked to stop.
    async fn debounce(&mut self) -> bool {
        let Some(wait) = self.resource.wait else {
            return true;
        };
        let give_up = Instant::now() + wait.max();
        loop {
            let quiet = (Instant::now() + wait.min).min(give_up);
            tokio::select! {
                _ = self.notify.notified() => {
                    if Instant::now() >= give_up {
                        return true;
                    }
                }
                _ = tokio::time::sleep_until(quiet) => return true,
                _ = self.stop.changed() => return false,
            }
        }
    }

    /// One run; a failed etcd read is retried with backoff (the old file stays meanwhile).
    /// Other failures wait for the next change. `false` when asked to stop.
    async fn run_until_listed(&mut self) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match list(&*self.store, &self.resource, &self.keyspace, &self.metrics).await {
                Ok(data) => {
                    // Changes that arrived before this listing are included in it.
                    match apply::apply(&self.resource, &data, self.opts, &self.metrics).await {
                        Ok(Outcome::Unchanged) => {}
                        Ok(outcome) => {
                            info!(resource = %self.resource.name, ?outcome, revision = data.revision, "resource run done")
                        }
                        Err(_) => {} // logged and counted by `apply`
                    }
                    return true;
                }
                Err(e) => {
                    warn!(error = %e, "keeping the current file until etcd answers");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = self.stop.changed() => return false,
                    }
                }
            }
        }
    }
}
