//! `CatalogView`: the state a watcher's updates describe, as maps a consumer can query.
//!
//! Every consumer (balancer, checker, renderer) folds the diff stream into this view, or
//! into its own structure using the same [`crate::Diff`] vocabulary.

use std::collections::BTreeMap;

use crate::keys::Key;
use crate::model::{Checker, Health, Instance, Node, ServiceConfig};
use crate::names::{CheckerId, InstanceId, NodeName, ServiceName};
use crate::store::Revision;
use crate::watch::{Diff, Entry, Update, Value};

/// A value with the etcd revisions of its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    pub value: T,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// Everything known about one service.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceView {
    pub config: Option<Record<ServiceConfig>>,
    pub instances: BTreeMap<InstanceId, Record<Instance>>,
    pub health: BTreeMap<InstanceId, Record<Health>>,
}

impl ServiceView {
    fn is_empty(&self) -> bool {
        self.config.is_none() && self.instances.is_empty() && self.health.is_empty()
    }
}

/// The whole catalog at one revision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CatalogView {
    pub revision: Revision,
    pub services: BTreeMap<ServiceName, ServiceView>,
    pub nodes: BTreeMap<NodeName, Record<Node>>,
    pub checkers: BTreeMap<CheckerId, Record<Checker>>,
}

impl CatalogView {
    /// Applies one watcher update.
    pub fn apply(&mut self, update: Update) {
        for diff in update.diffs {
            match diff {
                Diff::Reset(snapshot) => {
                    *self = Self::default();
                    for entry in snapshot.entries {
                        self.put(entry);
                    }
                }
                Diff::Put(entry) => self.put(entry),
                Diff::Delete(key) => self.delete(&key),
            }
        }
        self.revision = update.revision;
    }

    /// Every instance of every service, in key order.
    pub fn instances(&self) -> impl Iterator<Item = &Record<Instance>> {
        self.services.values().flat_map(|s| s.instances.values())
    }

    fn put(&mut self, entry: Entry) {
        fn rec<T>(value: T, e: &Entry) -> Record<T> {
            Record {
                value,
                create_revision: e.create_revision,
                mod_revision: e.mod_revision,
            }
        }
        let key = entry.key.clone();
        match (key, entry.value.clone()) {
            (Key::Instance(s, id), Value::Instance(v)) => {
                let r = rec(v, &entry);
                self.services.entry(s).or_default().instances.insert(id, r);
            }
            (Key::Health(s, id), Value::Health(v)) => {
                let r = rec(v, &entry);
                self.services.entry(s).or_default().health.insert(id, r);
            }
            (Key::Config(s), Value::Config(v)) => {
                self.services.entry(s).or_default().config = Some(rec(v, &entry));
            }
            (Key::Node(n), Value::Node(v)) => {
                self.nodes.insert(n, rec(v, &entry));
            }
            (Key::Checker(c), Value::Checker(v)) => {
                self.checkers.insert(c, rec(v, &entry));
            }
            // `decode` pairs every key with its own kind of value.
            _ => {}
        }
    }

    fn delete(&mut self, key: &Key) {
        match key {
            Key::Instance(s, id) => self.with_service(s, |v| {
                v.instances.remove(id);
            }),
            Key::Health(s, id) => self.with_service(s, |v| {
                v.health.remove(id);
            }),
            Key::Config(s) => self.with_service(s, |v| v.config = None),
            Key::Node(n) => {
                self.nodes.remove(n);
            }
            Key::Checker(c) => {
                self.checkers.remove(c);
            }
            // Rollout state is the registrar's business; the view does not hold it.
            Key::Rollout(_) => {}
        }
    }

    fn with_service(&mut self, s: &ServiceName, f: impl FnOnce(&mut ServiceView)) {
        if let Some(view) = self.services.get_mut(s) {
            f(view);
            if view.is_empty() {
                self.services.remove(s);
            }
        }
    }
}
