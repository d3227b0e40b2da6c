//! What the agent keeps on disk under its state directory, so that a restarted agent knows
//! what its predecessor ran:
//!
//! ```text
//! <state>/agent.sock                 the local API
//! <state>/images/<id>/rootfs         unpacked images
//! <state>/containers/<name>/meta.json   this file's `Meta`
//! <state>/containers/<name>/spec.json   the runtime spec the helper runs
//! <state>/containers/<name>/log         the app's (and helper's) stdout + stderr
//! <state>/containers/<name>/exit.json   how the last run ended
//! <state>/external.json              registrations of processes wharf did not start
//! ```

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use catalog::{Instance, Protocol};
use serde::{Deserialize, Serialize};

use crate::api::Network;
use crate::restart::RestartPolicy;
use crate::runtime::helper::write_atomic;

/// Whether the operator wants the container running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

/// The agent's record of one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub service: String,
    pub version: String,
    pub instance: String,
    /// Address the instance is registered with.
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The image as the operator named it (empty in records of older agents).
    #[serde(default)]
    pub image: String,
    pub network: Network,
    pub restart: RestartPolicy,
    pub desired: Desired,
    pub restarts: u32,
    /// The running helper, identified by pid and start time (pids get reused).
    pub helper_pid: Option<i32>,
    pub helper_start: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("agent.sock")
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
    pub fn container(&self, name: &str) -> PathBuf {
        self.containers().join(name)
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.container(name).join("log")
    }
    fn meta_file(&self, name: &str) -> PathBuf {
        self.container(name).join("meta.json")
    }
    fn external_file(&self) -> PathBuf {
        self.root.join("external.json")
    }

    pub fn save_meta(&self, meta: &Meta) -> std::io::Result<()> {
        fs::create_dir_all(self.container(&meta.name))?;
        write_atomic(
            &self.meta_file(&meta.name),
            &serde_json::to_vec_pretty(meta)?,
        )
    }

    /// Every container record; unreadable ones are skipped with their error.
    pub fn load_all(&self) -> (Vec<Meta>, Vec<String>) {
        let mut metas = Vec::new();
        let mut errors = Vec::new();
        let Ok(rd) = fs::read_dir(self.containers()) else {
            return (metas, errors);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match fs::read(self.meta_file(&name))
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<Meta>(&d).map_err(|e| e.to_string()))
            {
                Ok(m) => metas.push(m),
                Err(err) => errors.push(format!("{name}: {err}")),
            }
        }
        metas.sort_by(|a, b| a.name.cmp(&b.name));
        (metas, errors)
    }

    pub fn save_external(&self, list: &[Instance]) -> std::io::Result<()> {
        fs::create_dir_all(&self.root)?;
        write_atomic(&self.external_file(), &serde_json::to_vec_pretty(list)?)
    }

    pub fn load_external(&self) -> Vec<Instance> {
        fs::read(self.external_file())
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }
}
