//! `healthcheck.toml` and the settings the library runs with.
//!
//! ```toml
//! id = "hc-1"                 # checker id (a DNS label); default: the host name
//! prefix = "/wharf/v1"        # etcd key prefix
//! lease_ttl = "15s"           # the checker lease; a dead checker's work moves within it
//! admin = "127.0.0.1:9101"    # /metrics and /healthz
//! mark_refresh = "30m"        # rewrite unchanged marks this often; "0s" never
//! write_concurrency = 8       # etcd transactions in flight at once (up to 100 writes each)
//!
//! [etcd]
//! endpoints = ["http://127.0.0.1:2379"]
//! ```
//!
//! Check specs (path, interval, rise/fall, …) are not here: they live in etcd, per service
//! (`services/<svc>/config`) and per instance, so that every replica uses the same ones.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use catalog::model::duration_str;
use catalog::{CheckerId, EtcdConfig, Keyspace};
use serde::Deserialize;

/// The admin address when neither the file nor the command line names one.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9101";

/// A configuration error, naming the file (and, from the TOML parser, the line and key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
}

/// The file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_lease_ttl", with = "duration_str")]
    pub lease_ttl: Duration,
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    #[serde(default = "default_mark_refresh", with = "duration_str")]
    pub mark_refresh: Duration,
    #[serde(default = "default_write_concurrency")]
    pub write_concurrency: usize,
    #[serde(default)]
    pub etcd: EtcdConfig,
}

fn default_prefix() -> String {
    catalog::defaults::PREFIX.to_owned()
}
fn default_lease_ttl() -> Duration {
    catalog::defaults::LEASE_TTL
}
fn default_mark_refresh() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_write_concurrency() -> usize {
    8
}

impl Default for FileConfig {
    fn default() -> Self {
        // An empty document takes every default.
        toml::from_str("").unwrap_or_else(|_| unreachable!("empty config parses"))
    }
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Validates and turns the file into the library's settings. `origin` names where the
    /// values came from (the file, or "command line") in errors.
    pub fn settings(&self, origin: &str) -> Result<Settings, ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key,
            message,
        };
        let id = match &self.id {
            Some(id) => CheckerId::new(id.clone()).map_err(|e| invalid("id", e.to_string()))?,
            None => default_checker_id(),
        };
        let keyspace = Keyspace::new(&self.prefix).map_err(|e| invalid("prefix", e.to_string()))?;
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "lease_ttl",
                format!("{:?} is below etcd's 1s minimum", self.lease_ttl),
            ));
        }
        if self.write_concurrency == 0 {
            return Err(invalid("write_concurrency", "must be at least 1".into()));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "no etcd endpoint".into()));
        }
        let mut settings = Settings::new(id);
        settings.keyspace = keyspace;
        settings.lease_ttl = self.lease_ttl;
        settings.mark_refresh = (!self.mark_refresh.is_zero()).then_some(self.mark_refresh);
        settings.write_concurrency = self.write_concurrency;
        Ok(settings)
    }
}

/// The host name as a DNS label, else `healthcheck`. Replicas on one host need `--id`.
pub fn default_checker_id() -> CheckerId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    CheckerId::new(label.trim_matches('-'))
        .unwrap_or_else(|_| CheckerId::new("healthcheck").unwrap_or_else(|_| unreachable!()))
}

/// What [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keyspace: Keyspace,
    pub checker_id: CheckerId,
    pub lease_ttl: Duration,
    /// Rewrite unchanged marks this often (`None`: never). Each mark gets its own random
    /// phase, so the writes are spread evenly.
    pub mark_refresh: Option<Duration>,
    pub write_concurrency: usize,
    /// Floor of `deregister_after` (one minute; tests lower it).
    pub min_deregister_after: Duration,
    /// How often the catalog watch asks etcd to confirm it is current.
    pub watch_progress_interval: Duration,
}

impl Settings {
    pub fn new(checker_id: CheckerId) -> Self {
        Self {
            keyspace: Keyspace::default(),
            checker_id,
            lease_ttl: catalog::defaults::LEASE_TTL,
            mark_refresh: Some(default_mark_refresh()),
            write_concurrency: default_write_concurrency(),
            min_deregister_after: Duration::from_secs(60),
            watch_progress_interval: Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        let c = FileConfig::default();
        assert_eq!(c.lease_ttl, Duration::from_secs(15));
        assert_eq!(c.prefix, "/wharf/v1");
        let text = r#"
            id = "hc-1"
            lease_ttl = "5s"
            admin = "127.0.0.1:9200"
            mark_refresh = "0s"
            [etcd]
            endpoints = ["http://127.0.0.1:2379"]
        "#;
        let c = FileConfig::parse(text, Path::new("hc.toml")).unwrap();
        let s = c.settings("hc.toml").unwrap();
        assert_eq!(s.checker_id.as_str(), "hc-1");
        assert_eq!(s.lease_ttl, Duration::from_secs(5));
        assert_eq!(s.mark_refresh, None);
        assert_eq!(c.admin, Some("127.0.0.1:9200".parse().unwrap()));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = FileConfig::parse(
            "id = \"hc\"\nlease_tll = \"5s\"\n",
            Path::new("/etc/hc.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/hc.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("lease_tll"), "{err}");
        let err = FileConfig::parse("lease_ttl = \"soon\"\n", Path::new("hc.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("lease_ttl"), "{err}");
        let c = FileConfig::parse("id = \"Bad_Id\"\n", Path::new("hc.toml")).unwrap();
        let err = c.settings("hc.toml").unwrap_err().to_string();
        assert!(err.starts_with("hc.toml: id:"), "{err}");
    }

    #[test]
    fn default_id_is_a_label() {
        let id = default_checker_id();
        assert!(!id.as_str().is_empty());
    }
}
