//! Registrations of processes wharf did not start (`registrar register`): kept on disk so
//! that they survive agent restarts, and put under the node lease like any container's.

use std::net::IpAddr;
use std::sync::Arc;

use catalog::{Instance, InstanceId, InstanceState, ServiceName, Store, Version};

use super::Shared;
use super::local_api::ok;
use crate::api::Response;

pub(super) async fn register_external<S: Store + Clone>(
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

pub(super) async fn deregister_external<S: Store + Clone>(
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
