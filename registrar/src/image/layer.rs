//! Applying one layer tarball (plain or gzip) onto a directory, with OCI whiteouts:
//! `.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` empties the directory of
//! what lower layers put there.

use std::collections::HashSet;
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Unpacks `tarball` onto `dest`.
pub fn apply_layer(tarball: &Path, dest: &Path) -> std::io::Result<()> {
    let mut f = fs::File::open(tarball)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    drop(f);
    let file = BufReader::new(fs::File::open(tarball)?);
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    // Paths this layer wrote: an opaque marker must not delete them.
    let mut mine: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let rel = clean(&entry.path()?)?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue; // the layer's root directory itself
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            let dir = dest.join(&parent);
            if let Ok(rd) = fs::read_dir(&dir) {
                for child in rd.flatten() {
                    if !mine.contains(&parent.join(child.file_name())) {
                        remove_any(&child.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(victim) = name.strip_prefix(WHITEOUT) {
            remove_any(&dest.join(&parent).join(victim))?;
            continue;
        }
        let target = dest.join(&rel);
        if let Ok(existing) = fs::symlink_metadata(&target) {
            let is_dir_entry = entry.header().entry_type().is_dir();
            if existing.is_dir() != is_dir_entry || (!existing.is_dir() && !is_dir_entry) {
                remove_any(&target)?;
            }
        }
        entry.unpack_in(dest)?;
        mine.insert(rel);
    }
    Ok(())
}

/// The entry's path relative to the layer root; refuses `..` and absolute escapes.
fn clean(p: &Path) -> std::io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("layer entry {} escapes the root", p.display()),
                ));
            }
        }
    }
    Ok(out)
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("root");
        fs::create_dir(&dest).unwrap();
        let l1 = tmp.path().join("l1.tar");
        fs::write(
            &l1,
            tar_with(&[
                ("etc/", None),
                ("etc/a", Some(b"1")),
                ("etc/b", Some(b"2")),
                ("opt/", None),
                ("opt/old", Some(b"x")),
            ]),
        )
        .unwrap();
        let l2 = tmp.path().join("l2.tar");
        fs::write(
            &l2,
            tar_with(&[
                ("etc/.wh.a", Some(b"")),
                ("etc/b", Some(b"22")),
                ("opt/", None),
                ("opt/new", Some(b"y")),
                ("opt/.wh..wh..opq", Some(b"")),
            ]),
        )
        .unwrap();
        apply_layer(&l1, &dest).unwrap();
        apply_layer(&l2, &dest).unwrap();
        assert!(!dest.join("etc/a").exists());
        assert_eq!(fs::read_to_string(dest.join("etc/b")).unwrap(), "22");
        assert!(
            !dest.join("opt/old").exists(),
            "opaque dir hides lower content"
        );
        assert!(
            dest.join("opt/new").exists(),
            "opaque dir keeps its own layer's content"
        );
        assert!(!dest.join("etc/.wh.a").exists());
    }

    #[test]
    fn refuses_escaping_paths() {
        assert!(clean(Path::new("../etc/passwd")).is_err());
        assert_eq!(clean(Path::new("./a/b")).unwrap(), PathBuf::from("a/b"));
    }
}
