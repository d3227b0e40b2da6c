//! Atomic file replacement: a temporary file in the destination's own directory (so the
//! rename never crosses a filesystem), written, fsynced, given its mode and owner, renamed
//! over the destination, and the directory fsynced so the rename survives a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;

use crate::config::Owner;

/// What a destination should look like besides its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileMeta {
    pub mode: Option<u32>,
    pub owner: Option<Owner>,
}

const DEFAULT_MODE: u32 = 0o644;

/// The current content of `path`, `None` if it does not exist.
pub fn read_current(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `path`'s mode and owner already are what `meta` asks for.
pub fn meta_matches(path: &Path, meta: FileMeta) -> io::Result<bool> {
    let m = fs::metadata(path)?;
    let mode_ok = meta.mode.is_none_or(|want| m.mode() & 0o7777 == want);
    let owner_ok = meta
        .owner
        .is_none_or(|o| o.uid.is_none_or(|u| u == m.uid()) && o.gid.is_none_or(|g| g == m.gid()));
    Ok(mode_ok && owner_ok)
}

/// A written, synced temporary file next to its destination. Removed on drop unless
/// installed.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    dest: PathBuf,
    installed: bool,
}

impl Staged {
    /// Writes `bytes` to a new temporary file beside `dest`. The mode is `meta.mode`, else
    /// the current destination's, else 0644 (confd's rule).
    pub fn write(dest: &Path, bytes: &[u8], meta: FileMeta) -> io::Result<Self> {
        let dir = parent(dest);
        let base = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "dest names no file"))?
            .to_string_lossy();
        let suffix: u64 = rand::rng().random();
        let path = dir.join(format!(".{base}.render-{suffix:016x}"));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let staged = Self {
            path,
            dest: dest.to_owned(),
            installed: false,
        };
        file.write_all(bytes)?;
        let mode = match meta.mode {
            Some(m) => m,
            None => fs::metadata(dest)
                .map(|m| m.mode() & 0o7777)
                .unwrap_or(DEFAULT_MODE),
        };
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(o) = meta.owner {
            std::os::unix::fs::fchown(&file, o.uid, o.gid)?;
        }
        file.sync_all()?;
        Ok(staged)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staged file over the destination and syncs the directory.
    pub fn install(mut self) -> io::Result<()> {
        fs::rename(&self.path, &self.dest)?;
        self.installed = true;
        sync_dir(parent(&self.dest))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.installed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Replaces `dest` with `bytes` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8], meta: FileMeta) -> io::Result<()> {
    Staged::write(dest, bytes, meta)?.install()
}

/// Removes `dest` (used when a rollback has no previous file to restore).
pub fn remove(dest: &Path) -> io::Result<()> {
    match fs::remove_file(dest) {
        Ok(()) => sync_dir(parent(dest)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `<dest>.bak`: the one backup kept of the previous content.
pub fn backup_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".bak");
    PathBuf::from(s)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        write_atomic(&dest, b"one", FileMeta::default()).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"one");
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o644);
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&dest, b"two", FileMeta::default()).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o600);
        write_atomic(
            &dest,
            b"three",
            FileMeta {
                mode: Some(0o640),
                owner: None,
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o640);
        // Nothing but the destination is left in the directory.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn owner_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        // Our own ids: allowed without privileges, and still a real fchown.
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let meta = FileMeta {
            mode: Some(0o600),
            owner: Some(Owner {
                uid: Some(uid),
                gid: Some(gid),
            }),
        };
        write_atomic(&dest, b"x", meta).unwrap();
        let m = fs::metadata(&dest).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o600));
        assert!(meta_matches(&dest, meta).unwrap());
        let other = FileMeta {
            mode: Some(0o644),
            owner: None,
        };
        assert!(!meta_matches(&dest, other).unwrap());
    }

    #[test]
    fn dropped_stage_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let staged = Staged::write(&dest, b"x", FileMeta::default()).unwrap();
        assert!(staged.path().exists());
        assert_eq!(staged.path().parent(), Some(dir.path()));
        drop(staged);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
