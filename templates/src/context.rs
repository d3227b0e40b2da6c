//! The data a template sees, built from one consistent etcd listing (one revision).
//!
//! ```text
//! revision        etcd revision the whole context is taken at
//! resource        the resource's name
//! checkers_alive  health checker replicas present in etcd
//! services.<svc>  every requested service, present even when it has no instance:
//!   name, panic, split {version: percent}, config (the service config JSON or null)
//!   instances     the instances to route to, by id: serving + health passing, or in panic
//!                 mode (no checker alive, or none passing) every serving one
//!   all           every registered instance, with its state and health
//!   versions      [{name, split (null when unlisted), share, instances}]
//! kv              {full key: value} of the raw keys under the resource's `prefixes`
//! vars            the resource's [template.vars]
//! ```
//!
//! An instance: `id service version node addr port address protocol weight state health
//! (passing|critical|pending) routable lb_weight share tags attrs`. `lb_weight` (0..=256) is the
//! split-aware proxy weight (see [`crate::weights`]); `share` its fraction of new requests.

use std::collections::BTreeMap;

use catalog::store::{KeyValue, Listing, Revision};
use catalog::view::ServiceView;
use catalog::{
    CatalogView, Diff, HealthStatus, Instance, InstanceState, Keyspace, Snapshot, Update,
    watch::decode,
};
use serde_json::{Value, json};
use tracing::warn;

use crate::config::{Resource, ServiceSelection};
use crate::weights;

/// One listing, decoded.
#[derive(Debug, Default)]
pub struct CatalogData {
    pub revision: Revision,
    pub view: CatalogView,
    /// Every listed key with its value, for the raw `kv` map.
    pub raw: BTreeMap<String, String>,
    /// Wharf keys that could not be decoded (skipped with a warning).
    pub malformed: usize,
}

impl CatalogData {
    pub fn from_listing(listing: Listing, keyspace: &Keyspace) -> Self {
        let services = keyspace.services();
        let checkers = keyspace.checkers();
        let mut entries = Vec::new();
        let mut raw = BTreeMap::new();
        let mut malformed = 0;
        for kv in dedup(listing.kvs) {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if key.starts_with(&services) || key.starts_with(&checkers) {
                match decode(keyspace, &kv) {
                    Ok(e) => entries.push(e),
                    Err(e) => {
                        warn!(error = %e, "skipping malformed catalog entry");
                        malformed += 1;
                    }
                }
            }
            raw.insert(key, String::from_utf8_lossy(&kv.value).into_owned());
        }
        let mut view = CatalogView::default();
        view.apply(Update {
            revision: listing.revision,
            diffs: vec![Diff::Reset(Snapshot {
                revision: listing.revision,
                entries,
            })],
        });
        Self {
            revision: listing.revision,
            view,
            raw,
            malformed,
        }
    }
}

/// Overlapping prefixes list a key twice.
fn dedup(kvs: Vec<KeyValue>) -> impl Iterator<Item = KeyValue> {
    let mut by_key = BTreeMap::new();
    for kv in kvs {
        by_key.insert(kv.key.clone(), kv);
    }
    by_key.into_values()
}

/// The etcd prefixes a resource's context needs, read together in one listing.
pub fn prefixes_for(resource: &Resource, keyspace: &Keyspace) -> Vec<String> {
    let mut out = match &resource.services {
        ServiceSelection::All => vec![keyspace.services()],
        ServiceSelection::Named(names) => names.iter().map(|s| keyspace.service(s)).collect(),
    };
    // Panic mode depends on whether any checker is alive.
    out.push(keyspace.checkers());
    out.extend(resource.prefixes.iter().cloned());
    out
}

/// The template context of `resource`.
pub fn build(data: &CatalogData, resource: &Resource) -> Value {
    let empty = ServiceView::default();
    let checkers_alive = data.view.checkers.len();
    let names: Vec<String> = match &resource.services {
        ServiceSelection::All => data.view.services.keys().map(|s| s.to_string()).collect(),
        ServiceSelection::Named(n) => n.iter().map(|s| s.to_string()).collect(),
    };
    let mut services = serde_json::Map::new();
    for name in names {
        let view = data
            .view
            .services
            .iter()
            .find(|(s, _)| s.as_str() == name)
            .map_or(&empty, |(_, v)| v);
        services.insert(name.clone(), service(&name, view, checkers_alive));
    }
    let kv: BTreeMap<&String, &String> = data
        .raw
        .iter()
        .filter(|(k, _)| resource.prefixes.iter().any(|p| k.starts_with(p)))
        .collect();
    json!({
        "revision": data.revision,
        "resource": resource.name,
        "checkers_alive": checkers_alive,
        "services": services,
        "kv": kv,
        "vars": resource.vars,
    })
}

fn health_of(view: &ServiceView, inst: &catalog::Record<Instance>) -> &'static str {
    match view.health.get(&inst.value.id) {
        // A mark about an older registration of this id says nothing about this one.
        Some(h) if h.value.observed_mod_rev >= inst.create_revision => match h.value.status {
            HealthStatus::Passing => "passing",
            HealthStatus::Critical => "critical",
        },
        _ => "pending",
    }
}

