//! Both cgroup code paths. This host is hybrid: memory/cpu/pids are v1 hierarchies (used
//! for real limits by the runtime tests), and a controller-less v2 tree is mounted at
//! `/sys/fs/cgroup/unified`, which exercises the v2 code: create, move a process in, kill
//! through `cgroup.kill`, wait for it to empty, remove.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{ChildGuard, unique};
use registrar::runtime::{Cgroup, Layout, Limits};

#[test]
fn detects_this_hosts_layout() {
    let layout = Layout::detect().unwrap();
    let statfs_v2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .unwrap()
        .filesystem_type()
        == nix::sys::statfs::CGROUP2_SUPER_MAGIC;
    assert_eq!(layout.is_v2(), statfs_v2);
    if let Layout::V1 { mounts } = &layout {
        let names: Vec<&str> = mounts.iter().map(|(c, _)| c.as_str()).collect();
        assert!(
            names.contains(&"memory") && names.contains(&"pids"),
            "{names:?}"
        );
    }
}

#[test]
fn v1_cgroup_holds_kills_and_removes() {
    let layout = Layout::detect().unwrap();
    if layout.is_v2() {
        return v2_at(PathBuf::from("/sys/fs/cgroup"));
    }
    let name = unique("cg1");
    let limits = Limits {
        memory: Some(64 << 20),
        cpus: Some(0.25),
        pids: Some(10),
    };
    let cg = Cgroup::create(&layout, "wharf", &name, &limits).unwrap();
    let dirs: Vec<PathBuf> = cg.dirs().map(PathBuf::from).collect();
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    let pids_dir = dirs
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/pids"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .unwrap()
            .trim(),
        "10"
    );
    let mem_dir = dirs
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/memory"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(mem_dir.join("memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        (64u64 << 20).to_string()
    );
    let cpu_dir = dirs
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/cpu"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(cpu_dir.join("cpu.cfs_quota_us"))
            .unwrap()
            .trim(),
        "25000"
    );
    let mut child = ChildGuard(Some(Command::new("sleep").arg("30").spawn().unwrap()));
    cg.add(child.pid()).unwrap();
    assert_eq!(cg.pids(), vec![child.pid()]);
    cg.destroy(Duration::from_secs(5)).unwrap();
    assert_eq!(child.wait_code(), -1, "killed by a signal");
    assert!(!cg.exists());
    assert!(common::leftover_cgroups(&name).is_empty());
}

#[test]
fn v2_code_path_on_the_unified_tree() {
    let unified = PathBuf::from("/sys/fs/cgroup/unified");
    if Layout::detect().unwrap().is_v2() {
        return v2_at(PathBuf::from("/sys/fs/cgroup"));
    }
    assert!(
        unified.join("cgroup.controllers").exists(),
        "hybrid host expected"
    );
    v2_at(unified);
}

fn v2_at(root: PathBuf) {
    let layout = Layout::V2 { root: root.clone() };
    let name = unique("cg2");
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap();
    if !controllers.split_whitespace().any(|c| c == "pids") {
        // A limit whose controller is missing is an error, not silently ignored.
        let err = Cgroup::create(
            &layout,
            "wharf",
            &name,
            &Limits {
                pids: Some(5),
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("pids"), "{err}");
    }
    let cg = Cgroup::create(&layout, "wharf", &name, &Limits::default()).unwrap();
    let dir: PathBuf = cg.dirs().next().unwrap().into();
    assert!(dir.starts_with(&root) && dir.is_dir());
    let mut child = ChildGuard(Some(Command::new("sleep").arg("30").spawn().unwrap()));
    cg.add(child.pid()).unwrap();
    assert_eq!(cg.pids(), vec![child.pid()]);
    cg.destroy(Duration::from_secs(5)).unwrap();
    assert_eq!(child.wait_code(), -1, "killed");
    assert!(!dir.exists());
}
