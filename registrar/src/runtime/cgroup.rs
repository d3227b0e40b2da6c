//! cgroup limits, on cgroup v2 (unified) or v1 (per-controller hierarchies, including hybrid
//! hosts where a controller-less v2 tree sits at `/sys/fs/cgroup/unified`), detected at run
//! time with `statfs` (as youki does) rather than by guessing from `/proc/mounts`.
//!
//! Every container gets `<own cgroup>/<parent>/<container id>` in each hierarchy it uses,
//! nested under the runtime's own cgroup so that it stays inside whatever limits the host put
//! on the agent. Removal kills whatever is left, waits for the cgroup to empty, and retries
//! `rmdir` on EBUSY (the kernel frees a cgroup a moment after its last task).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::Pid;

use super::error::{Context, Result, RuntimeError};
use super::spec::Limits;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Period of the CPU bandwidth limit.
const CPU_PERIOD_US: u64 = 100_000;
/// The controllers a container uses (when the host has them).
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One v2 tree; `root` is its mount point.
    V2 { root: PathBuf },
    /// v1 hierarchies: (controller, mount point) for each controller we use that is mounted.
    V1 { mounts: Vec<(String, PathBuf)> },
}

impl Layout {
    /// Looks at `/sys/fs/cgroup`: cgroup2 there means unified; anything else (tmpfs with
    /// per-controller mounts, with or without `unified/`) means v1 controllers.
    pub fn detect() -> Result<Self> {
        let fs = statfs(CGROUP_ROOT).ctx(|| format!("statfs {CGROUP_ROOT}"))?;
        if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
            return Ok(Layout::V2 {
                root: CGROUP_ROOT.into(),
            });
        }
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").ctx(|| "read mountinfo".into())?;
        Ok(Layout::V1 {
            mounts: v1_mounts(&mountinfo),
        })
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Layout::V2 { .. })
    }
}

/// The mount points of the v1 controllers we use, from `/proc/self/mountinfo` lines like
/// `35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory`.
fn v1_mounts(mountinfo: &str) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        if r.next() != Some("cgroup") {
            continue;
        }
        let opts = r.nth(1).unwrap_or("");
        let Some(mount_point) = left.split_whitespace().nth(4) else {
            continue;
        };
        for ctrl in CONTROLLERS {
            if opts.split(',').any(|o| o == ctrl) && !out.iter().any(|(c, _)| c == ctrl) {
                out.push((ctrl.to_string(), PathBuf::from(mount_point)));
            }
        }
    }
    out
}

/// This process's cgroup path for a v1 controller (or the v2 path for `None`), from
/// `/proc/self/cgroup` lines `4:memory:/a/b` / `0::/a/b`.
fn own_path(proc_cgroup: &str, controller: Option<&str>) -> String {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        if hit {
            return path.trim_start_matches('/').to_string();
        }
    }
    String::new()
}

/// One container's cgroup, in one (v2) or several (v1) hierarchies.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// (controller or "" for v2, directory).
    dirs: Vec<(String, PathBuf)>,
    /// Mount point of the v2 tree, when the layout is v2.
    v2_root: Option<PathBuf>,
}

impl Cgroup {
    /// Where the container `id`'s cgroup lives, without creating anything.
    pub fn locate(layout: &Layout, parent: &str, id: &str) -> Result<Self> {
        check_relative(parent)?;
        check_relative(id)?;
        let proc_cgroup =
            fs::read_to_string("/proc/self/cgroup").ctx(|| "read /proc/self/cgroup".into())?;
        let dirs = match layout {
            Layout::V2 { root } => {
                let base = root.join(own_path(&proc_cgroup, None));
                vec![(String::new(), base.join(parent).join(id))]
            }
            Layout::V1 { mounts } => mounts
                .iter()
                .map(|(ctrl, mp)| {
                    let base = mp.join(own_path(&proc_cgroup, Some(ctrl)));
                    (ctrl.clone(), base.join(parent).join(id))
                })
                .collect(),
        };
        let v2_root = match layout {
            Layout::V2 { root } => Some(root.clone()),
            Layout::V1 { .. } => None,
        };
        Ok(Self { dirs, v2_root })
    }

    /// Creates the cgroup and applies `limits`. A limit whose controller the host lacks is
    /// an error, never silently ignored.
    ///
    /// On v1 only the hierarchies of requested limits are used: every attach to a v1
    /// hierarchy costs an RCU grace period, and a container needs no cgroup to be cleaned
    /// up (its pid namespace dies with its init). On v2 there is always one cgroup (one
    /// attach), which also gives `cgroup.kill`.
    pub fn create(layout: &Layout, parent: &str, id: &str, limits: &Limits) -> Result<Self> {
        let mut cg = Self::locate(layout, parent, id)?;
        if let Some(root) = cg.v2_root.clone() {
            cg.create_v2(&root, limits)?;
        } else {
            cg.create_v1(limits)?;
            cg.dirs.retain(|(ctrl, _)| match ctrl.as_str() {
                "memory" => limits.memory.is_some(),
                "cpu" => limits.cpus.is_some(),
                "pids" => limits.pids.is_some(),
                _ => false,
            });
        }
        Ok(cg)
    }

