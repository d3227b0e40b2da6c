//! The node agent: one per host. It holds the node lease, runs containers through the
//! runtime helper, registers each one in etcd once its port answers, drains before stopping,
//! and serves the local API the CLI uses. On start it adopts the containers a previous agent
//! left running, cleans up after those that died, and deletes this node's registrations
//! that nothing backs any more.
//!
//! This file holds the configuration, the state shared by the API handlers and the
//! container tasks, and `run`; each other job has its own module.

mod bridge;
mod containers;
mod external;
mod launch;
mod local_api;
mod metrics;
mod process;
mod reconcile;
mod registry;
mod state;
mod supervisor;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use catalog::{
    Instance, InstanceId, InstanceState, Keyspace, Node, NodeName, ServiceName, Store, Version,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use bridge::BridgeConfig;
pub use metrics::{Metrics, serve_admin};
pub use registry::Registry;
pub use state::{Desired, Meta, StateDir};

use crate::runtime::ContainerSpec;
use local_api::serve_conn;
use process::Proc;
use reconcile::reconcile;
use supervisor::{Ctl, supervise};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("etcd: {0}")]
    Store(#[from] catalog::StoreError),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the agent is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeName,
    /// Address instances on the host network are registered with.
    pub advertise: IpAddr,
    pub state_dir: PathBuf,
    pub keyspace: Keyspace,
    pub lease_ttl: Duration,
    pub cgroup_parent: String,
    /// The binary re-executed as `__helper` for each container run.
    pub helper_exe: PathBuf,
    pub bridge: BridgeConfig,
    pub restart_initial: Duration,
    pub restart_cap: Duration,
}

struct Handle {
    meta: Meta,
    state: String,
    helper_pid: Option<i32>,
    exit_code: Option<i32>,
    ctl: Option<mpsc::Sender<Ctl>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// State shared by the API handlers and the container tasks.
pub struct Shared<S> {
    cfg: AgentConfig,
    registry: Arc<Registry<S>>,
    metrics: Arc<Metrics>,
    state: StateDir,
    images: crate::image::Store,
    containers: Mutex<BTreeMap<String, Handle>>,
    external: tokio::sync::Mutex<Vec<Instance>>,
}

impl<S: Store + Clone> Shared<S> {
    fn set_status(&self, name: &str, state: &str, pid: Option<i32>, code: Option<i32>) {
        if let Some(h) = self.containers.lock().expect("lock").get_mut(name) {
            h.state = state.into();
            h.helper_pid = pid;
            if code.is_some() {
                h.exit_code = code;
            }
        }
    }

    /// Changes and persists a container's record; `None` if it was removed.
    fn update_meta(&self, name: &str, f: impl FnOnce(&mut Meta)) -> Option<Meta> {
        let mut map = self.containers.lock().expect("lock");
        let h = map.get_mut(name)?;
        f(&mut h.meta);
        if let Err(e) = self.state.save_meta(&h.meta) {
            warn!(container = %name, error = %e, "cannot persist container record");
        }
        Some(h.meta.clone())
    }

    fn instance_key(&self, meta: &Meta) -> String {
        match (
            ServiceName::new(&meta.service),
            InstanceId::new(&meta.instance),
        ) {
            (Ok(s), Ok(i)) => self.cfg.keyspace.instance(&s, &i),
            _ => String::new(),
        }
    }

    fn instance(&self, meta: &Meta) -> Instance {
        Instance {
            id: InstanceId::new(&meta.instance).expect("validated at run"),
            service: ServiceName::new(&meta.service).expect("validated at run"),
            version: Version::new(&meta.version).expect("validated at run"),
            node: self.cfg.node.clone(),
            addr: meta.addr,
            port: meta.port,
            protocol: meta.protocol,
            weight: catalog::defaults::WEIGHT,
            state: InstanceState::Serving,
            tags: vec![],
            attrs: [("container".to_string(), meta.name.clone())].into(),
            check: None,
        }
    }

