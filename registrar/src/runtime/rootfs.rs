//! The container's filesystem, built inside its own mount namespace by the container's init:
//! an overlay of the read-only image layers under a per-container upper layer, a fresh
//! `/proc`, a minimal `/dev`, then `pivot_root` into it. Because every mount is made in a
//! private mount namespace, the kernel drops them all when the container's last process
//! exits: nothing can leak into the host's mount table, even if the agent crashes.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{chdir, pivot_root};

use super::error::{Context, Result, RuntimeError};
use super::spec::ContainerSpec;

/// Device nodes every container gets: (name, major, minor).
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Builds the root filesystem and pivots into it. Must run in a new mount namespace.
pub fn enter(spec: &ContainerSpec) -> Result<()> {
    // Stop our mounts from propagating back to the host (and the host's into us).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "make / private".into())?;
    // The overlay is mounted over the container directory itself (it already holds
    // upper/ and work/, which the overlay keeps using underneath): no mountpoint directory
    // to create and remove on the host's disk per run. The mount exists only in this
    // private namespace, so the host keeps seeing the directory as it is.
    let root = spec.rootfs_mountpoint();
    mount_overlay(spec, &root)?;
    mount_proc(&root)?;
    mount_dev(&root)?;
    pivot(&root)?;
    Ok(())
}

fn mount_overlay(spec: &ContainerSpec, root: &Path) -> Result<()> {
    if spec.layers.is_empty() {
        return Err(RuntimeError::Setup("image has no layers".into()));
    }
    let mut lower = String::new();
    for (i, l) in spec.layers.iter().enumerate() {
        let s = l
            .to_str()
            .ok_or_else(|| RuntimeError::Setup(format!("non-UTF-8 layer path {l:?}")))?;
        if s.contains([',', ':']) {
            return Err(RuntimeError::Setup(format!(
                "layer path {s:?} contains ',' or ':'"
            )));
        }
        if i > 0 {
            lower.push(':');
        }
        lower.push_str(s);
    }
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        spec.upper_dir().display(),
        spec.work_dir().display()
    );
    // `volatile` (Linux 5.10+): overlayfs skips every sync of the upper layer, above all
    // the sync of the whole upper filesystem when the overlay is torn down, which cost a
    // journal commit of the host's disk per container run. The upper layer is thrown away
    // when the run ends, and a crashed run's upper/work dirs are deleted before the next
    // one, so there is nothing to keep durable. Older kernels refuse the option: mount
    // without it.
    let volatile = format!("{opts},volatile");
    let mount_with = |o: &str| {
        mount(
            Some("overlay"),
            root,
            Some("overlay"),
            MsFlags::empty(),
            Some(o),
        )
    };
    match mount_with(&volatile) {
        Err(nix::errno::Errno::EINVAL) => mount_with(&opts),
        other => other,
    }
    .ctx(|| format!("mount overlay ({opts}) on {}", root.display()))
}

fn mount_proc(root: &Path) -> Result<()> {
    let proc_dir = root.join("proc");
    fs::create_dir_all(&proc_dir).ctx(|| format!("mkdir {}", proc_dir.display()))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .ctx(|| "mount /proc".into())
}

fn mount_dev(root: &Path) -> Result<()> {
    let dev = root.join("dev");
    fs::create_dir_all(&dev).ctx(|| format!("mkdir {}", dev.display()))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .ctx(|| "mount /dev tmpfs".into())?;
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .ctx(|| format!("mknod /dev/{name}"))?;
        // mknod is subject to the umask; make the mode exact.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .ctx(|| format!("chmod /dev/{name}"))?;
    }
    let pts = dev.join("pts");
    fs::create_dir_all(&pts).ctx(|| "mkdir /dev/pts".into())?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .ctx(|| "mount /dev/pts".into())?;
    let shm = dev.join("shm");
    fs::create_dir_all(&shm).ctx(|| "mkdir /dev/shm".into())?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .ctx(|| "mount /dev/shm".into())?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).ctx(|| format!("symlink /dev/{link}"))?;
    }
    Ok(())
}

/// `pivot_root(".", ".")` then detach the old root, as runc does: no temporary directory
/// for the old root is needed.
fn pivot(root: &Path) -> Result<()> {
    chdir(root).ctx(|| format!("chdir {}", root.display()))?;
    pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach old root".into())?;
    chdir("/").ctx(|| "chdir /".into())
}