fn service(name: &str, view: &ServiceView, checkers_alive: usize) -> Value {
    let all: Vec<(&Instance, &'static str)> = view
        .instances
        .values()
        .map(|r| (&r.value, health_of(view, r)))
        .collect();
    let serving = |i: &Instance| i.state == InstanceState::Serving;
    let routable: Vec<bool> = all
        .iter()
        .map(|(i, h)| serving(i) && *h == "passing")
        .collect();
    let any_routable = routable.iter().any(|r| *r);
    let any_serving = all.iter().any(|(i, _)| serving(i));
    // DESIGN.md panic mode: route to every serving instance rather than to none.
    let panic = any_serving && (checkers_alive == 0 || !any_routable);
    let routed: Vec<usize> = (0..all.len())
        .filter(|&k| {
            if panic {
                serving(all[k].0)
            } else {
                routable[k]
            }
        })
        .collect();

    let split: BTreeMap<String, u32> = view
        .config
        .as_ref()
        .map(|c| {
            c.value
                .split
                .iter()
                .map(|(v, s)| (v.to_string(), *s))
                .collect()
        })
        .unwrap_or_default();
    let members: Vec<(&str, u32)> = routed
        .iter()
        .map(|&k| (all[k].0.version.as_str(), all[k].0.weight))
        .collect();
    let shares = weights::shares(&members, &split);
    let raw: Vec<u32> = members.iter().map(|(_, w)| *w).collect();
    let lb = weights::proxy_weights(&shares, &raw, !split.is_empty());

    let mut share_of = vec![0.0; all.len()];
    let mut lb_of = vec![0u32; all.len()];
    for (n, &k) in routed.iter().enumerate() {
        share_of[k] = shares[n];
        lb_of[k] = lb[n];
    }
    let inst_json: Vec<Value> = all
        .iter()
        .enumerate()
        .map(|(k, (i, h))| instance(i, h, routable[k], lb_of[k], share_of[k]))
        .collect();
    let instances: Vec<Value> = routed.iter().map(|&k| inst_json[k].clone()).collect();

    let mut version_names: Vec<String> = split.keys().cloned().collect();
    for &k in &routed {
        let v = all[k].0.version.to_string();
        if !version_names.contains(&v) {
            version_names.push(v);
        }
    }
    version_names.sort();
    let versions: Vec<Value> = version_names
        .iter()
        .map(|v| {
            let members: Vec<usize> = routed
                .iter()
                .copied()
                .filter(|&k| all[k].0.version.as_str() == v)
                .collect();
            json!({
                "name": v,
                "split": split.get(v),
                "share": members.iter().map(|&k| share_of[k]).sum::<f64>(),
                "instances": members.iter().map(|&k| inst_json[k].clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "name": name,
        "panic": panic,
        "split": split,
        "config": view.config.as_ref().map(|c| serde_json::to_value(&c.value).unwrap_or(Value::Null)),
        "instances": instances,
        "all": inst_json,
        "versions": versions,
    })
}

fn instance(i: &Instance, health: &str, routable: bool, lb_weight: u32, share: f64) -> Value {
    json!({
        "id": i.id.as_str(),
        "service": i.service.as_str(),
        "version": i.version.as_str(),
        "node": i.node.as_str(),
        "addr": i.addr.to_string(),
        "port": i.port,
        "address": i.socket_addr().to_string(),
        "protocol": i.protocol,
        "weight": i.weight,
        "state": i.state,
        "health": health,
        "routable": routable,
        "lb_weight": lb_weight,
        "share": share,
        "tags": i.tags,
        "attrs": i.attrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceSelection;
    use crate::engine::Template;
    use catalog::{Checker, Health, ServiceConfig};
    use std::sync::Arc;

    struct Kvs(Vec<KeyValue>, i64);
    impl Kvs {
        fn put(&mut self, key: String, value: impl serde::Serialize) -> i64 {
            self.1 += 1;
            self.0.push(KeyValue {
                key: key.into_bytes(),
                value: serde_json::to_vec(&value).unwrap(),
                create_revision: self.1,
                mod_revision: self.1,
                lease: 0,
            });
            self.1
        }
    }

    fn inst(id: &str, version: &str, port: u16, state: &str) -> Value {
        json!({"id": id, "service": "web", "version": version, "node": "n1",
               "addr": "127.0.0.1", "port": port, "state": state})
    }

    fn health(status: &str, rev: i64) -> Health {
        serde_json::from_value(json!({"status": status, "since": 1, "checker": "c1",
                                       "observed_mod_rev": rev}))
        .unwrap()
    }

    fn resource(services: ServiceSelection, prefixes: Vec<String>) -> Resource {
        Resource {
            name: "r".into(),
            file: "/r.toml".into(),
            src: "/t".into(),
            template: Arc::new(Template::compile("t", "").unwrap()),
            dest: "/tmp/x".into(),
            services,
            prefixes,
            check_cmd: None,
            reload_cmd: None,
            mode: None,
            owner: None,
            wait: None,
            command_timeout: std::time::Duration::from_secs(1),
            backup: false,
            vars: json!({}),
        }
    }

    fn ks() -> Keyspace {
        Keyspace::default()
    }

    fn web() -> catalog::ServiceName {
        catalog::ServiceName::new("web").unwrap()
    }

    fn id(s: &str) -> catalog::InstanceId {
        catalog::InstanceId::new(s).unwrap()
    }

    fn data(kvs: Kvs) -> CatalogData {
        CatalogData::from_listing(
            Listing {
                revision: kvs.1,
                cluster_id: 1,
                kvs: kvs.0,
            },
            &ks(),
        )
    }

    #[test]
    fn routes_serving_passing_only_and_lists_all() {
        let k = ks();
        let mut kvs = Kvs(vec![], 0);
        kvs.put(
            k.checker(&catalog::CheckerId::new("c1").unwrap()),
            Checker {
                version: "1".into(),
                started: 1,
            },
        );
        let a = kvs.put(k.instance(&web(), &id("a")), inst("a", "v1", 1, "serving"));
        let b = kvs.put(k.instance(&web(), &id("b")), inst("b", "v1", 2, "serving"));
        let c = kvs.put(k.instance(&web(), &id("c")), inst("c", "v1", 3, "draining"));
        kvs.put(k.instance(&web(), &id("d")), inst("d", "v1", 4, "serving"));
        kvs.put(k.health(&web(), &id("a")), health("passing", a));
        kvs.put(k.health(&web(), &id("b")), health("critical", b));
        kvs.put(k.health(&web(), &id("c")), health("passing", c));
        // A stale mark, about an older registration of `e`, does not count.
        kvs.put(k.health(&web(), &id("e")), health("passing", 1));
        kvs.put(k.instance(&web(), &id("e")), inst("e", "v1", 5, "serving"));
        kvs.put("/app/x".into(), "raw");
        kvs.put("/apples".into(), "no");
        let r = resource(ServiceSelection::Named(vec![web()]), vec!["/app/".into()]);
        let ctx = build(&data(kvs), &r);
        let svc = &ctx["services"]["web"];
        assert_eq!(svc["panic"], false);
        let ids: Vec<&str> = svc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a"]);
        let health: Vec<(&str, &str)> = svc["all"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["id"].as_str().unwrap(), i["health"].as_str().unwrap()))
            .collect();
        assert_eq!(
            health,
            [
                ("a", "passing"),
                ("b", "critical"),
                ("c", "passing"),
                ("d", "pending"),
                ("e", "pending")
            ]
        );
        assert_eq!(svc["instances"][0]["address"], "127.0.0.1:1");
        assert_eq!(svc["instances"][0]["lb_weight"], 100);
        assert_eq!(ctx["kv"], json!({"/app/x": "\"raw\""}));
    }

    #[test]
    fn panic_mode_without_checkers_or_without_passing() {
        let k = ks();
        let mut kvs = Kvs(vec![], 0);
        kvs.put(k.instance(&web(), &id("a")), inst("a", "v1", 1, "serving"));
        kvs.put(k.instance(&web(), &id("b")), inst("b", "v1", 2, "draining"));
        let r = resource(ServiceSelection::All, vec![]);
        let ctx = build(&data(kvs), &r);
        let svc = &ctx["services"]["web"];
        assert_eq!(svc["panic"], true);
        assert_eq!(svc["instances"].as_array().unwrap().len(), 1);
        assert_eq!(svc["instances"][0]["id"], "a");
    }

    #[test]
    fn requested_empty_service_is_an_empty_list() {
        let r = resource(ServiceSelection::Named(vec![web()]), vec![]);
        let ctx = build(&data(Kvs(vec![], 7)), &r);
        assert_eq!(ctx["services"]["web"]["instances"], json!([]));
        assert_eq!(ctx["services"]["web"]["panic"], false);
        assert_eq!(ctx["revision"], 7);
    }

    #[test]
    fn split_gives_per_version_weights() {
        let k = ks();
        let mut kvs = Kvs(vec![], 0);
        kvs.put(
            k.checker(&catalog::CheckerId::new("c1").unwrap()),
            Checker {
                version: "1".into(),
                started: 1,
            },
        );
        let config: ServiceConfig =
            serde_json::from_value(json!({"split": {"v1": 75, "v2": 25}})).unwrap();
        kvs.put(k.config(&web()), config);
        for (n, v) in [("a", "v1"), ("b", "v1"), ("c", "v1"), ("d", "v2")] {
            let rev = kvs.put(k.instance(&web(), &id(n)), inst(n, v, 1, "serving"));
            kvs.put(k.health(&web(), &id(n)), health("passing", rev));
        }
        let r = resource(ServiceSelection::All, vec![]);
        let ctx = build(&data(kvs), &r);
        let svc = &ctx["services"]["web"];
        let w: Vec<u64> = svc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["lb_weight"].as_u64().unwrap())
            .collect();
        assert_eq!(w, [256, 256, 256, 256]);
        assert_eq!(svc["versions"][0]["name"], "v1");
        assert!((svc["versions"][0]["share"].as_f64().unwrap() - 0.75).abs() < 1e-9);
        assert_eq!(svc["versions"][1]["split"], 25);
    }
}
