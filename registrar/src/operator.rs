//! Operator commands that write a service's `ServiceConfig` (no lease; the operator is its
//! only writer): read-modify-write guarded by the key's `mod_revision`, so two operators
//! never silently overwrite each other's change.

use std::collections::BTreeMap;

use catalog::store::{Compare, Op};
use catalog::{Keyspace, ServiceConfig, ServiceName, Store, StoreError, Version};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("etcd: {0}")]
    Store(#[from] StoreError),
    #[error("existing config at {key} is malformed ({reason}); fix or delete it first")]
    Malformed { key: String, reason: String },
    #[error("config at {0} kept changing; try again")]
    Contended(String),
    #[error("{0}")]
    Invalid(String),
}

/// Applies `change` to the service's config (the defaults when absent) and writes it back
/// if nobody wrote in between; retries a few times. Returns the written config.
pub async fn update_config<S: Store>(
    store: &S,
    keys: &Keyspace,
    service: &ServiceName,
    change: impl Fn(&mut ServiceConfig),
) -> Result<ServiceConfig, OperatorError> {
    let key = keys.config(service);
    for _ in 0..10 {
        let (mut config, rev) = match store.get(&key).await? {
            Some(kv) => (
                serde_json::from_slice::<ServiceConfig>(&kv.value).map_err(|e| {
                    OperatorError::Malformed {
                        key: key.clone(),
                        reason: e.to_string(),
                    }
                })?,
                kv.mod_revision,
            ),
            None => (ServiceConfig::default(), 0),
        };
        change(&mut config);
        let value = serde_json::to_vec(&config).expect("config serializes");
        let applied = store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![Op::Put {
                    key: key.clone(),
                    value,
                    lease: None,
                }],
            )
            .await?;
        if applied {
            return Ok(config);
        }
    }
    Err(OperatorError::Contended(key))
}

/// Parses `v1=90 v2=10` into a split. Shares are relative; at least one must be positive.
pub fn parse_split(items: &[String]) -> Result<BTreeMap<Version, u32>, OperatorError> {
    let mut split = BTreeMap::new();
    for item in items {
        let (v, w) = item
            .split_once('=')
            .ok_or_else(|| OperatorError::Invalid(format!("{item:?}: expected VERSION=SHARE")))?;
        let version =
            Version::new(v).map_err(|e| OperatorError::Invalid(format!("{item:?}: {e}")))?;
        let share: u32 = w.parse().map_err(|_| {
            OperatorError::Invalid(format!("{item:?}: share must be a whole number"))
        })?;
        if split.insert(version, share).is_some() {
            return Err(OperatorError::Invalid(format!("version {v} given twice")));
        }
    }
    if split.is_empty() || split.values().all(|w| *w == 0) {
        return Err(OperatorError::Invalid(
            "a split needs at least one version with a share above 0".into(),
        ));
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::store::MemStore;

    #[test]
    fn split_parsing() {
        let s = parse_split(&["v1=90".into(), "v2=10".into()]).unwrap();
        assert_eq!(s[&Version::new("v1").unwrap()], 90);
        for bad in [
            vec!["v1"],
            vec!["v1=x"],
            vec!["V1=1"],
            vec!["v1=0"],
            vec!["v1=1", "v1=2"],
        ] {
            let items: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(parse_split(&items).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn read_modify_write_keeps_other_fields() {
        let store = MemStore::new();
        let keys = Keyspace::default();
        let web = ServiceName::new("web").unwrap();
        update_config(&store, &keys, &web, |c| {
            c.check.path = Some("/healthz".into())
        })
        .await
        .unwrap();
        let c = update_config(&store, &keys, &web, |c| {
            c.split = parse_split(&["v2=100".into()]).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(c.check.path.as_deref(), Some("/healthz"));
        store
            .put(&keys.config(&web), b"{bad".to_vec(), None)
            .await
            .unwrap();
        let err = update_config(&store, &keys, &web, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, OperatorError::Malformed { .. }), "{err}");
    }
}
