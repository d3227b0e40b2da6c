//! One task per container: start (or adopt) its helper, register the instance once its port
//! accepts connections, deregister the moment it exits, restart it per its policy with
//! capped backoff, and drain it on `stop`: draining in etcd → the service's drain timeout →
//! SIGTERM → grace period → SIGKILL → key deleted.

use std::sync::Arc;
use std::time::Duration;

use catalog::{Instance, InstanceState, ServiceConfig, Store};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use super::Shared;
use super::process::{Proc, read_exit};
use super::state::Desired;
use crate::restart::Backoff;

/// Orders for a container's task.
pub enum Ctl {
    Stop {
        grace: Duration,
        reply: oneshot::Sender<i32>,
    },
}

enum Outcome {
    Exited(i32),
    Stopped(i32, oneshot::Sender<i32>),
}

pub async fn supervise<S: Store + Clone>(
    sh: Arc<Shared<S>>,
    name: String,
    mut adopt: Option<Proc>,
    mut ctl: mpsc::Receiver<Ctl>,
) {
    let mut backoff = Backoff::new(
        sh.cfg.restart_initial,
        sh.cfg.restart_cap,
        Duration::from_secs(60),
    );
    let dir = sh.state.container(&name);
    let log = sh.state.log(&name);
    loop {
        let adopted = adopt.is_some();
        let mut proc = match adopt.take() {
            Some(p) => p,
            None => match Proc::spawn(&sh.cfg.helper_exe, &dir, &log) {
                Ok(p) => p,
                Err(e) => {
                    warn!(container = %name, error = %e, "cannot start helper");
                    sh.set_status(&name, "exited", None, Some(125));
                    return;
                }
            },
        };
        if !adopted {
            sh.metrics.container_starts.inc();
        }
        sh.metrics.containers_running.inc();
        let meta = sh.update_meta(&name, |m| {
            m.helper_pid = Some(proc.pid);
            m.helper_start = proc.start;
        });
        let Some(meta) = meta else { return };
        sh.set_status(&name, "running", Some(proc.pid), None);
        info!(container = %name, pid = proc.pid, adopted, "container running");
        let started = Instant::now();
        let key = sh.instance_key(&meta);
        let mut instance = sh.instance(&meta);
        let mut registered = false;
        // A bridge container is probed only once its helper has wired it (before that the
        // bridge, its route or the veth may not exist yet: a probe started with the helper
        // used to leave through the default route, and something out there answered), and
        // through the bridge only, so that a missing route can never look like a ready port.
        let bridge = matches!(meta.network, crate::api::Network::Bridge).then(|| BridgeProbe {
            device: sh.cfg.bridge.name.clone(),
            ready_file: crate::runtime::ContainerSpec::net_ready_file(&dir),
        });
        let port_ready = wait_port(meta.addr, meta.port, bridge);
        tokio::pin!(port_ready);
        let outcome = loop {
            tokio::select! {
                code = proc.wait() => break Outcome::Exited(code),
                _ = &mut port_ready, if !registered => {
                    registered = true;
                    instance.state = InstanceState::Serving;
                    match sh.put_instance(&key, &instance).await {
                        Ok(()) => info!(container = %name, %key, "registered"),
                        Err(e) => warn!(container = %name, error = %e, "register failed; will retry"),
                    }
                    sh.set_status(&name, "serving", Some(proc.pid), None);
                }
                msg = ctl.recv() => match msg {
                    Some(Ctl::Stop { grace, reply }) => {
                        let code = drain_and_stop(&sh, &name, &key, &mut instance, registered, &mut proc, grace).await;
                        break Outcome::Stopped(code, reply);
                    }
                    None => return,
                },
            }
        };
        sh.metrics.containers_running.dec();
        // Deregister at once: the process is gone, its address no longer answers.
        if registered || sh.registry.owns(&key).await {
            if let Err(e) = sh.registry.delete(&key).await {
                warn!(container = %name, error = %e, "deregister failed");
            } else {
                sh.metrics.deregistrations.inc();
            }
        }
        if proc_left_garbage(&dir) {
            sh.cleanup_blocking(&name).await;
        }
        match outcome {
            Outcome::Stopped(code, reply) => {
                sh.update_meta(&name, |m| {
                    m.desired = Desired::Stopped;
                    m.helper_pid = None;
                });
                sh.set_status(&name, "exited", None, Some(code));
                sh.count_exit(code);
                info!(container = %name, code, "container stopped");
                let _ = reply.send(code);
                return;
            }
            Outcome::Exited(code) => {
                sh.count_exit(code);
                let error = read_exit(&dir).and_then(|s| s.error);
                info!(container = %name, code, ?error, "container exited");
                let restarts = meta.restarts;
                if !meta.restart.should_restart(code, restarts) {
                    sh.update_meta(&name, |m| {
                        m.desired = Desired::Stopped;
                        m.helper_pid = None;
                    });
                    sh.set_status(&name, "exited", None, Some(code));
                    return;
                }
                let delay = backoff.after_run(started.elapsed());
                sh.update_meta(&name, |m| {
                    m.restarts += 1;
                    m.helper_pid = None;
                });
                sh.set_status(&name, "restarting", None, Some(code));
                info!(container = %name, ?delay, "restarting after backoff");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    msg = ctl.recv() => {
                        sh.update_meta(&name, |m| m.desired = Desired::Stopped);
                        sh.set_status(&name, "exited", None, Some(code));
                        if let Some(Ctl::Stop { reply, .. }) = msg {
                            let _ = reply.send(code);
                        }
                        return;
                    }
                }
            }
        }
    }
}

