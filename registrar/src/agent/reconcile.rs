//! Start-up reconciliation: adopt the containers a previous agent left running, clean up
//! after those that died, re-register external processes, and delete this node's
//! registrations that nothing backs any more.

use std::collections::BTreeSet;
use std::sync::Arc;

use catalog::{Instance, Key, Store};
use tracing::{info, warn};

use super::process::{self, Proc};
use super::state::{Desired, Meta};
use super::{AgentError, Handle, Shared, start_task};

/// Brings etcd and the node in line with what actually runs here.
pub(super) async fn reconcile<S: Store + Clone>(sh: &Arc<Shared<S>>) -> Result<(), AgentError> {
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
