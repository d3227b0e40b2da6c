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
    // Two bridges with overlapping subnets make the host route to a container ambiguous:
    // traffic goes out through whichever route wins, and when one bridge is removed its
    // routes go with it. Refuse instead of letting containers become unreachable (or
    // reachable through the wrong bridge).
    let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
    if let Some(other) = overlapping_route(&routes, &b.bridge, &b.gateway) {
        return Err(RuntimeError::Setup(format!(
            "bridge {} subnet {} overlaps the route {other}: give each bridge its own subnet",
            b.bridge, b.gateway
        )));
    }
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

/// A route in `routes` (the text of `/proc/net/route`) through another device than
/// `bridge` that overlaps `cidr` (`A.B.C.D/N`) and is at least as specific, as `NET/N dev
/// DEV`. Broader routes (a default route, a /8 of the LAN) are fine: the bridge's own route
/// is more specific and wins.
pub fn overlapping_route(routes: &str, bridge: &str, cidr: &str) -> Option<String> {
    let (ip, prefix) = cidr.split_once('/')?;
    let ours = u32::from(ip.parse::<std::net::Ipv4Addr>().ok()?);
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let mask_of = |p: u32| u32::MAX.checked_shl(32 - p).unwrap_or(0);
    routes.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dev, dest, mask) = (*f.first()?, *f.get(1)?, *f.get(7)?);
        // The kernel prints the network-order words as native integers.
        let word = |h: &str| {
            u32::from_str_radix(h, 16)
                .ok()
                .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
        };
        let (dest, mask) = (word(dest)?, word(mask)?);
        let their_prefix = mask.count_ones();
        let overlaps = their_prefix >= prefix && dest & mask_of(prefix) == ours & mask_of(prefix);
        (dev != bridge && overlaps).then(|| {
            format!(
                "{}/{their_prefix} dev {dev}",
                std::net::Ipv4Addr::from(dest)
            )
        })
    })
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

#[cfg(test)]
mod tests {
    use super::overlapping_route;

    const ROUTES: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
wtA\t0005D50A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn overlapping_routes_of_other_devices_are_found() {
        // Same /24 on another bridge.
        assert_eq!(
            overlapping_route(ROUTES, "wtB", "10.213.5.1/24").as_deref(),
            Some("10.213.5.0/24 dev wtA")
        );
        // Our own route is fine; so are broader ones (the default route, 10/8 on eth1).
        assert_eq!(overlapping_route(ROUTES, "wtA", "10.213.5.1/24"), None);
        assert_eq!(overlapping_route(ROUTES, "wtB", "10.213.6.1/24"), None);
        // A /16 bridge would swallow the /24 of another device.
        assert_eq!(
            overlapping_route(ROUTES, "wtB", "10.213.0.1/16").as_deref(),
            Some("10.213.5.0/24 dev wtA")
        );
        assert_eq!(
            overlapping_route(ROUTES, "wtB", "192.0.2.1/24").as_deref(),
            Some("192.0.2.0/24 dev eth0")
        );
        assert_eq!(overlapping_route(ROUTES, "wtB", "garbage"), None);
    }
}
