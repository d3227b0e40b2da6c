//! Shared helpers of the registrar's integration tests: a busybox rootfs, child-process
//! guards, and checks that a container left nothing behind.
#![allow(dead_code)]

pub mod agent;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_registrar");

/// A minimal root filesystem: static busybox plus one symlink per applet.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "dev"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .unwrap();
    fs::write(root.join("etc/marker"), "from-image\n").unwrap();
    root
}

/// Kills (SIGKILL) and reaps a child on drop, so a failing test leaves no process behind.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn pid(&self) -> i32 {
        self.0.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }
    pub fn wait_code(&mut self) -> i32 {
        let status = self.0.take().unwrap().wait().unwrap();
        status.code().unwrap_or(-1)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every cgroup directory of a container named `name` that still exists.
pub fn leftover_cgroups(name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 0, &mut out);
    out
}

fn walk(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 6 {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            let p = e.path();
            if e.file_name().to_string_lossy() == name {
                out.push(p.clone());
            }
            walk(&p, name, depth + 1, out);
        }
    }
}

/// Mounts (in our mount namespace) whose mount point is under `dir`.
pub fn leftover_mounts(dir: &Path) -> Vec<String> {
    let mi = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_string_lossy().to_string();
    mi.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|mp| mp.starts_with(&d))
        })
        .map(str::to_owned)
        .collect()
}

/// Asserts that nothing of container `name` (run with state dir `state`) remains.
pub fn assert_nothing_left(name: &str, state: &Path) {
    assert_eq!(
        leftover_cgroups(name),
        Vec::<PathBuf>::new(),
        "cgroups left behind"
    );
    assert_eq!(
        leftover_mounts(state),
        Vec::<String>::new(),
        "mounts left behind"
    );
}

/// A unique container name for this test process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{:x}{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xffffff
    )
}

/// A /24 for a test bridge that no route on this host overlaps (other tests, other test
/// runs, the host's own networks) and that is not in `avoid`, as `A.B.C.0/24`. Picked at
/// random from 10.200.0.0–10.250.255.0 so that concurrent test processes do not collide;
/// if two ever did, the runtime refuses the second bridge with a clear error.
pub fn unique_subnet(avoid: &[String]) -> String {
    let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
    loop {
        let r = rand::random::<u32>();
        let subnet = format!("10.{}.{}.0/24", 200 + (r >> 8) % 51, r & 0xff);
        let gateway = subnet.replace(".0/24", ".1/24");
        if !avoid.contains(&subnet)
            && registrar::runtime::bridge::overlapping_route(&routes, "", &gateway).is_none()
        {
            return subnet;
        }
    }
}
