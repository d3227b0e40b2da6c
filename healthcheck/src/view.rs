//! What the checker knows of etcd: instances, check specs, health marks and live checkers,
//! folded from the watcher's diffs into maps keyed for the supervisor.

use std::collections::{BTreeSet, HashMap};

use catalog::{CheckSpec, CheckerId, Diff, Health, Instance, Key, Record, ServiceName, Value};

use crate::writer::Item;

/// What one update changed, so the supervisor re-evaluates only that.
#[derive(Debug, Default)]
pub struct Changes {
    /// Everything may have changed (a relist).
    pub all: bool,
    /// The set of live checkers changed: ownership must be recomputed.
    pub checkers: bool,
    /// Services whose check spec changed.
    pub services: Vec<ServiceName>,
    /// Instances whose registration changed.
    pub instances: Vec<Item>,
    /// Instances whose health mark changed.
    pub marks: Vec<Item>,
}

#[derive(Debug, Default)]
pub struct View {
    pub instances: HashMap<Item, Record<Instance>>,
    pub marks: HashMap<Item, Record<Health>>,
    /// The last mark seen per instance, kept after the mark is deleted (a dead checker's
    /// marks vanish with its lease) so the next owner can take the verdict over.
    pub last_marks: HashMap<Item, Health>,
    pub checks: HashMap<ServiceName, CheckSpec>,
    pub checkers: BTreeSet<CheckerId>,
}

fn record<T>(value: T, create_revision: i64, mod_revision: i64) -> Record<T> {
    Record {
        value,
        create_revision,
        mod_revision,
    }
}

impl View {
    pub fn apply(&mut self, diffs: Vec<Diff>, changes: &mut Changes) {
        for diff in diffs {
            match diff {
                Diff::Reset(snapshot) => {
                    let last_marks = std::mem::take(&mut self.last_marks);
                    *self = View::default();
                    // Keep remembered verdicts of instances that still exist.
                    self.last_marks = last_marks;
                    for e in snapshot.entries {
                        self.put(e.key, e.value, e.create_revision, e.mod_revision, changes);
                    }
                    let instances = &self.instances;
                    self.last_marks.retain(|k, _| instances.contains_key(k));
                    changes.all = true;
                }
                Diff::Put(e) => {
                    self.put(e.key, e.value, e.create_revision, e.mod_revision, changes)
                }
                Diff::Delete(key) => self.delete(key, changes),
            }
        }
    }

    fn put(&mut self, key: Key, value: Value, create: i64, modr: i64, changes: &mut Changes) {
        match (key, value) {
            (Key::Instance(s, i), Value::Instance(v)) => {
                let item = (s, i);
                self.instances.insert(item.clone(), record(v, create, modr));
                changes.instances.push(item);
            }
            (Key::Health(s, i), Value::Health(v)) => {
                let item = (s, i);
                self.last_marks.insert(item.clone(), v.clone());
                self.marks.insert(item.clone(), record(v, create, modr));
                changes.marks.push(item);
            }
            (Key::Config(s), Value::Config(c)) if self.checks.get(&s) != Some(&c.check) => {
                self.checks.insert(s.clone(), c.check);
                changes.services.push(s);
            }
            (Key::Checker(c), Value::Checker(_)) => {
                changes.checkers |= self.checkers.insert(c);
            }
            _ => {}
        }
    }

    fn delete(&mut self, key: Key, changes: &mut Changes) {
        match key {
            Key::Instance(s, i) => {
                let item = (s, i);
                self.instances.remove(&item);
                self.last_marks.remove(&item);
                changes.instances.push(item);
            }
            Key::Health(s, i) => {
                let item = (s, i);
                self.marks.remove(&item);
                changes.marks.push(item);
            }
            Key::Config(s) => {
                if self.checks.remove(&s).is_some() {
                    changes.services.push(s);
                }
            }
            Key::Checker(c) => changes.checkers |= self.checkers.remove(&c),
            Key::Node(_) | Key::Rollout(_) => {}
        }
    }

    /// The check that applies to an instance: its own, else its service's, else the default.
    pub fn spec_for(&self, item: &Item, instance: &Instance) -> CheckSpec {
        instance
            .check
            .clone()
            .or_else(|| self.checks.get(&item.0).cloned())
            .unwrap_or_default()
    }
}
