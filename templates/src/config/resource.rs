//! Template resources: one `*.toml` file per rendered file, confd-like.
//!
//! ```toml
//! [template]
//! src = "haproxy.cfg.tera"          # relative to the template_dir of render.toml
//! dest = "/etc/haproxy/haproxy.cfg"
//! services = ["web", "api"]          # or ["*"] for every service
//! prefixes = ["/myapp/config"]       # raw keys, under `kv` in the template
//! check_cmd = "haproxy -c -f {{src}}"
//! reload_cmd = "kill -USR2 $(cat /run/haproxy.pid)"
//! mode = "0644"
//! owner = "haproxy:haproxy"
//! wait = { min = "2s", max = "10s" }
//! command_timeout = "30s"
//! backup = true
//! [template.vars]                    # free-form values, under `vars` in the template
//! bind = "0.0.0.0:80"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use catalog::ServiceName;
use catalog::model::{duration_str, opt_duration_str};
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, ResourceDefaults, Settings, line_of_offset};
use crate::engine::Template;

/// Debounce: render once the catalog has been quiet for `min`, but never later than `max`
/// after the first change of a burst (consul-template's `wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    #[serde(with = "duration_str")]
    pub min: Duration,
    /// Defaults to 4 × `min`, like consul-template.
    #[serde(default, with = "opt_duration_str")]
    pub max: Option<Duration>,
}

impl Wait {
    pub fn max(&self) -> Duration {
        self.max.unwrap_or(self.min * 4)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max() < self.min {
            return Err(format!(
                "max ({}) is shorter than min ({})",
                humantime::format_duration(self.max()),
                humantime::format_duration(self.min)
            ));
        }
        Ok(())
    }
}

/// Which services a resource reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceSelection {
    All,
    Named(Vec<ServiceName>),
}

/// File owner, resolved to ids when the resource is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// One validated template resource, its template compiled.
#[derive(Debug, Clone)]
pub struct Resource {
    /// The resource file's stem; the label of its metrics and logs.
    pub name: String,
    pub file: PathBuf,
    pub src: PathBuf,
    pub template: Arc<Template>,
    pub dest: PathBuf,
    pub services: ServiceSelection,
    /// Raw key prefixes, each ending in `/`.
    pub prefixes: Vec<String>,
    pub check_cmd: Option<String>,
    pub reload_cmd: Option<String>,
    pub mode: Option<u32>,
    pub owner: Option<Owner>,
    pub wait: Option<Wait>,
    pub command_timeout: Duration,
    pub backup: bool,
    pub vars: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    template: RawResource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    src: Spanned<String>,
    dest: Spanned<String>,
    #[serde(default)]
    services: Vec<Spanned<String>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    check_cmd: Option<String>,
    #[serde(default)]
    reload_cmd: Option<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    owner: Option<Spanned<String>>,
    #[serde(default)]
    wait: Option<Spanned<Wait>>,
    #[serde(default, with = "opt_duration_str")]
    command_timeout: Option<Duration>,
    #[serde(default)]
    backup: Option<bool>,
    #[serde(default)]
    vars: BTreeMap<String, toml::Value>,
}

/// Loads every `*.toml` of the settings' confdir, in name order. Either every resource is
/// valid, or the errors of every bad one are returned (and the caller keeps what it had).
pub fn load_resources(settings: &Settings) -> Result<Vec<Resource>, Vec<ConfigError>> {
    let dir = &settings.confdir;
    let entries = std::fs::read_dir(dir).map_err(|source| {
        vec![ConfigError::Read {
            path: dir.clone(),
            source,
        }]
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut resources: Vec<Resource> = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match load_resource(&file, settings) {
            Ok(r) => {
                if let Some(other) = resources.iter().find(|o| o.dest == r.dest) {
                    errors.push(ConfigError::Other(format!(
                        "{}: dest {} is also written by {}",
                        file.display(),
                        r.dest.display(),
                        other.file.display()
                    )));
                } else {
                    resources.push(r);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(errors)
    }
}

/// Loads and validates one resource file, compiling its template.
pub fn load_resource(file: &Path, settings: &Settings) -> Result<Resource, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_owned(),
        source,
    })?;
    parse_resource(file, &text, &settings.template_dir, &settings.defaults)
}

fn parse_resource(
    file: &Path,
    text: &str,
    template_dir: &Path,
    defaults: &ResourceDefaults,
) -> Result<Resource, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: file.to_owned(),
        message: e.to_string(),
    })?;
    let raw = raw.template;
    let invalid = |span: std::ops::Range<usize>, key: &str, message: String| ConfigError::Invalid {
        path: file.to_owned(),
        line: line_of_offset(text, span.start),
        key: format!("template.{key}"),
        message,
    };

    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let src = {
        let p = PathBuf::from(raw.src.get_ref());
        if p.is_absolute() {
            p
        } else {
            template_dir.join(p)
        }
    };
    let source = std::fs::read_to_string(&src)
        .map_err(|e| invalid(raw.src.span(), "src", format!("{}: {e}", src.display())))?;
    let template_name = src
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.clone());
    let template = Template::compile(&template_name, &source)
        .map_err(|e| invalid(raw.src.span(), "src", e.to_string()))?;

    let dest = PathBuf::from(raw.dest.get_ref());
    if !dest.is_absolute() {
        return Err(invalid(
            raw.dest.span(),
            "dest",
            "must be an absolute path".into(),
        ));
    }
    if dest.file_name().is_none() {
        return Err(invalid(raw.dest.span(), "dest", "must name a file".into()));
    }

    let services = if raw.services.iter().any(|s| s.get_ref() == "*") {
        ServiceSelection::All
    } else {
        let mut names = Vec::new();
        for s in &raw.services {
            let n = ServiceName::new(s.get_ref().as_str())
                .map_err(|e| invalid(s.span(), "services", e.to_string()))?;
            if !names.contains(&n) {
                names.push(n);
            }
        }
        ServiceSelection::Named(names)
    };

    let mut prefixes = Vec::new();
    for p in &raw.prefixes {
        let v = p.get_ref();
        if !v.starts_with('/') {
            return Err(invalid(
                p.span(),
                "prefixes",
                format!("{v:?} must start with '/'"),
            ));
        }
        // `/app` reads `/app/...`, never `/application` (confd's prefix rule).
        let v = if v.ends_with('/') {
            v.clone()
        } else {
            format!("{v}/")
        };
        prefixes.push(v);
    }

    let mode = match &raw.mode {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    invalid(
                        m.span(),
                        "mode",
                        format!("{:?} is not an octal file mode like \"0644\"", m.get_ref()),
                    )
                })?,
        ),
    };
    let owner = match &raw.owner {
        None => None,
        Some(o) => Some(
            resolve_owner(o.get_ref()).map_err(|message| invalid(o.span(), "owner", message))?,
        ),
    };
    let wait = match &raw.wait {
        None => defaults.wait,
        Some(w) => {
            w.get_ref()
                .validate()
                .map_err(|message| invalid(w.span(), "wait", message))?;
            Some(*w.get_ref())
        }
    };
    let vars = serde_json::to_value(&raw.vars).map_err(|e| ConfigError::Invalid {
        path: file.to_owned(),
        line: 1,
        key: "template.vars".into(),
        message: e.to_string(),
    })?;
    Ok(Resource {
        name,
        file: file.to_owned(),
        src,
        template: Arc::new(template),
        dest,
        services,
        prefixes,
        check_cmd: raw.check_cmd.filter(|c| !c.trim().is_empty()),
        reload_cmd: raw.reload_cmd.filter(|c| !c.trim().is_empty()),
        mode,
        owner,
        wait,
        command_timeout: raw.command_timeout.unwrap_or(defaults.command_timeout),
        backup: raw.backup.unwrap_or(defaults.backup),
        vars,
    })
}