/// Whether the helper died without cleaning up (it writes `exit.json` last).
fn proc_left_garbage(dir: &std::path::Path) -> bool {
    read_exit(dir).is_none()
}

async fn drain_and_stop<S: Store + Clone>(
    sh: &Arc<Shared<S>>,
    name: &str,
    key: &str,
    instance: &mut Instance,
    registered: bool,
    proc: &mut Proc,
    grace: Duration,
) -> i32 {
    sh.set_status(name, "draining", Some(proc.pid), None);
    if registered {
        instance.state = InstanceState::Draining;
        if let Err(e) = sh.put_instance(key, instance).await {
            warn!(container = %name, error = %e, "could not mark draining");
        }
        let drain = drain_timeout(sh, instance).await;
        info!(container = %name, ?drain, "draining");
        tokio::select! {
            code = proc.wait() => return code,
            _ = tokio::time::sleep(drain) => {}
        }
    }
    sh.set_status(name, "stopping", Some(proc.pid), None);
    // The helper relays SIGTERM to the container's init, which relays it to the app.
    proc.signal(Signal::SIGTERM);
    match tokio::time::timeout(grace, proc.wait()).await {
        Ok(code) => code,
        Err(_) => {
            warn!(container = %name, ?grace, "still running after the grace period; SIGKILL");
            proc.kill_container();
            proc.wait().await
        }
    }
}

/// The service's drain timeout from its `ServiceConfig` (the default when absent or bad).
async fn drain_timeout<S: Store + Clone>(sh: &Arc<Shared<S>>, instance: &Instance) -> Duration {
    let key = sh.cfg.keyspace.config(&instance.service);
    match sh.registry.store().get(&key).await {
        Ok(Some(kv)) => match serde_json::from_slice::<ServiceConfig>(&kv.value) {
            Ok(c) => c.drain_timeout,
            Err(e) => {
                warn!(%key, error = %e, "malformed service config; default drain timeout");
                catalog::defaults::DRAIN_TIMEOUT
            }
        },
        Ok(None) => catalog::defaults::DRAIN_TIMEOUT,
        Err(e) => {
            warn!(%key, error = %e, "cannot read service config; default drain timeout");
            catalog::defaults::DRAIN_TIMEOUT
        }
    }
}

/// How a bridge container's port is probed.
struct BridgeProbe {
    /// The bridge the probe is bound to.
    device: String,
    /// Written by the helper once the container's network is wired.
    ready_file: std::path::PathBuf,
}

/// Resolves once `addr:port` accepts a TCP connection; for a bridge container, only once
/// its network is wired and through its bridge.
async fn wait_port(addr: std::net::IpAddr, port: u16, bridge: Option<BridgeProbe>) {
    let target = std::net::SocketAddr::new(addr, port);
    let connect = || async {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(b) = &bridge {
            if !b.ready_file.exists() {
                return Err(std::io::Error::other("network not wired yet"));
            }
            socket.bind_device(Some(b.device.as_bytes()))?;
        }
        socket.connect(target).await
    };
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), connect()).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
