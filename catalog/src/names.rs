//! Validated names: everything that becomes a segment of an etcd key.
//!
//! A name that reaches a key must be a DNS label (`[a-z0-9-]{1,63}`, no leading or trailing
//! `-`). Validating at the edge means the key builder can never produce a key the parser
//! would reject, and a `/` in user input can never escape its directory in etcd.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than 63 characters")]
    TooLong { kind: &'static str, value: String },
    #[error(
        "{kind} {value:?} contains {bad:?}; only lowercase letters, digits and '-' are allowed"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        bad: char,
    },
    #[error("{kind} {value:?} must not start or end with '-'")]
    EdgeHyphen { kind: &'static str, value: String },
}

/// Checks that `value` is a DNS label (RFC 1123, lowercase).
pub fn validate_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if value.len() > 63 {
        return Err(NameError::TooLong {
            kind,
            value: value.to_owned(),
        });
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadChar {
            kind,
            value: value.to_owned(),
            bad,
        });
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(NameError::EdgeHyphen {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Declares a string newtype that can only hold a DNS label.
macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate_label($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A service name, e.g. `web`.
    ServiceName,
    "service name"
);
label_type!(
    /// An instance id, conventionally `<node>-<container>-<port>`.
    InstanceId,
    "instance id"
);
label_type!(
    /// A node (host agent) name.
    NodeName,
    "node name"
);
label_type!(
    /// A health checker replica id.
    CheckerId,
    "checker id"
);
label_type!(
    /// A release version of a service, e.g. `v1`; the unit of a canary split.
    Version,
    "version"
);

impl InstanceId {
    /// The conventional id of a container's port: `<node>-<container>-<port>`.
    pub fn for_container(node: &NodeName, container: &str, port: u16) -> Result<Self, NameError> {
        Self::new(format!("{node}-{container}-{port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web", "web-1", "0", "a".repeat(63).as_str()] {
            ServiceName::new(ok).unwrap();
        }
    }

    #[test]
    fn rejects_non_labels() {
        for bad in [
            "",
            "Web",
            "a/b",
            "-a",
            "a-",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(ServiceName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<ServiceName>("\"web\"").is_ok());
        let err = serde_json::from_str::<ServiceName>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("only lowercase"), "{err}");
    }

    #[test]
    fn container_id_convention() {
        let node = NodeName::new("node1").unwrap();
        let id = InstanceId::for_container(&node, "web-0", 8080).unwrap();
        assert_eq!(id.as_str(), "node1-web-0-8080");
    }
}
