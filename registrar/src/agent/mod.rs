//! The node agent: one per host. It holds the node lease, runs containers through the
//! runtime helper, registers each one in etcd once its port answers, drains before stopping,
//! and serves the local API the CLI uses. On start it adopts the containers a previous agent
//! left running, cleans up after those that died, and deletes this node's registrations
//! that nothing backs any more.

mod metrics;
mod process;
mod registry;
mod state;
mod supervisor;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use catalog::{
    Instance, InstanceId, InstanceState, Key, Keyspace, Node, NodeName, ServiceName, Store, Version,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use metrics::{Metrics, serve_admin};
pub use registry::Registry;
pub use state::{Desired, Meta, StateDir};

use crate::api::{ContainerInfo, Network, Request, Response, RunRequest};
use crate::runtime::{BridgeSpec, ContainerSpec, NetSpec};
use process::Proc;
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

/// A bridge network: its name and IPv4 subnet (the first address is the gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for BridgeConfig {
    type Err = String;
    /// `NAME=A.B.C.D/N`, e.g. `wharf0=10.88.0.0/24`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, net) = s
            .split_once('=')
            .ok_or_else(|| format!("bridge {s:?}: expected NAME=A.B.C.D/N"))?;
        let (ip, prefix) = net
            .split_once('/')
            .ok_or_else(|| format!("bridge {s:?}: missing /N"))?;
        let subnet: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("bridge {s:?}: bad address {ip:?}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("bridge {s:?}: prefix must be 8..30"))?;
        if name.is_empty()
            || name.len() > 15
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("bridge {s:?}: bad interface name {name:?}"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            name: name.into(),
            subnet: Ipv4Addr::from(u32::from(subnet) & mask),
            prefix,
        })
    }
}

impl BridgeConfig {
    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 1)
    }
    fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        (n >= 2 && n < size - 1).then(|| Ipv4Addr::from(u32::from(self.subnet) + n))
    }
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

/// Brings etcd and the node in line with what actually runs here.
async fn reconcile<S: Store + Clone>(sh: &Arc<Shared<S>>) -> Result<(), AgentError> {
    let (metas, errors) = sh.state.load_all();
    for e in errors {
        warn!(error = %e, "skipping unreadable container record");
    }
    let mut keep: BTreeSet<String> = BTreeSet::new();
    for meta in metas {
        let dir = sh.state.container(&meta.name);
        let adopted = meta
            .helper_pid
            .and_then(|pid| Proc::adopt(pid, meta.helper_start, &dir));
        let name = meta.name.clone();
        if adopted.is_some() {
            info!(container = %name, "adopting running container");
            keep.insert(sh.instance_key(&meta));
        } else if meta.helper_pid.is_some() {
            info!(container = %name, "container died while the agent was away; cleaning up");
            sh.cleanup_blocking_unregistered(&meta).await;
        }
        let exit = process::read_exit(&dir).map(|s| s.code);
        let restart = adopted.is_none()
            && meta.desired == Desired::Running
            && meta
                .restart
                .should_restart(exit.unwrap_or(137), meta.restarts);
        let run = adopted.is_some() || restart;
        let mut handle = Handle {
            meta,
            state: if run {
                "starting".into()
            } else {
                "exited".into()
            },
            helper_pid: None,
            exit_code: exit,
            ctl: None,
            task: None,
        };
        if !run {
            handle.meta.desired = Desired::Stopped;
            handle.meta.helper_pid = None;
            let _ = sh.state.save_meta(&handle.meta);
        }
        sh.containers
            .lock()
            .expect("lock")
            .insert(name.clone(), handle);
        if run {
            start_task(sh, &name, adopted);
        }
    }
    // Registrations of processes wharf did not start survive agent restarts.
    let external = sh.state.load_external();
    for inst in &external {
        let key = sh.cfg.keyspace.instance(&inst.service, &inst.id);
        keep.insert(key.clone());
        if let Err(e) = sh.put_instance(&key, inst).await {
            warn!(%key, error = %e, "re-register failed; will retry");
        }
    }
    *sh.external.lock().await = external;
    // Anything else registered for this node is stale: nothing here backs it.
    let listing = sh
        .registry
        .store()
        .list(&[sh.cfg.keyspace.services()])
        .await?;
    for kv in listing.kvs {
        let Ok(Key::Instance(..)) = sh.cfg.keyspace.parse(&kv.key) else {
            continue;
        };
        let Ok(inst) = serde_json::from_slice::<Instance>(&kv.value) else {
            continue;
        };
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        if inst.node == sh.cfg.node && !keep.contains(&key) {
            info!(%key, "removing stale registration of this node");
            sh.registry.delete(&key).await?;
        }
    }
    Ok(())
}

