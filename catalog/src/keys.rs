//! The only code that builds or parses etcd keys.
//!
//! Layout under the prefix (default `/wharf/v1`), see DESIGN.md:
//!
//! ```text
//! <prefix>/nodes/<node>
//! <prefix>/services/<svc>/instances/<id>
//! <prefix>/services/<svc>/health/<id>
//! <prefix>/services/<svc>/config
//! <prefix>/services/<svc>/rollout
//! <prefix>/checkers/<id>
//! ```
//!
//! Every segment is a validated DNS label, so `parse(build(x)) == x` for every key (a
//! property test checks it) and no user input can produce a key outside its directory.

use std::fmt;

use crate::defaults;
use crate::names::{CheckerId, InstanceId, NameError, NodeName, ServiceName};

/// A parsed wharf key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Node(NodeName),
    Instance(ServiceName, InstanceId),
    Health(ServiceName, InstanceId),
    Config(ServiceName),
    /// The state of the service's current or last rollout (written by the operator CLI,
    /// `registrar rollout`; opaque JSON to every other part).
    Rollout(ServiceName),
    Checker(CheckerId),
}

impl Key {
    /// The service this key belongs to, if any.
    pub fn service(&self) -> Option<&ServiceName> {
        match self {
            Key::Instance(s, _) | Key::Health(s, _) | Key::Config(s) | Key::Rollout(s) => Some(s),
            Key::Node(_) | Key::Checker(_) => None,
        }
    }
}

/// Why a key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not UTF-8")]
    NotUtf8,
    #[error("key {0:?} is outside prefix {1:?}")]
    OutsidePrefix(String, String),
    #[error("key {0:?} does not match the wharf layout")]
    UnknownLayout(String),
    #[error("key {key:?}: {source}")]
    BadName {
        key: String,
        #[source]
        source: NameError,
    },
    #[error(
        "prefix {0:?} must start with '/', not end with '/', and have no empty or blank segments"
    )]
    BadPrefix(String),
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    prefix: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self {
            prefix: defaults::PREFIX.to_owned(),
        }
    }
}

impl fmt::Display for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

