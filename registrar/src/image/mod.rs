//! Images: a plain rootfs directory is used in place (read-only, as the overlay's lower
//! layer). An OCI image layout directory or a `docker save` tarball is verified (sha256 of
//! every blob), its layers applied in order with whiteouts into one directory of the local
//! image store, once: later runs of the same image reuse it.

mod layer;
mod oci;

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use layer::apply_layer;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0}: {1}")]
    Invalid(PathBuf, String),
    #[error("image {path}: digest mismatch for {what}: expected {expected}, got {actual}")]
    Digest {
        path: PathBuf,
        what: String,
        expected: String,
        actual: String,
    },
}

/// A runnable image: its read-only layers, top-most first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub layers: Vec<PathBuf>,
    /// The store id (hex digest) when it was unpacked into the store.
    pub id: Option<String>,
}

/// The local image store: `<root>/<id>/rootfs`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Turns what the user named into runnable layers, unpacking into the store if needed.
    pub fn resolve(&self, source: &Path) -> Result<Image, ImageError> {
        let meta = fs::metadata(source).map_err(|e| io(source, e))?;
        if meta.is_dir() {
            if source.join("oci-layout").is_file() {
                let src = oci::Source::Dir(source.to_path_buf());
                return self.unpack(source, &src);
            }
            let abs = fs::canonicalize(source).map_err(|e| io(source, e))?;
            if !abs.join("bin").exists() && !abs.join("usr").exists() {
                return Err(ImageError::Invalid(
                    source.into(),
                    "not an OCI layout (no oci-layout file) and not a root filesystem (no bin/ or usr/)".into(),
                ));
            }
            return Ok(Image {
                layers: vec![abs],
                id: None,
            });
        }
        // A tarball: `docker save` output (legacy or OCI-style inside).
        let tmp = tempdir_in(&self.root, source)?;
        let src = oci::Source::Tarball(source.to_path_buf(), tmp.clone());
        let r = self.unpack(source, &src);
        let _ = fs::remove_dir_all(&tmp);
        r
    }

    fn unpack(&self, source: &Path, src: &oci::Source) -> Result<Image, ImageError> {
        let manifest = oci::read(source, src)?;
        let dest = self.root.join(&manifest.id);
        let rootfs = dest.join("rootfs");
        if rootfs.is_dir() {
            return Ok(Image {
                layers: vec![rootfs],
                id: Some(manifest.id),
            });
        }
        let staging = self
            .root
            .join(format!("{}.tmp-{}", manifest.id, std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        let staged_rootfs = staging.join("rootfs");
        fs::create_dir_all(&staged_rootfs).map_err(|e| io(&staged_rootfs, e))?;
        let result = (|| {
            for layer in &manifest.layers {
                layer::apply_layer(&layer.path, &staged_rootfs).map_err(|e| {
                    ImageError::Invalid(
                        source.into(),
                        format!("layer {}: {e}", layer.path.display()),
                    )
                })?;
            }
            // Another run may have finished the same image meanwhile; either copy is good.
            match fs::rename(&staging, &dest) {
                Ok(()) => Ok(()),
                Err(_) if rootfs.is_dir() => Ok(()),
                Err(e) => Err(io(&dest, e)),
            }
        })();
        let _ = fs::remove_dir_all(&staging);
        result?;
        Ok(Image {
            layers: vec![rootfs],
            id: Some(manifest.id),
        })
    }
}

fn tempdir_in(root: &Path, source: &Path) -> Result<PathBuf, ImageError> {
    let dir = root.join(format!(
        "extract-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    fs::create_dir_all(&dir).map_err(|e| io(source, e))?;
    Ok(dir)
}

fn io(path: &Path, source: std::io::Error) -> ImageError {
    ImageError::Io {
        path: path.into(),
        source,
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// sha256 of bytes, hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