    async fn put_instance(
        &self,
        key: &str,
        instance: &Instance,
    ) -> Result<(), catalog::StoreError> {
        let value = serde_json::to_vec(instance).expect("instance serializes");
        self.registry.put(key, value).await?;
        self.metrics.registrations.inc();
        Ok(())
    }

    fn count_exit(&self, code: i32) {
        let class = match code {
            0 => "success",
            c if c > 128 => "signal",
            _ => "failure",
        };
        self.metrics
            .container_exits
            .with_label_values(&[class])
            .inc();
    }

    async fn cleanup_blocking(&self, name: &str) {
        let spec_file = ContainerSpec::spec_file(&self.state.container(name));
        let Some(spec) = std::fs::read(&spec_file)
            .ok()
            .and_then(|d| serde_json::from_slice::<ContainerSpec>(&d).ok())
        else {
            return;
        };
        let r =
            tokio::task::spawn_blocking(move || crate::runtime::helper::cleanup_leftovers(&spec))
                .await;
        if let Ok(Err(e)) = r {
            warn!(container = %name, error = %e, "cleanup of a dead container failed");
        }
    }
}

/// Runs the agent until `shutdown` resolves. Containers keep running when the agent stops
/// (a restarted agent adopts them); keys then live until the lease TTL runs out.
pub async fn run<S: Store + Clone>(
    cfg: AgentConfig,
    store: S,
    api: UnixListener,
    admin: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let state = StateDir::new(&cfg.state_dir);
    std::fs::create_dir_all(state.containers()).map_err(|source| AgentError::State {
        path: state.containers(),
        source,
    })?;
    tokio::pin!(shutdown);
    // etcd may come up after us (boot order): keep trying, never exit.
    let mut delay = Duration::from_millis(250);
    let registry = loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = Registry::start(store.clone(), cfg.lease_ttl, metrics.clone()) => match r {
                Ok(r) => break r,
                Err(e) => {
                    metrics.etcd_errors.inc();
                    warn!(error = %e, ?delay, "cannot get a node lease; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            },
        }
    };
    let node = Node {
        addr: cfg.advertise,
        version: env!("CARGO_PKG_VERSION").into(),
        started: catalog::model::now_millis(),
    };
    registry
        .put(
            &cfg.keyspace.node(&cfg.node),
            serde_json::to_vec(&node).expect("node serializes"),
        )
        .await?;
    let sh = Arc::new(Shared {
        images: crate::image::Store::new(state.images()),
        cfg,
        registry: registry.clone(),
        metrics: metrics.clone(),
        state,
        containers: Mutex::new(BTreeMap::new()),
        external: tokio::sync::Mutex::new(Vec::new()),
    });
    reconcile(&sh).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let maintain = tokio::spawn(registry.clone().maintain(wait_stop(stop_rx.clone())));
    let admin_task = tokio::spawn(serve_admin(admin, metrics, wait_stop(stop_rx.clone())));
    info!(node = %sh.cfg.node, "agent ready");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = api.accept() => match r {
                Ok((stream, _)) => {
                    let sh = sh.clone();
                    tokio::spawn(async move { serve_conn(sh, stream).await });
                }
                Err(e) => warn!(error = %e, "api accept failed"),
            },
        }
    }
    info!("agent stopping; containers keep running");
    let _ = stop_tx.send(true);
    let _ = maintain.await;
    let _ = admin_task.await;
    for h in sh.containers.lock().expect("lock").values_mut() {
        if let Some(t) = h.task.take() {
            t.abort();
        }
    }
    let _ = std::fs::remove_file(sh.state.socket());
    Ok(())
}

fn start_task<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str, adopt: Option<Proc>) {
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(supervise(sh.clone(), name.to_string(), adopt, rx));
    if let Some(h) = sh.containers.lock().expect("lock").get_mut(name) {
        h.ctl = Some(tx);
        h.task = Some(task);
    }
}