impl Keyspace {
    /// A keyspace under `prefix`, e.g. `/wharf/v1`.
    pub fn new(prefix: &str) -> Result<Self, KeyError> {
        let valid = prefix.starts_with('/')
            && !prefix.ends_with('/')
            && prefix[1..]
                .split('/')
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()));
        if !valid {
            return Err(KeyError::BadPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/`: every wharf key.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `<prefix>/services/`: instances, health marks and configs of every service.
    pub fn services(&self) -> String {
        format!("{}/services/", self.prefix)
    }

    /// `<prefix>/services/<svc>/`: everything about one service.
    pub fn service(&self, svc: &ServiceName) -> String {
        format!("{}/services/{svc}/", self.prefix)
    }

    /// `<prefix>/nodes/`.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `<prefix>/checkers/`.
    pub fn checkers(&self) -> String {
        format!("{}/checkers/", self.prefix)
    }

    pub fn node(&self, node: &NodeName) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    pub fn instance(&self, svc: &ServiceName, id: &InstanceId) -> String {
        format!("{}/services/{svc}/instances/{id}", self.prefix)
    }

    pub fn health(&self, svc: &ServiceName, id: &InstanceId) -> String {
        format!("{}/services/{svc}/health/{id}", self.prefix)
    }

    pub fn config(&self, svc: &ServiceName) -> String {
        format!("{}/services/{svc}/config", self.prefix)
    }

    pub fn rollout(&self, svc: &ServiceName) -> String {
        format!("{}/services/{svc}/rollout", self.prefix)
    }

    pub fn checker(&self, id: &CheckerId) -> String {
        format!("{}/checkers/{id}", self.prefix)
    }

    /// The string form of a parsed key.
    pub fn build(&self, key: &Key) -> String {
        match key {
            Key::Node(n) => self.node(n),
            Key::Instance(s, i) => self.instance(s, i),
            Key::Health(s, i) => self.health(s, i),
            Key::Config(s) => self.config(s),
            Key::Rollout(s) => self.rollout(s),
            Key::Checker(c) => self.checker(c),
        }
    }

    /// Parses a raw etcd key of this keyspace.
    pub fn parse(&self, raw: &[u8]) -> Result<Key, KeyError> {
        let key = std::str::from_utf8(raw).map_err(|_| KeyError::NotUtf8)?;
        let rest = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| KeyError::OutsidePrefix(key.to_owned(), self.prefix.clone()))?;
        let bad_name = |source| KeyError::BadName {
            key: key.to_owned(),
            source,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["nodes", n] => Ok(Key::Node(NodeName::new(*n).map_err(bad_name)?)),
            ["checkers", c] => Ok(Key::Checker(CheckerId::new(*c).map_err(bad_name)?)),
            ["services", s, "config"] => Ok(Key::Config(ServiceName::new(*s).map_err(bad_name)?)),
            ["services", s, "rollout"] => Ok(Key::Rollout(ServiceName::new(*s).map_err(bad_name)?)),
            ["services", s, kind @ ("instances" | "health"), i] => {
                let s = ServiceName::new(*s).map_err(bad_name)?;
                let i = InstanceId::new(*i).map_err(bad_name)?;
                Ok(if *kind == "instances" {
                    Key::Instance(s, i)
                } else {
                    Key::Health(s, i)
                })
            }
            _ => Err(KeyError::UnknownLayout(key.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
    }

    fn key() -> impl Strategy<Value = Key> {
        prop_oneof![
            label().prop_map(|n| Key::Node(NodeName::new(n).unwrap())),
            label().prop_map(|c| Key::Checker(CheckerId::new(c).unwrap())),
            label().prop_map(|s| Key::Config(ServiceName::new(s).unwrap())),
            label().prop_map(|s| Key::Rollout(ServiceName::new(s).unwrap())),
            (label(), label()).prop_map(|(s, i)| Key::Instance(
                ServiceName::new(s).unwrap(),
                InstanceId::new(i).unwrap()
            )),
            (label(), label()).prop_map(|(s, i)| Key::Health(
                ServiceName::new(s).unwrap(),
                InstanceId::new(i).unwrap()
            )),
        ]
    }

    fn prefix() -> impl Strategy<Value = String> {
        prop::collection::vec("[A-Za-z0-9_.-]{1,8}", 1..4).prop_map(|v| format!("/{}", v.join("/")))
    }

    proptest! {
        #[test]
        fn build_then_parse_is_identity(k in key(), p in prefix()) {
            let ks = Keyspace::new(&p).unwrap();
            let raw = ks.build(&k);
            prop_assert_eq!(ks.parse(raw.as_bytes()).unwrap(), k);
        }

        #[test]
        fn parse_then_build_is_identity(raw in "[a-z0-9/-]{0,40}") {
            let ks = Keyspace::default();
            let full = format!("/wharf/v1/{raw}");
            if let Ok(k) = ks.parse(full.as_bytes()) {
                prop_assert_eq!(ks.build(&k), full);
            }
        }

        #[test]
        fn parse_never_panics(raw in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = Keyspace::default().parse(&raw);
        }
    }

    #[test]
    fn examples() {
        let ks = Keyspace::default();
        let s = ServiceName::new("web").unwrap();
        let i = InstanceId::new("n1-web-0-8080").unwrap();
        assert_eq!(
            ks.instance(&s, &i),
            "/wharf/v1/services/web/instances/n1-web-0-8080"
        );
        assert_eq!(
            ks.health(&s, &i),
            "/wharf/v1/services/web/health/n1-web-0-8080"
        );
        assert_eq!(ks.config(&s), "/wharf/v1/services/web/config");
        assert_eq!(ks.rollout(&s), "/wharf/v1/services/web/rollout");
        assert!(ks.instance(&s, &i).starts_with(&ks.service(&s)));
        assert!(ks.service(&s).starts_with(&ks.services()));
    }

    #[test]
    fn rejects_foreign_and_malformed_keys() {
        let ks = Keyspace::default();
        for bad in [
            "/other/v1/nodes/a",
            "/wharf/v1",
            "/wharf/v1/",
            "/wharf/v1x/nodes/a",
            "/wharf/v1/nodes/A",
            "/wharf/v1/nodes/a/b",
            "/wharf/v1/services/web/instances",
            "/wharf/v1/services/web/other/x",
            "/wharf/v1/services/web/config/x",
        ] {
            assert!(ks.parse(bad.as_bytes()).is_err(), "{bad} parsed");
        }
        assert_eq!(ks.parse(&[0xff, 0xfe]), Err(KeyError::NotUtf8));
    }

    #[test]
    fn prefix_validation() {
        for ok in ["/wharf/v1", "/a", "/x/y_z/1.0"] {
            Keyspace::new(ok).unwrap();
        }
        for bad in ["", "/", "wharf", "/wharf/", "//a", "/a b"] {
            assert!(Keyspace::new(bad).is_err(), "{bad:?}");
        }
    }
}
