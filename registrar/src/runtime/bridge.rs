//! Bridge networking, done from the host side by the helper with iproute2 (`ip`, and
//! `nsenter` for the container end): a bridge holding the gateway address, and one veth
//! pair per container whose peer becomes `eth0` in the container's network namespace.
//! The veth goes away with the namespace; the bridge is removed when its last port goes.

use std::fs;
use std::process::{Command, Stdio};

use super::error::{Context, Result, RuntimeError};
use super::spec::BridgeSpec;

/// Serialises bridge changes of all helpers on this host (one creating the bridge while
/// another removes it as unused would otherwise race). Released on drop.
fn bridge_lock() -> Result<nix::fcntl::Flock<fs::File>> {
    let path = "/run/wharf-bridge.lock";
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("open {path}"))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .ctx(|| format!("lock {path}"))
}

/// Wires the container whose init is `pid` to the bridge.
pub fn attach(b: &BridgeSpec, pid: i32) -> Result<()> {
    let _lock = bridge_lock()?;
    // Another container may be creating or removing the bridge at the same moment; one
    // retry covers that race.
    match attach_once(b, pid) {
        Ok(()) => Ok(()),
        Err(_) => {
            let _ = ip(&["link", "del", &b.host_veth]);
            attach_once(b, pid)
        }
    }
}

fn attach_once(b: &BridgeSpec, pid: i32) -> Result<()> {
    ensure_bridge(b)?;
    let netns = format!("--net=/proc/{pid}/ns/net");
    let pid_s = pid.to_string();
    ip(&[
        "link",
        "add",
        &b.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pid_s,
    ])?;
    ip(&["link", "set", &b.host_veth, "master", &b.bridge, "up"])?;
    let gw_ip = b.gateway.split('/').next().unwrap_or_default();
    for args in [
        vec!["addr", "add", b.address.as_str(), "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
        vec!["route", "add", "default", "via", gw_ip],
    ] {
        let mut cmd = vec![netns.as_str(), "ip"];
        cmd.extend(args);
        run("nsenter", &cmd)?;
    }
    Ok(())
}

fn ensure_bridge(b: &BridgeSpec) -> Result<()> {
    if !link_exists(&b.bridge) {
        // "File exists" when another helper won the race; fine if the link is there now.
        if let Err(e) = ip(&["link", "add", &b.bridge, "type", "bridge"])
            && !link_exists(&b.bridge)
        {
            return Err(e);
        }
    }
    ip(&["addr", "replace", &b.gateway, "dev", &b.bridge])?;
    ip(&["link", "set", &b.bridge, "up"])
}

/// Removes the host veth (if the namespace's death has not already) and the bridge once no
/// container uses it.
pub fn detach(b: &BridgeSpec) {
    let _lock = bridge_lock();
    if link_exists(&b.host_veth) {
        let _ = ip(&["link", "del", &b.host_veth]);
    }
    remove_bridge_if_unused(&b.bridge);
}

pub fn remove_bridge_if_unused(bridge: &str) {
    let ports = fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX);
    if ports == 0 {
        let _ = ip(&["link", "del", bridge]);
    }
}

pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("run {prog}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Setup(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