/// `user`, `user:group`, `:group`, or numeric ids.
fn resolve_owner(spec: &str) -> Result<Owner, String> {
    use nix::unistd::{Group, User};
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let uid = match user {
        "" => None,
        u => Some(match u.parse::<u32>() {
            Ok(id) => id,
            Err(_) => User::from_name(u)
                .map_err(|e| format!("looking up user {u:?}: {e}"))?
                .ok_or_else(|| format!("no such user {u:?}"))?
                .uid
                .as_raw(),
        }),
    };
    let gid = match group {
        None | Some("") => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => Group::from_name(g)
                .map_err(|e| format!("looking up group {g:?}: {e}"))?
                .ok_or_else(|| format!("no such group {g:?}"))?
                .gid
                .as_raw(),
        }),
    };
    if uid.is_none() && gid.is_none() {
        return Err(format!("{spec:?} names neither a user nor a group"));
    }
    Ok(Owner { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Resource, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.tera"), "{{ vars.x }}").unwrap();
        parse_resource(
            Path::new("/c/conf.d/web.toml"),
            text,
            dir.path(),
            &ResourceDefaults::default(),
        )
    }

    #[test]
    fn full_resource() {
        let r = parse(
            r#"[template]
src = "t.tera"
dest = "/tmp/out.cfg"
services = ["web", "api", "web"]
prefixes = ["/app", "/other/"]
check_cmd = "true {{src}}"
reload_cmd = ""
mode = "0640"
owner = "0:0"
wait = { min = "2s" }
command_timeout = "5s"
backup = true
[template.vars]
x = 1
"#,
        )
        .unwrap();
        assert_eq!(r.name, "web");
        assert_eq!(
            r.services,
            ServiceSelection::Named(vec![
                ServiceName::new("web").unwrap(),
                ServiceName::new("api").unwrap()
            ])
        );
        assert_eq!(r.prefixes, vec!["/app/", "/other/"]);
        assert_eq!(r.mode, Some(0o640));
        assert_eq!(
            r.owner,
            Some(Owner {
                uid: Some(0),
                gid: Some(0)
            })
        );
        assert_eq!(r.wait.unwrap().max(), Duration::from_secs(8));
        assert_eq!(r.command_timeout, Duration::from_secs(5));
        assert!(r.reload_cmd.is_none() && r.backup);
        assert_eq!(r.vars["x"], 1);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases = [
            (
                "[template]\nsrc = \"t.tera\"\ndest = \"/x\"\nmode = \"rw\"\n",
                "/c/conf.d/web.toml:4: `template.mode`",
            ),
            (
                "[template]\nsrc = \"t.tera\"\ndest = \"/x\"\nservices = [\"ok\",\n \"Bad_Name\"]\n",
                "/c/conf.d/web.toml:5: `template.services`",
            ),
            (
                "[template]\nsrc = \"t.tera\"\ndest = \"rel/x\"\n",
                "/c/conf.d/web.toml:3: `template.dest`",
            ),
            (
                "[template]\nsrc = \"missing.tera\"\ndest = \"/x\"\n",
                "/c/conf.d/web.toml:2: `template.src`",
            ),
            (
                "[template]\nsrc = \"t.tera\"\ndest = \"/x\"\nwait = { min = \"5s\", max = \"1s\" }\n",
                "/c/conf.d/web.toml:4: `template.wait`",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
        let err = parse("[template]\nsrc = \"t.tera\"\ndest = \"/x\"\nreload = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("reload"), "{err}");
    }
}
