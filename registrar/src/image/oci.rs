//! Reading an OCI image layout (directory, or inside a tarball) and a `docker save`
//! tarball's `manifest.json`, verifying every blob's sha256 against its digest.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ImageError, io, sha256_bytes, sha256_file};

/// Where the image comes from.
pub enum Source {
    /// An OCI image layout directory.
    Dir(PathBuf),
    /// A tarball and the scratch directory to extract it into.
    Tarball(PathBuf, PathBuf),
}

/// A verified image: its store id and layer files, bottom-most first.
pub struct Manifest {
    pub id: String,
    pub layers: Vec<LayerFile>,
}

pub struct LayerFile {
    pub path: PathBuf,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

pub fn read(origin: &Path, src: &Source) -> Result<Manifest, ImageError> {
    match src {
        Source::Dir(dir) => read_layout(origin, dir),
        Source::Tarball(tarball, scratch) => {
            let f = fs::File::open(tarball).map_err(|e| io(origin, e))?;
            let mut archive = tar::Archive::new(std::io::BufReader::new(f));
            archive.unpack(scratch).map_err(|e| io(origin, e))?;
            if scratch.join("manifest.json").is_file() {
                read_docker(origin, scratch)
            } else if scratch.join("oci-layout").is_file() {
                read_layout(origin, scratch)
            } else {
                Err(invalid(
                    origin,
                    "tarball has neither manifest.json nor oci-layout",
                ))
            }
        }
    }
}

fn invalid(origin: &Path, msg: impl Into<String>) -> ImageError {
    ImageError::Invalid(origin.into(), msg.into())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    origin: &Path,
    what: &str,
    data: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(data).map_err(|e| invalid(origin, format!("{what}: {e}")))
}

/// Path of a blob in an OCI layout, after checking its digest.
fn verified_blob(origin: &Path, dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            invalid(
                origin,
                format!("unsupported digest {digest:?} (sha256 only)"),
            )
        })?;
    let path = dir.join("blobs").join("sha256").join(hex);
    let actual = sha256_file(&path).map_err(|e| io(&path, e))?;
    if actual != hex {
        return Err(ImageError::Digest {
            path: origin.into(),
            what: format!("blob {digest}"),
            expected: hex.into(),
            actual,
        });
    }
    Ok(path)
}

fn read_layout(origin: &Path, dir: &Path) -> Result<Manifest, ImageError> {
    let index_path = dir.join("index.json");
    let data = fs::read(&index_path).map_err(|e| io(&index_path, e))?;
    let mut index: Index = parse_json(origin, "index.json", &data)?;
    // Follow nested indexes down to one image manifest for linux/amd64 (or unlabelled).
    for _ in 0..4 {
        let desc = index
            .manifests
            .into_iter()
            .find(|d| {
                d.platform.as_ref().is_none_or(|p| {
                    p.os == "linux"
                        && p.architecture == std::env::consts::ARCH.replace("x86_64", "amd64")
                })
            })
            .ok_or_else(|| invalid(origin, "index has no manifest for this platform"))?;
        let blob = verified_blob(origin, dir, &desc.digest)?;
        let data = fs::read(&blob).map_err(|e| io(&blob, e))?;
        if desc.media_type.contains("image.index") || desc.media_type.contains("manifest.list") {
            index = parse_json(origin, "nested index", &data)?;
            continue;
        }
        let manifest: OciManifest = parse_json(origin, "manifest", &data)?;
        let mut layers = Vec::new();
        for l in &manifest.layers {
            if l.media_type.contains("zstd") {
                return Err(invalid(
                    origin,
                    format!("layer {}: zstd layers are not supported", l.digest),
                ));
            }
            layers.push(LayerFile {
                path: verified_blob(origin, dir, &l.digest)?,
            });
        }
        return Ok(Manifest {
            id: desc.digest.trim_start_matches("sha256:").to_string(),
            layers,
        });
    }
    Err(invalid(origin, "image indexes nested too deeply"))
}

fn read_docker(origin: &Path, dir: &Path) -> Result<Manifest, ImageError> {
    let data = fs::read(dir.join("manifest.json")).map_err(|e| io(origin, e))?;
    let entries: Vec<DockerEntry> = parse_json(origin, "manifest.json", &data)?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| invalid(origin, "manifest.json lists no image"))?;
    let config_path = inside(origin, dir, &entry.config)?;
    let config_data = fs::read(&config_path).map_err(|e| io(&config_path, e))?;
    let id = sha256_bytes(&config_data);
    // The config's file name is its digest in every docker save format.
    let named = named_digest(&entry.config);
    if let Some(expected) = named
        && expected != id
    {
        return Err(ImageError::Digest {
            path: origin.into(),
            what: format!("config {}", entry.config),
            expected,
            actual: id,
        });
    }
    let config: DockerConfig = parse_json(origin, "image config", &config_data)?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    let mut layers = Vec::new();
    for (i, name) in entry.layers.iter().enumerate() {
        let path = inside(origin, dir, name)?;
        let actual = sha256_file(&path).map_err(|e| io(&path, e))?;
        // A blob named by its digest must match it; an uncompressed layer.tar must match the
        // config's diff_id. One of the two always applies to a real `docker save`.
        let expected = named_digest(name).or_else(|| {
            diff_ids
                .get(i)
                .and_then(|d| d.strip_prefix("sha256:"))
                .map(str::to_owned)
        });
        match expected {
            Some(exp) if exp == actual => {}
            Some(exp) => {
                return Err(ImageError::Digest {
                    path: origin.into(),
                    what: format!("layer {name}"),
                    expected: exp,
                    actual,
                });
            }
            None => {
                return Err(invalid(
                    origin,
                    format!("layer {name}: no digest to verify it against"),
                ));
            }
        }
        layers.push(LayerFile { path });
    }
    Ok(Manifest { id, layers })
}

/// The hex digest a file name carries: `blobs/sha256/<hex>` or `<hex>.json`.
fn named_digest(name: &str) -> Option<String> {
    let base = Path::new(name).file_name()?.to_str()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// A path named by the manifest, which must stay inside the extracted tarball.
fn inside(origin: &Path, dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    if Path::new(name).components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) {
        return Err(invalid(
            origin,
            format!("manifest path {name:?} leaves the archive"),
        ));
    }
    Ok(dir.join(name))
}