impl<S: Store + Clone> Shared<S> {
    async fn cleanup_blocking_unregistered(&self, meta: &Meta) {
        self.cleanup_blocking(&meta.name).await;
    }
}

fn start_task<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str, adopt: Option<Proc>) {
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(supervise(sh.clone(), name.to_string(), adopt, rx));
    if let Some(h) = sh.containers.lock().expect("lock").get_mut(name) {
        h.ctl = Some(tx);
        h.task = Some(task);
    }
}

async fn serve_conn<S: Store + Clone>(sh: Arc<Shared<S>>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(1 << 20);
    let resp = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&sh, req).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        },
        Err(e) => Response::Error {
            message: format!("read: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&resp).expect("response serializes");
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

use tokio::io::AsyncReadExt as _;

async fn handle<S: Store + Clone>(sh: &Arc<Shared<S>>, req: Request) -> Response {
    let op = match &req {
        Request::Run(_) => "run",
        Request::Ps => "ps",
        Request::Logs { .. } => "logs",
        Request::Stop { .. } => "stop",
        Request::Rm { .. } => "rm",
        Request::Start { .. } => "start",
        Request::Inspect { .. } => "inspect",
        Request::Register { .. } => "register",
        Request::Deregister { .. } => "deregister",
    };
    sh.metrics.api_requests.with_label_values(&[op]).inc();
    let r = match req {
        Request::Run(run) => handle_run(sh, run).await,
        Request::Ps => Ok(Response::Containers { containers: ps(sh) }),
        Request::Logs { name } => logs(sh, &name),
        Request::Stop {
            name,
            version,
            grace,
        } => stop(sh, &name, version.as_deref(), grace).await,
        Request::Rm { name } => rm(sh, &name),
        Request::Start { name } => start_again(sh, &name),
        Request::Inspect { name } => inspect(sh, &name),
        Request::Register {
            service,
            version,
            addr,
            port,
            protocol,
        } => register_external(sh, &service, &version, addr, port, protocol).await,
        Request::Deregister { service, port } => deregister_external(sh, &service, port).await,
    };
    r.unwrap_or_else(|message| Response::Error { message })
}

fn ok(message: impl Into<String>) -> Response {
    Response::Ok {
        message: message.into(),
    }
}

async fn handle_run<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    run: RunRequest,
) -> Result<Response, String> {
    let service = ServiceName::new(&run.service).map_err(|e| e.to_string())?;
    let version = Version::new(&run.version).map_err(|e| e.to_string())?;
    if run.command.is_empty() {
        return Err("no command given".into());
    }
    if run.replicas == 0 {
        return Err("--replicas must be at least 1".into());
    }
    let images = sh.images.clone();
    let image_path = PathBuf::from(&run.image);
    let image = tokio::task::spawn_blocking(move || images.resolve(&image_path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    let mut planned = Vec::new();
    {
        let map = sh.containers.lock().expect("lock");
        let mut used_ips: BTreeSet<IpAddr> = map.values().map(|h| h.meta.addr).collect();
        for i in 0..run.replicas {
            let index = run
                .first
                .checked_add(i)
                .ok_or("replica index out of range")?;
            let name = format!("{service}-{version}-{index}");
            if map.contains_key(&name) {
                return Err(format!(
                    "container {name} already exists (stop and rm it first)"
                ));
            }
            let port = match run.network {
                Network::Host => run.port.checked_add(i).ok_or("port out of range")?,
                Network::Bridge => run.port,
            };
            let instance =
                InstanceId::for_container(&sh.cfg.node, &name, port).map_err(|e| e.to_string())?;
            let (addr, net) = match run.network {
                Network::Host => (sh.cfg.advertise, NetSpec::Host),
                Network::Bridge => {
                    let b = &sh.cfg.bridge;
                    let ip = (2..)
                        .map_while(|n| b.host(n))
                        .find(|ip| !used_ips.contains(&IpAddr::V4(*ip)))
                        .ok_or("bridge subnet is full")?;
                    used_ips.insert(IpAddr::V4(ip));
                    let net = NetSpec::Bridge(BridgeSpec {
                        bridge: b.name.clone(),
                        gateway: format!("{}/{}", b.gateway(), b.prefix),
                        address: format!("{ip}/{}", b.prefix),
                        host_veth: format!("wh{:08x}", fnv(&format!("{}{name}", sh.cfg.node))),
                    });
                    (IpAddr::V4(ip), net)
                }
            };
            let mut env = run.env.clone();
            env.retain(|(k, _)| k != "PORT");
            env.push(("PORT".into(), port.to_string()));
            let spec = ContainerSpec {
                id: format!("{}-{name}", sh.cfg.node),
                layers: image.layers.clone(),
                dir: sh.state.container(&name),
                args: run.command.clone(),
                env,
                hostname: name.clone(),
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                limits: run.limits.clone(),
                cgroup_parent: sh.cfg.cgroup_parent.clone(),
                net,
            };
            let meta = Meta {
                name: name.clone(),
                service: service.to_string(),
                version: version.to_string(),
                instance: instance.to_string(),
                addr,
                port,
                protocol: run.protocol,
                image: run.image.clone(),
                network: run.network,
                restart: run.restart,
                desired: Desired::Running,
                restarts: 0,
                helper_pid: None,
                helper_start: None,
            };
            planned.push((spec, meta));
        }
    }
    for (spec, meta) in planned {
        let dir = &spec.dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        std::fs::write(
            ContainerSpec::spec_file(dir),
            serde_json::to_vec_pretty(&spec).expect("spec serializes"),
        )
        .map_err(|e| format!("write spec: {e}"))?;
        sh.state
            .save_meta(&meta)
            .map_err(|e| format!("write record: {e}"))?;
        let name = meta.name.clone();
        sh.containers.lock().expect("lock").insert(
            name.clone(),
            Handle {
                meta,
                state: "starting".into(),
                helper_pid: None,
                exit_code: None,
                ctl: None,
                task: None,
            },
        );
        start_task(sh, &name, None);
        names.push(name);
    }
    Ok(ok(names.join("\n")))
}

/// A short stable hash for interface names.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

fn ps<S: Store + Clone>(sh: &Arc<Shared<S>>) -> Vec<ContainerInfo> {
    sh.containers
        .lock()
        .expect("lock")
        .values()
        .map(|h| ContainerInfo {
            name: h.meta.name.clone(),
            service: h.meta.service.clone(),
            version: h.meta.version.clone(),
            instance: h.meta.instance.clone(),
            addr: h.meta.addr.to_string(),
            port: h.meta.port,
            state: h.state.clone(),
            helper_pid: h.helper_pid,
            exit_code: h.exit_code,
            restarts: h.meta.restarts,
        })
        .collect()
}

fn logs<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str) -> Result<Response, String> {
    if !sh.containers.lock().expect("lock").contains_key(name) {
        return Err(format!("no container {name:?}"));
    }
    const MAX: u64 = 1 << 20;
    let path = sh.state.log(name);
    let data = match std::fs::File::open(&path) {
        Ok(mut f) => {
            use std::io::{Read, Seek, SeekFrom};
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            buf
        }
        Err(_) => Vec::new(),
    };
    Ok(Response::Logs {
        text: String::from_utf8_lossy(&data).into_owned(),
    })
}

async fn stop<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    name: &str,
    version: Option<&str>,
    grace: Duration,
) -> Result<Response, String> {
    let targets: Vec<(String, Option<mpsc::Sender<Ctl>>)> = sh
        .containers
        .lock()
        .expect("lock")
        .values()
        .filter(|h| {
            h.meta.name == name
                || (h.meta.service == name && version.is_none_or(|v| v == h.meta.version))
        })
        .map(|h| (h.meta.name.clone(), h.ctl.clone()))
        .collect();
    if targets.is_empty() {
        return Err(format!("no container or service {name:?}"));
    }
    // All matching containers drain together, as a rollout step would.
    let mut waits = Vec::new();
    for (n, ctl) in targets {
        let (reply, rx) = oneshot::channel();
        match ctl {
            Some(ctl) if ctl.send(Ctl::Stop { grace, reply }).await.is_ok() => waits.push((n, rx)),
            _ => {}
        }
    }
    let mut lines = Vec::new();
    for (n, rx) in waits {
        match rx.await {
            Ok(code) => lines.push(format!("{n} stopped (exit {code})")),
            Err(_) => lines.push(format!("{n} already stopped")),
        }
    }
    Ok(ok(lines.join("\n")))
}

fn rm<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str) -> Result<Response, String> {
    let mut map = sh.containers.lock().expect("lock");
    let h = map
        .get(name)
        .ok_or_else(|| format!("no container {name:?}"))?;
    if h.state != "exited" {
        return Err(format!("container {name} is {}; stop it first", h.state));
    }
    map.remove(name);
    drop(map);
    crate::runtime::helper::remove_tree(&sh.state.container(name)).map_err(|e| e.to_string())?;
    Ok(ok(format!("{name} removed")))
}

