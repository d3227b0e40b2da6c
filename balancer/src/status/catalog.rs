//! What the status page knows about services and instances beyond the routing table:
//! every instance (not only routable ones) with its state and health mark, the split, and
//! the events that a change between two summaries means.
//!
//! Built by the discovery loop after every catalog update or reload (not per request).
//! A service whose records did not change (same fingerprint) keeps its previous summary
//! (`Arc`), so an update costs O(services + changed instances), not O(all instances).

use std::collections::BTreeMap;
use std::sync::Arc;

use catalog::{Algorithm, Protocol};

use crate::builder::{InstanceClass, TableBuilder, classify};
use crate::status::events::EventLog;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatalogSummary {
    /// Services by name.
    pub services: BTreeMap<String, Arc<ServiceSummary>>,
    /// Instance count, for the first-load event.
    pub instances: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSummary {
    /// Changes whenever a record of the service does (see [`fingerprint`]).
    pub fingerprint: (usize, usize, i64, i64, i64),
    /// `etcd` or `static` (lb.toml).
    pub source: &'static str,
    pub algorithm: Algorithm,
    /// Version → share; empty = every routable instance competes by weight.
    pub split: Vec<(String, u32)>,
    pub instances: BTreeMap<String, InstanceSummary>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSummary {
    pub version: String,
    pub node: Option<String>,
    pub addr: String,
    pub protocol: &'static str,
    pub weight: u32,
    pub class: InstanceClass,
    pub health: Option<HealthSummary>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthSummary {
    pub status: &'static str,
    pub since_ms: u64,
    pub checker: String,
    pub output: String,
}

/// Record counts and sums of `mod_revision`s: a put raises a sum (its revision is above
/// every existing one), a delete changes a count, and a delete plus puts that keep the
/// count raise the sum too. No allocation, one pass.
pub fn fingerprint(view: &catalog::ServiceView) -> (usize, usize, i64, i64, i64) {
    (
        view.instances.len(),
        view.health.len(),
        view.instances.values().map(|r| r.mod_revision).sum(),
        view.health.values().map(|r| r.mod_revision).sum(),
        view.config.as_ref().map_or(0, |c| c.mod_revision),
    )
}

/// The builder's current view: etcd services from the catalog, static ones from lb.toml
/// (a static service hides an etcd service of the same name, as in routing). Services of
/// `previous` whose fingerprint is unchanged are reused as they are.
pub fn summarize(builder: &TableBuilder, previous: &CatalogSummary) -> CatalogSummary {
    let mut out = CatalogSummary::default();
    for s in &builder.config().services {
        let mut instances = BTreeMap::new();
        for e in &s.endpoints {
            let addr = e.addr.get_ref().to_string();
            instances.insert(
                addr.clone(),
                InstanceSummary {
                    version: e.version.to_string(),
                    node: None,
                    addr,
                    protocol: "http",
                    weight: e.weight,
                    class: if e.weight > 0 {
                        InstanceClass::Routable
                    } else {
                        InstanceClass::Draining
                    },
                    health: None,
                },
            );
        }
        out.services.insert(
            s.name.get_ref().to_string(),
            Arc::new(ServiceSummary {
                fingerprint: (0, 0, 0, 0, 0),
                source: "static",
                algorithm: s.algorithm,
                split: s.split.iter().map(|(v, n)| (v.to_string(), *n)).collect(),
                instances,
            }),
        );
    }
    for (name, view) in &builder.catalog().services {
        if out.services.contains_key(name.as_str()) {
            continue;
        }
        let fp = fingerprint(view);
        if let Some(prev) = previous.services.get(name.as_str())
            && prev.source == "etcd"
            && prev.fingerprint == fp
        {
            out.services.insert(name.to_string(), prev.clone());
            continue;
        }
        let config = view.config.as_ref().map(|c| &c.value);
        let mut instances = BTreeMap::new();
        for (id, rec) in &view.instances {
            let Some(class) = classify(view, id) else {
                continue;
            };
            let i = &rec.value;
            let health = view.health.get(id).map(|h| HealthSummary {
                status: match h.value.status {
                    catalog::HealthStatus::Passing => "passing",
                    catalog::HealthStatus::Critical => "critical",
                },
                since_ms: h.value.since,
                checker: h.value.checker.to_string(),
                output: h.value.output.clone(),
            });
            instances.insert(
                id.to_string(),
                InstanceSummary {
                    version: i.version.to_string(),
                    node: Some(i.node.to_string()),
                    addr: i.socket_addr().to_string(),
                    protocol: match i.protocol {
                        Protocol::Http => "http",
                        Protocol::Tcp => "tcp",
                    },
                    weight: i.weight,
                    class,
                    health,
                },
            );
        }
        out.services.insert(
            name.to_string(),
            Arc::new(ServiceSummary {
                fingerprint: fp,
                source: "etcd",
                algorithm: config.map(|c| c.algorithm).unwrap_or_default(),
                split: config
                    .map(|c| c.split.iter().map(|(v, n)| (v.to_string(), *n)).collect())
                    .unwrap_or_default(),
                instances,
            }),
        );
    }
    out.instances = out.services.values().map(|s| s.instances.len()).sum();
    out
}

/// The state the page shows for a class (before the sampler overlays `ejected`).
pub fn state_name(class: InstanceClass) -> &'static str {
    match class {
        InstanceClass::Routable => "serving",
        InstanceClass::Draining => "draining",
        InstanceClass::Critical => "critical",
        InstanceClass::Pending => "pending",
    }
}

/// Logs what changed from `old` to `new`.
pub fn diff_events(old: &CatalogSummary, new: &CatalogSummary, log: &EventLog) {
    for (name, svc) in &new.services {
        let before = old.services.get(name);
        if before.is_some_and(|b| Arc::ptr_eq(b, svc)) {
            continue; // reused: nothing changed
        }
        if before.is_none() {
            log.push(
                "added",
                Some(name),
                None,
                format!("service {name} appeared ({})", svc.source),
            );
        }
        if let Some(b) = before
            && b.split != svc.split
        {
            log.push(
                "split",
                Some(name),
                None,
                format!(
                    "split of {name}: {} → {}",
                    split_text(&b.split),
                    split_text(&svc.split)
                ),
            );
        }
        for (id, inst) in &svc.instances {
            match before.and_then(|b| b.instances.get(id)) {
                None => log.push(
                    "added",
                    Some(name),
                    Some(id),
                    format!(
                        "{name}/{id} added: version {} at {}, {}",
                        inst.version,
                        inst.addr,
                        state_name(inst.class)
                    ),
                ),
                Some(prev) => {
                    if prev.class != inst.class {
                        let (kind, why) = match inst.class {
                            InstanceClass::Draining => ("drained", "draining (no new requests)"),
                            InstanceClass::Critical => ("evicted", "critical (out of rotation)"),
                            InstanceClass::Routable => ("serving", "serving"),
                            InstanceClass::Pending => ("pending", "pending (awaiting health)"),
                        };
                        let detail = match &inst.health {
                            Some(h)
                                if inst.class == InstanceClass::Critical
                                    && !h.output.is_empty() =>
                            {
                                format!(": {}", h.output)
                            }
                            _ => String::new(),
                        };
                        log.push(
                            kind,
                            Some(name),
                            Some(id),
                            format!("{name}/{id} {} → {why}{detail}", state_name(prev.class)),
                        );
                    } else if prev.weight != inst.weight {
                        log.push(
                            "weight",
                            Some(name),
                            Some(id),
                            format!("{name}/{id} weight {} → {}", prev.weight, inst.weight),
                        );
                    }
                }
            }
        }
        if let Some(b) = before {
            for id in b
                .instances
                .keys()
                .filter(|id| !svc.instances.contains_key(*id))
            {
                log.push(
                    "removed",
                    Some(name),
                    Some(id),
                    format!("{name}/{id} removed"),
                );
            }
        }
    }
    for name in old
        .services
        .keys()
        .filter(|n| !new.services.contains_key(*n))
    {
        log.push(
            "removed",
            Some(name),
            None,
            format!("service {name} is gone"),
        );
    }
}

fn split_text(split: &[(String, u32)]) -> String {
    if split.is_empty() {
        return "by weight".into();
    }
    split
        .iter()
        .map(|(v, n)| format!("{v}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(class: InstanceClass) -> InstanceSummary {
        InstanceSummary {
            version: "v1".into(),
            node: Some("n1".into()),
            addr: "127.0.0.1:1".into(),
            protocol: "http",
            weight: 100,
            class,
            health: None,
        }
    }

    fn summary(instances: &[(&str, InstanceClass)]) -> CatalogSummary {
        let mut s = CatalogSummary::default();
        s.services.insert(
            "web".into(),
            Arc::new(ServiceSummary {
                fingerprint: (0, 0, 0, 0, 0),
                source: "etcd",
                algorithm: Algorithm::P2c,
                split: vec![],
                instances: instances
                    .iter()
                    .map(|(id, c)| (id.to_string(), inst(*c)))
                    .collect(),
            }),
        );
        s
    }

    #[test]
    fn unchanged_services_are_reused_and_changes_are_seen() {
        use catalog::store::KeyValue;
        let ks = catalog::Keyspace::default();
        let put = |key: String, value: serde_json::Value, rev: i64| {
            let kv = KeyValue {
                key: key.into_bytes(),
                value: value.to_string().into_bytes(),
                create_revision: rev,
                mod_revision: rev,
                lease: 0,
            };
            catalog::Diff::Put(catalog::watch::decode(&ks, &kv).expect("valid entry"))
        };
        let inst = |svc: &str, id: &str, rev: i64| {
            put(
                ks.instance(&svc.parse().unwrap(), &id.parse().unwrap()),
                serde_json::json!({"id": id, "service": svc, "version": "v1", "node": "n1",
                    "addr": "127.0.0.1", "port": 80}),
                rev,
            )
        };
        let config = crate::config::LbConfig::parse("", "test").expect("empty config");
        let mut b = TableBuilder::new(
            std::sync::Arc::new(config),
            std::sync::Arc::new(crate::metrics::Metrics::new()),
        );
        b.apply(catalog::Update {
            revision: 3,
            diffs: vec![inst("web", "n1-a-80", 2), inst("api", "n1-b-80", 3)],
        });
        let first = summarize(&b, &CatalogSummary::default());
        assert_eq!(first.instances, 2);
        b.apply(catalog::Update {
            revision: 4,
            diffs: vec![put(
                ks.health(&"web".parse().unwrap(), &"n1-a-80".parse().unwrap()),
                serde_json::json!({"status": "passing", "since": 0, "checker": "c",
                    "observed_mod_rev": 2}),
                4,
            )],
        });
        let second = summarize(&b, &first);
        assert!(Arc::ptr_eq(&first.services["api"], &second.services["api"]));
        assert!(!Arc::ptr_eq(
            &first.services["web"],
            &second.services["web"]
        ));
        assert_eq!(
            second.services["web"].instances["n1-a-80"].class,
            InstanceClass::Routable
        );
        let log = EventLog::default();
        diff_events(&first, &second, &log);
        let kinds: Vec<&str> = log.recent().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec!["serving"]);
    }

    #[test]
    fn transitions_become_events() {
        let log = EventLog::default();
        let a = summary(&[
            ("a", InstanceClass::Pending),
            ("b", InstanceClass::Routable),
        ]);
        let b = summary(&[
            ("a", InstanceClass::Routable),
            ("c", InstanceClass::Pending),
        ]);
        diff_events(&a, &b, &log);
        let c = summary(&[
            ("a", InstanceClass::Draining),
            ("c", InstanceClass::Critical),
        ]);
        diff_events(&b, &c, &log);
        let kinds: Vec<(&str, Option<String>)> = log
            .recent()
            .iter()
            .rev()
            .map(|e| (e.kind, e.instance.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("serving", Some("a".into())),
                ("added", Some("c".into())),
                ("removed", Some("b".into())),
                ("drained", Some("a".into())),
                ("evicted", Some("c".into())),
            ]
        );
    }
}
