//! `render.toml` (the daemon's settings) and the template resources of its `confdir`.
//!
//! Every error names the file, and where the problem is a value, the line and the key.

mod resource;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use catalog::EtcdConfig;
use catalog::model::duration_str;
use serde::Deserialize;

pub use resource::{Owner, Resource, ServiceSelection, Wait, load_resources};

/// Why a configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TOML syntax or type error; toml's message already names the line, column and key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

/// `render.toml`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory of template resources (`*.toml`).
    pub confdir: PathBuf,
    /// Directory `src` paths of resources are relative to.
    pub template_dir: PathBuf,
    /// etcd key prefix of the wharf catalog.
    pub prefix: String,
    pub etcd: EtcdConfig,
    pub admin_listen: SocketAddr,
    /// A full re-render this often even without watch events: a safety net against a missed
    /// event (confd #821), cheap because unchanged output writes nothing.
    pub resync_interval: Duration,
    /// Resource defaults.
    pub defaults: ResourceDefaults,
}

/// Values a resource inherits when it does not set them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceDefaults {
    #[serde(default)]
    pub wait: Option<Wait>,
    #[serde(default = "default_command_timeout", with = "duration_str")]
    pub command_timeout: Duration,
    #[serde(default)]
    pub backup: bool,
}

impl Default for ResourceDefaults {
    fn default() -> Self {
        Self {
            wait: None,
            command_timeout: default_command_timeout(),
            backup: false,
        }
    }
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    confdir: Option<PathBuf>,
    #[serde(default)]
    template_dir: Option<PathBuf>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    etcd: EtcdConfig,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default = "default_resync", with = "duration_str")]
    resync_interval: Duration,
    #[serde(default)]
    defaults: ResourceDefaults,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin")]
    listen: SocketAddr,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9102))
}
fn default_resync() -> Duration {
    Duration::from_secs(300)
}

impl Settings {
    /// Reads `render.toml`. Relative paths are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawSettings = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let prefix = raw.prefix.unwrap_or_else(|| "/wharf/v1".to_owned());
        catalog::Keyspace::new(&prefix).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of_key(text, "prefix"),
            key: "prefix".into(),
            message: e.to_string(),
        })?;
        if let Some(w) = &raw.defaults.wait {
            w.validate().map_err(|message| ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of_key(text, "wait"),
                key: "defaults.wait".into(),
                message,
            })?;
        }
        Ok(Self {
            confdir: rel(raw.confdir.unwrap_or_else(|| "conf.d".into())),
            template_dir: rel(raw.template_dir.unwrap_or_else(|| "templates".into())),
            prefix,
            etcd: raw.etcd,
            admin_listen: raw.admin.listen,
            resync_interval: raw.resync_interval.max(Duration::from_secs(1)),
            defaults: raw.defaults,
        })
    }

    pub fn keyspace(&self) -> catalog::Keyspace {
        // Validated in `parse`.
        catalog::Keyspace::new(&self.prefix).unwrap_or_default()
    }
}

/// 1-based line of the first `key =` assignment in a TOML text (1 when not found), for
/// errors about values that parsed but are invalid.
pub(crate) fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

/// 1-based line of a byte offset.
pub(crate) fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let s = Settings::parse(Path::new("/etc/wharf/render.toml"), "").unwrap();
        assert_eq!(s.confdir, Path::new("/etc/wharf/conf.d"));
        assert_eq!(s.template_dir, Path::new("/etc/wharf/templates"));
        assert_eq!(s.prefix, "/wharf/v1");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:9102");
        assert_eq!(s.defaults.command_timeout, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "prefix = \"/x\"\n[admin]\nlisten = \"127.0.0.1:1\"\nlistn = 3\n";
        let err = Settings::parse(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("r.toml:"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn bad_prefix_names_line() {
        let err = Settings::parse(Path::new("r.toml"), "\nprefix = \"nope/\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("r.toml:2: `prefix`"), "{err}");
    }
}
