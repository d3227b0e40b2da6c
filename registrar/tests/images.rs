//! OCI image layouts and `docker save` tarballs built here from a busybox rootfs: layers
//! applied in order with whiteouts, digests checked, unpacked once and reused.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{BIN, busybox_rootfs, unique};
use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Layer 1: the whole busybox rootfs. Layer 2: a changed file, a whiteout, a new dir.
fn layers(tmp: &Path) -> (Vec<u8>, Vec<u8>) {
    let rootfs = busybox_rootfs(tmp);
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &rootfs).unwrap();
    let l1 = b.into_inner().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    add("etc/marker", b"layer2\n");
    add("etc/.wh.passwd", b"");
    add("srv/data", b"42\n");
    (l1, b.into_inner().unwrap())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn config(l1: &[u8], l2: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha(l1)), format!("sha256:{}", sha(l2))]}
    }))
    .unwrap()
}

fn oci_layout(dir: &Path, l1: &[u8], l2: &[u8]) -> PathBuf {
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha(data);
        fs::write(blobs.join(&d), data).unwrap();
        (format!("sha256:{d}"), data.len())
    };
    let (l1d, l1s) = put(&gzip(l1));
    let (l2d, l2s) = put(l2);
    let (cd, cs) = put(&config(l1, l2));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1d, "size": l1s},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l2d, "size": l2s},
        ]
    }))
    .unwrap();
    let (md, ms) = put(&manifest);
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
             "platform": {"architecture": "amd64", "os": "linux"}}
        ]}))
        .unwrap(),
    )
    .unwrap();
    layout
}

/// The classic `docker save` layout: `<id>/layer.tar`, `<config digest>.json`, manifest.json.
fn docker_save(dir: &Path, l1: &[u8], l2: &[u8]) -> PathBuf {
    let cfg = config(l1, l2);
    let cfg_name = format!("{}.json", sha(&cfg));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    add("aaaa/layer.tar", l1);
    add("bbbb/layer.tar", l2);
    add(&cfg_name, &cfg);
    let manifest = serde_json::json!([{"Config": cfg_name, "RepoTags": ["bb:latest"],
        "Layers": ["aaaa/layer.tar", "bbbb/layer.tar"]}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    let path = dir.join("image.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    path
}

fn oneshot(image: &Path, state: &Path) -> Output {
    Command::new(BIN)
        .args(["oneshot", "--image"])
        .arg(image)
        .arg("--state-dir")
        .arg(state)
        .args(["--name", &unique("img"), "--"])
        .args([
            "sh",
            "-c",
            "cat /etc/marker /srv/data; ls /etc/passwd 2>&1; ls /bin/busybox",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn assert_layers_applied(o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "layer2", "upper layer wins");
    assert_eq!(lines[1], "42");
    assert!(
        lines[2].contains("No such file"),
        "whiteout hides lower file: {out}"
    );
    assert_eq!(lines[3], "/bin/busybox");
}

fn store_entries(state: &Path) -> Vec<String> {
    fs::read_dir(state.join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn oci_layout_runs_and_is_unpacked_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (l1, l2) = layers(tmp.path());
    let layout = oci_layout(tmp.path(), &l1, &l2);
    let state = tmp.path().join("state");
    assert_layers_applied(&oneshot(&layout, &state));
    let entries = store_entries(&state);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let unpacked = state
        .join("images")
        .join(&entries[0])
        .join("rootfs/etc/marker");
    let before = fs::metadata(&unpacked).unwrap().modified().unwrap();
    assert_layers_applied(&oneshot(&layout, &state));
    assert_eq!(store_entries(&state), entries, "reused, not unpacked again");
    assert_eq!(fs::metadata(&unpacked).unwrap().modified().unwrap(), before);
}

#[test]
fn docker_save_tarball_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (l1, l2) = layers(tmp.path());
    let tarball = docker_save(tmp.path(), &l1, &l2);
    let state = tmp.path().join("state");
    assert_layers_applied(&oneshot(&tarball, &state));
    assert_eq!(store_entries(&state).len(), 1, "scratch extraction removed");
}

#[test]
fn corrupted_blob_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (l1, l2) = layers(tmp.path());
    let layout = oci_layout(tmp.path(), &l1, &l2);
    // Flip a byte of the uncompressed second layer.
    let blob = layout.join("blobs/sha256").join(sha(&l2));
    let mut data = fs::read(&blob).unwrap();
    let last = data.len() - 600;
    data[last] ^= 0xff;
    fs::write(&blob, data).unwrap();
    let state = tmp.path().join("state");
    let o = oneshot(&layout, &state);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("digest mismatch"), "{err}");
    // A legacy tarball whose layer does not match the config's diff_id.
    let (l1b, mut l2b) = layers(&tmp.path().join("b"));
    let tarball = docker_save(tmp.path(), &l1b, &l2b.clone());
    let _ = &mut l2b;
    let mut bytes = fs::read(&tarball).unwrap();
    let pos = bytes.windows(6).position(|w| w == b"layer2").unwrap();
    bytes[pos] = b'L';
    fs::write(&tarball, bytes).unwrap();
    let o = oneshot(&tarball, &state);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("digest mismatch"));
}
