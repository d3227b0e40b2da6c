//! What the agent (or `registrar oneshot`) asks the runtime helper to run. Written as
//! `spec.json` into the container's state directory, so that a restarted agent can tell what
//! a surviving helper is running.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// PATH used to find the command when the spec's environment does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resource limits; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory in bytes (swap included where the kernel accounts it).
    pub memory: Option<u64>,
    /// CPUs, e.g. 0.5 = half a CPU of time per period.
    pub cpus: Option<f64>,
    /// Maximum number of processes (the container's init counts as one).
    pub pids: Option<u64>,
}

/// The container's network.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum NetSpec {
    /// The host's network namespace: the app binds `$PORT` on the host.
    #[default]
    Host,
    /// A new network namespace with only loopback.
    None,
    /// A new network namespace joined to a host bridge through a veth pair.
    Bridge(BridgeSpec),
}

/// Bridge attachment decided by the agent (which owns address allocation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeSpec {
    /// Host bridge name, e.g. `wharf0`.
    pub bridge: String,
    /// Bridge (gateway) address with prefix length, e.g. `10.88.0.1/24`.
    pub gateway: String,
    /// Container address with prefix length, e.g. `10.88.0.5/24`.
    pub address: String,
    /// Host side veth name (≤ 15 bytes).
    pub host_veth: String,
}

/// Everything the helper needs to run one container once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Container name, unique on this node (a DNS label).
    pub id: String,
    /// Read-only image layers, top-most first (overlayfs `lowerdir` order).
    pub layers: Vec<PathBuf>,
    /// The container's state directory: upper/work dirs, mount point, exit status.
    pub dir: PathBuf,
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub hostname: String,
    #[serde(default = "default_cwd")]
    pub cwd: String,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub limits: Limits,
    /// cgroup directory (relative to the runtime's own cgroup) holding containers' cgroups.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    #[serde(default)]
    pub net: NetSpec,
}

fn default_cwd() -> String {
    "/".into()
}

pub fn default_cgroup_parent() -> String {
    "wharf".into()
}

impl ContainerSpec {
    pub fn upper_dir(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work_dir(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Where the container's root filesystem is mounted inside its own mount namespace.
    pub fn rootfs_mountpoint(&self) -> PathBuf {
        self.dir.clone()
    }
    /// The mountpoint directory of earlier versions; only removed if a crash left it.
    pub fn legacy_root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn spec_file(dir: &Path) -> PathBuf {
        dir.join("spec.json")
    }
    pub fn exit_file(dir: &Path) -> PathBuf {
        dir.join("exit.json")
    }
    pub fn init_pid_file(dir: &Path) -> PathBuf {
        dir.join("init.pid")
    }
    /// Present while the container's bridge network is wired (veth on the bridge, address
    /// and route inside): nothing should try to reach the container's address before.
    pub fn net_ready_file(dir: &Path) -> PathBuf {
        dir.join("net.ready")
    }

    /// The environment passed to the app: the spec's, with a default PATH and HOSTNAME.
    pub fn full_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        if !env.iter().any(|(k, _)| k == "HOSTNAME") {
            env.push(("HOSTNAME".into(), self.hostname.clone()));
        }
        env
    }
}

/// How a container run ended, written as `exit.json` by the helper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The app's exit code, 128+N when killed by signal N; 125 when the runtime itself
    /// failed, 127 when the command could not be executed.
    pub code: i32,
    /// Why the container could not start, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the kernel's OOM killer fired in the container's memory cgroup.
    #[serde(default)]
    pub oom_killed: bool,
    /// Milliseconds since the Unix epoch.
    pub finished: u64,
}

/// Exit code when the runtime could not set the container up.
pub const EXIT_RUNTIME_ERROR: i32 = 125;
/// Exit code when the command could not be executed.
pub const EXIT_EXEC_FAILED: i32 = 127;

/// Parses a byte size like `64M`, `1g`, `512k` or `1048576`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let m: u64 = match unit.trim_end_matches('b').trim_end_matches('i') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                _ => return Err(format!("bad size unit in {s:?} (use k, M or G)")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("bad size {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_gets_defaults_but_keeps_overrides() {
        let spec = ContainerSpec {
            id: "c".into(),
            layers: vec![],
            dir: "/tmp/x".into(),
            args: vec!["true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            hostname: "h".into(),
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            limits: Limits::default(),
            cgroup_parent: default_cgroup_parent(),
            net: NetSpec::Host,
        };
        let env = spec.full_env();
        assert!(env.contains(&("PATH".into(), "/bin".into())));
        assert!(env.contains(&("HOSTNAME".into(), "h".into())));
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ContainerSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("64M").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for bad in ["", "0", "12x", "M", "-1"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