    fn create_v2(&self, root: &Path, limits: &Limits) -> Result<()> {
        let (_, dir) = &self.dirs[0];
        let wanted: Vec<&str> = [
            ("memory", limits.memory.is_some()),
            ("cpu", limits.cpus.is_some()),
            ("pids", limits.pids.is_some()),
        ]
        .into_iter()
        .filter_map(|(c, w)| w.then_some(c))
        .collect();
        let parent = dir.parent().expect("cgroup dir has a parent");
        fs::create_dir_all(parent).ctx(|| format!("mkdir {}", parent.display()))?;
        if !wanted.is_empty() {
            // Controllers must be enabled in every ancestor's subtree_control, top down; the
            // leaf gets processes, so it never enables anything itself.
            let mut chain: Vec<&Path> = parent
                .ancestors()
                .take_while(|p| p.starts_with(root))
                .collect();
            chain.reverse();
            for ancestor in chain {
                let available =
                    fs::read_to_string(ancestor.join("cgroup.controllers")).unwrap_or_default();
                for c in &wanted {
                    if !available.split_whitespace().any(|a| a == *c) {
                        return Err(RuntimeError::Setup(format!(
                            "cgroup v2 controller {c} is not available in {}",
                            ancestor.display()
                        )));
                    }
                }
                let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
                write(&ancestor.join("cgroup.subtree_control"), enable.trim())?;
            }
        }
        mkdir(dir)?;
        if let Some(m) = limits.memory {
            write(&dir.join("memory.max"), &m.to_string())?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(c) = limits.cpus {
            write(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", quota_us(c)),
            )?;
        }
        if let Some(p) = limits.pids {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }

    fn create_v1(&self, limits: &Limits) -> Result<()> {
        for (ctrl, needed) in [
            ("memory", limits.memory.is_some()),
            ("cpu", limits.cpus.is_some()),
            ("pids", limits.pids.is_some()),
        ] {
            if needed && !self.dirs.iter().any(|(c, _)| c == ctrl) {
                return Err(RuntimeError::Setup(format!(
                    "cgroup v1 controller {ctrl} is not mounted"
                )));
            }
        }
        for (ctrl, dir) in &self.dirs {
            let wanted = match ctrl.as_str() {
                "memory" => limits.memory.is_some(),
                "cpu" => limits.cpus.is_some(),
                "pids" => limits.pids.is_some(),
                _ => false,
            };
            if !wanted {
                continue;
            }
            mkdir(dir)?;
            match ctrl.as_str() {
                "memory" => {
                    if let Some(m) = limits.memory {
                        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        // No swap either, where swap accounting exists.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &m.to_string())?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(c) = limits.cpus {
                        write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota_us(c).to_string())?;
                    }
                }
                "pids" => {
                    if let Some(p) = limits.pids {
                        write(&dir.join("pids.max"), &p.to_string())?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The directories of this cgroup (one per hierarchy).
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// Moves `pid` into the cgroup (in every hierarchy).
    pub fn add(&self, pid: i32) -> Result<()> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Pids currently in the cgroup (union over hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for (_, dir) in &self.dirs {
            if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
                for p in s.lines().filter_map(|l| l.trim().parse().ok()) {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    /// Whether the kernel OOM-killed something in the memory cgroup.
    pub fn oom_killed(&self) -> bool {
        for (ctrl, dir) in &self.dirs {
            let file = match (self.v2_root.is_some(), ctrl.as_str()) {
                (true, _) => dir.join("memory.events"),
                (false, "memory") => dir.join("memory.oom_control"),
                _ => continue,
            };
            if let Ok(s) = fs::read_to_string(file) {
                for line in s.lines() {
                    if let Some(n) = line.strip_prefix("oom_kill ")
                        && n.trim().parse::<u64>().unwrap_or(0) > 0
                    {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Kills every process left, waits for the cgroup to empty and removes it, then removes
    /// the parent directory too if no other container uses it. Missing dirs are fine.
    pub fn destroy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if self.v2_root.is_some() {
            let kill_file = self.dirs[0].1.join("cgroup.kill");
            if kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            }
        }
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::Setup(
                    "cgroup still has processes after SIGKILL".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for (_, dir) in &self.dirs {
            rmdir_retry(dir, deadline)?;
            if let Some(parent) = dir.parent() {
                // Shared by every container: only goes when empty (ENOTEMPTY/EBUSY otherwise).
                let _ = fs::remove_dir(parent);
            }
        }
        Ok(())
    }

    /// Whether any of the cgroup's directories exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.exists())
    }
}

fn quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

fn check_relative(p: &str) -> Result<()> {
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(RuntimeError::Setup(format!(
            "bad cgroup path component {p:?}"
        )));
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<()> {
    // The shared parent may be removed by another container's cleanup between creating it
    // and creating our directory in it; try again then.
    let mut attempt = 0;
    loop {
        match fs::create_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 5 => attempt += 1,
            Err(e) => return Err(e).ctx(|| format!("mkdir {}", dir.display())),
        }
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).ctx(|| format!("write {value:?} to {}", path.display()))
}

fn rmdir_retry(dir: &Path, deadline: Instant) -> Result<()> {
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).ctx(|| format!("rmdir {}", dir.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_mounts_and_own_paths() {
        let mi = "35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory\n\
                  36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  37 25 0:32 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let m = v1_mounts(mi);
        assert_eq!(
            m,
            vec![
                ("memory".to_string(), PathBuf::from("/sys/fs/cgroup/memory")),
                (
                    "cpu".to_string(),
                    PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
                ),
            ]
        );
        let pc = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/user.slice\n";
        assert_eq!(own_path(pc, Some("memory")), "process_api/abc");
        assert_eq!(own_path(pc, Some("cpu")), "");
        assert_eq!(own_path(pc, None), "user.slice");
        assert_eq!(own_path(pc, Some("pids")), "");
    }

    #[test]
    fn rejects_escaping_paths() {
        for bad in ["", "/abs", "a/../b", "a//b"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
        assert!(check_relative("wharf/t1").is_ok());
        assert_eq!(quota_us(0.5), 50_000);
    }
}
