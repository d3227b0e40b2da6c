//! What the status page knows about services and instances beyond the routing table:
//! every instance (not only routable ones) with its state and health mark, the split, and
//! the events that a change between two summaries means.
//!
//! Built by the discovery loop after every catalog update or reload (not per request).

use std::collections::BTreeMap;

use catalog::{Algorithm, Protocol};

use crate::builder::{InstanceClass, TableBuilder, classify};
use crate::status::events::EventLog;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CatalogSummary {
    /// Services by name.
    pub services: BTreeMap<String, ServiceSummary>,
    /// Instance count, for the first-load event.
    pub instances: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSummary {
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

/// The builder's current view: etcd services from the catalog, static ones from lb.toml
/// (a static service hides an etcd service of the same name, as in routing).
pub fn summarize(builder: &TableBuilder) -> CatalogSummary {
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
            ServiceSummary {
                source: "static",
                algorithm: s.algorithm,
                split: s.split.iter().map(|(v, n)| (v.to_string(), *n)).collect(),
                instances,
            },
        );
    }
    for (name, view) in &builder.catalog().services {
        if out.services.contains_key(name.as_str()) {
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
            ServiceSummary {
                source: "etcd",
                algorithm: config.map(|c| c.algorithm).unwrap_or_default(),
                split: config
                    .map(|c| c.split.iter().map(|(v, n)| (v.to_string(), *n)).collect())
                    .unwrap_or_default(),
                instances,
            },
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
            ServiceSummary {
                source: "etcd",
                algorithm: Algorithm::P2c,
                split: vec![],
                instances: instances
                    .iter()
                    .map(|(id, c)| (id.to_string(), inst(*c)))
                    .collect(),
            },
        );
        s
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