/// Starts an exited container again: same spec, same name, same instance id.
fn start_again<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str) -> Result<Response, String> {
    {
        let mut map = sh.containers.lock().expect("lock");
        let h = map
            .get_mut(name)
            .ok_or_else(|| format!("no container {name:?}"))?;
        if h.state != "exited" {
            return Err(format!("container {name} is {}", h.state));
        }
        h.meta.desired = Desired::Running;
        h.meta.restarts = 0;
        h.meta.helper_pid = None;
        h.state = "starting".into();
        h.exit_code = None;
        sh.state
            .save_meta(&h.meta)
            .map_err(|e| format!("write record: {e}"))?;
    }
    start_task(sh, name, None);
    Ok(ok(format!("{name} started")))
}

/// A container's run parameters, read back from its record and runtime spec.
fn inspect<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str) -> Result<Response, String> {
    let meta = sh
        .containers
        .lock()
        .expect("lock")
        .get(name)
        .map(|h| h.meta.clone())
        .ok_or_else(|| format!("no container {name:?}"))?;
    let file = ContainerSpec::spec_file(&sh.state.container(name));
    let spec: ContainerSpec = std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut env = spec.env;
    env.retain(|(k, _)| k != "PORT");
    Ok(Response::Spec {
        run: Box::new(RunRequest {
            service: meta.service,
            version: meta.version,
            image: meta.image,
            port: meta.port,
            replicas: 1,
            first: 0,
            limits: spec.limits,
            env,
            network: meta.network,
            restart: meta.restart,
            protocol: meta.protocol,
            command: spec.args,
        }),
    })
}

