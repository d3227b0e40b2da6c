//! The API's operations on existing containers: list, logs, stop (drain), remove, start
//! again, and inspect (read back the run parameters).

use std::sync::Arc;
use std::time::Duration;

use catalog::Store;
use tokio::sync::{mpsc, oneshot};

use super::local_api::ok;
use super::state::Desired;
use super::supervisor::Ctl;
use super::{Shared, start_task};
use crate::api::{ContainerInfo, Response, RunRequest};
use crate::runtime::ContainerSpec;

pub(super) fn ps<S: Store + Clone>(sh: &Arc<Shared<S>>) -> Vec<ContainerInfo> {
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

pub(super) fn logs<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str) -> Result<Response, String> {
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

pub(super) async fn stop<S: Store + Clone>(
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

pub(super) fn rm<S: Store + Clone>(sh: &Arc<Shared<S>>, name: &str) -> Result<Response, String> {
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
pub(super) fn start_again<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    name: &str,
) -> Result<Response, String> {
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
pub(super) fn inspect<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    name: &str,
) -> Result<Response, String> {
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
