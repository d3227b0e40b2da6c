//! `run`: validates a run request and turns it into containers (names, ports, bridge
//! addresses, runtime specs and records on disk), then starts their tasks.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use catalog::{InstanceId, ServiceName, Store, Version};

use super::bridge::fnv;
use super::local_api::ok;
use super::state::{Desired, Meta};
use super::{Handle, Shared, start_task};
use crate::api::{Network, Response, RunRequest};
use crate::runtime::{BridgeSpec, ContainerSpec, NetSpec};

pub(super) async fn handle_run<S: Store + Clone>(
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