async fn register_external<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    service: &str,
    version: &str,
    addr: IpAddr,
    port: u16,
    protocol: catalog::Protocol,
) -> Result<Response, String> {
    let service = ServiceName::new(service).map_err(|e| e.to_string())?;
    let version = Version::new(version).map_err(|e| e.to_string())?;
    let id = InstanceId::for_container(&sh.cfg.node, &format!("ext-{service}"), port)
        .map_err(|e| e.to_string())?;
    let inst = Instance {
        id: id.clone(),
        service: service.clone(),
        version,
        node: sh.cfg.node.clone(),
        addr,
        port,
        protocol,
        weight: catalog::defaults::WEIGHT,
        state: InstanceState::Serving,
        tags: vec![],
        attrs: Default::default(),
        check: None,
    };
    let key = sh.cfg.keyspace.instance(&service, &id);
    let mut ext = sh.external.lock().await;
    ext.retain(|i| i.id != id);
    ext.push(inst.clone());
    sh.state.save_external(&ext).map_err(|e| e.to_string())?;
    sh.put_instance(&key, &inst)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ok(format!("registered {id}")))
}

async fn deregister_external<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    service: &str,
    port: u16,
) -> Result<Response, String> {
    let service = ServiceName::new(service).map_err(|e| e.to_string())?;
    let id = InstanceId::for_container(&sh.cfg.node, &format!("ext-{service}"), port)
        .map_err(|e| e.to_string())?;
    let mut ext = sh.external.lock().await;
    let before = ext.len();
    ext.retain(|i| i.id != id);
    if ext.len() == before {
        return Err(format!("{id} is not registered here"));
    }
    sh.state.save_external(&ext).map_err(|e| e.to_string())?;
    sh.registry
        .delete(&sh.cfg.keyspace.instance(&service, &id))
        .await
        .map_err(|e| e.to_string())?;
    Ok(ok(format!("deregistered {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_parses_and_allocates() {
        let b: BridgeConfig = "wharf0=10.88.0.7/24".parse().unwrap();
        assert_eq!(b.subnet, Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(b.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(b.host(2), Some(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(b.host(255), None);
        for bad in [
            "10.0.0.0/24",
            "x=10.0.0.0",
            "x=10.0.0.0/31",
            "averyveryverylongname=10.0.0.0/24",
        ] {
            assert!(bad.parse::<BridgeConfig>().is_err(), "{bad}");
        }
    }
}
