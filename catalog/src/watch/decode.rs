//! Turns raw etcd key/values into typed catalog entries.

use crate::keys::{Key, KeyError, Keyspace};
use crate::model::{Checker, Health, Instance, Node, ServiceConfig};
use crate::store::{KeyValue, Revision};

/// The typed value of a wharf key.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Instance(Instance),
    Health(Health),
    Config(ServiceConfig),
    Node(Node),
    Checker(Checker),
    /// `registrar rollout`'s state: any JSON object; only the registrar interprets it.
    Rollout(serde_json::Value),
}

/// One decoded key: what it is, what it holds, and the revisions etcd gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: Key,
    pub value: Value,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// Why a key/value pair was skipped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{key}: invalid JSON value: {source}")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key}: value names {field} {found:?}, but the key says {expected:?}")]
    Mismatch {
        key: String,
        field: &'static str,
        found: String,
        expected: String,
    },
}

/// Decodes one stored key/value. Never panics, whatever the bytes.
pub fn decode(keyspace: &Keyspace, kv: &KeyValue) -> Result<Entry, DecodeError> {
    let key = keyspace.parse(&kv.key)?;
    let raw = String::from_utf8_lossy(&kv.key);
    let json_err = |source| DecodeError::Json {
        key: raw.to_string(),
        source,
    };
    let value = match &key {
        Key::Instance(svc, id) => {
            let inst: Instance = serde_json::from_slice(&kv.value).map_err(json_err)?;
            // The key is the identity; a value that claims another one is not trusted.
            if &inst.service != svc {
                return Err(mismatch(
                    &raw,
                    "service",
                    inst.service.as_str(),
                    svc.as_str(),
                ));
            }
            if &inst.id != id {
                return Err(mismatch(&raw, "id", inst.id.as_str(), id.as_str()));
            }
            Value::Instance(inst)
        }
        Key::Health(..) => Value::Health(serde_json::from_slice(&kv.value).map_err(json_err)?),
        Key::Config(_) => Value::Config(serde_json::from_slice(&kv.value).map_err(json_err)?),
        Key::Node(_) => Value::Node(serde_json::from_slice(&kv.value).map_err(json_err)?),
        Key::Checker(_) => Value::Checker(serde_json::from_slice(&kv.value).map_err(json_err)?),
        Key::Rollout(_) => Value::Rollout(serde_json::from_slice(&kv.value).map_err(json_err)?),
    };
    Ok(Entry {
        key,
        value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
    })
}

fn mismatch(key: &str, field: &'static str, found: &str, expected: &str) -> DecodeError {
    DecodeError::Mismatch {
        key: key.to_owned(),
        field,
        found: found.to_owned(),
        expected: expected.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: 2,
            mod_revision: 3,
            lease: 0,
        }
    }

    const INSTANCE: &str = r#"{"id":"n1-web-0-80","service":"web","version":"v1","node":"n1","addr":"127.0.0.1","port":80}"#;

    /// A duration too long to add to an `Instant` (the balancer ramps `slow_start` from
    /// now; it panicked) is refused with the key, so the watcher skips and counts it.
    #[test]
    fn an_absurd_duration_is_refused() {
        let ks = Keyspace::default();
        let ok = kv("/wharf/v1/services/web/config", r#"{"slow_start":"30s"}"#);
        assert!(decode(&ks, &ok).is_ok());
        for bad in [
            r#"{"slow_start":"500000000years"}"#,
            r#"{"drain_timeout":"367days"}"#,
            r#"{"check":{"interval":"1000000years"}}"#,
        ] {
            let err = decode(&ks, &kv("/wharf/v1/services/web/config", bad)).unwrap_err();
            assert!(err.to_string().contains("longest duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn decodes_an_instance() {
        let ks = Keyspace::default();
        let e = decode(
            &ks,
            &kv("/wharf/v1/services/web/instances/n1-web-0-80", INSTANCE),
        )
        .unwrap();
        assert!(matches!(e.value, Value::Instance(ref i) if i.port == 80));
        assert_eq!(e.mod_revision, 3);
    }

    #[test]
    fn rejects_identity_mismatch_and_bad_json() {
        let ks = Keyspace::default();
        let other_id = "/wharf/v1/services/web/instances/n2-web-0-80";
        assert!(matches!(
            decode(&ks, &kv(other_id, INSTANCE)),
            Err(DecodeError::Mismatch { field: "id", .. })
        ));
        assert!(matches!(
            decode(&ks, &kv("/wharf/v1/services/web/config", "{not json")),
            Err(DecodeError::Json { .. })
        ));
        assert!(matches!(
            decode(&ks, &kv("/wharf/v1/junk", "{}")),
            Err(DecodeError::Key(_))
        ));
    }
}
