//! Builds routing tables from the configuration and the catalog, reusing everything that
//! did not change.
//!
//! A catalog update names the services it touches; only those `ServiceTable`s are rebuilt,
//! and inside them every instance that stays routable keeps its `Arc<Endpoint>` (pool,
//! in-flight count, outlier state). The top-level table is then re-assembled from `Arc`s,
//! which costs O(listeners + routes), not O(instances).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use catalog::{
    CatalogView, Diff, HealthStatus, InstanceState, Protocol, ServiceName, ServiceView, Update,
};

use crate::config::LbConfig;
use crate::endpoint::Endpoint;
use crate::metrics::{ClassCounters, Metrics};
use crate::table::{Group, Member, ServiceShared, ServiceTable};
use crate::tcp::UpstreamOpts;

mod listeners;

/// Why an instance is (not) routable; also the `state` label of `balancer_backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceClass {
    Routable,
    Draining,
    Critical,
    Pending,
}

impl InstanceClass {
    pub fn label(self) -> &'static str {
        match self {
            InstanceClass::Routable => "routable",
            InstanceClass::Draining => "draining",
            InstanceClass::Critical => "critical",
            InstanceClass::Pending => "pending",
        }
    }
}

/// Classifies one instance per DESIGN.md: serving + passing = routable; no mark = pending.
pub fn classify(view: &ServiceView, id: &catalog::InstanceId) -> Option<InstanceClass> {
    let inst = view.instances.get(id)?;
    if inst.value.state == InstanceState::Draining || inst.value.weight == 0 {
        return Some(InstanceClass::Draining);
    }
    Some(match view.health.get(id) {
        // A mark about an earlier registration of the same id says nothing about this one.
        Some(h) if h.value.observed_mod_rev < inst.create_revision => InstanceClass::Pending,
        Some(h) if h.value.status == HealthStatus::Passing => InstanceClass::Routable,
        Some(_) => InstanceClass::Critical,
        None => InstanceClass::Pending,
    })
}

type EpKey = (Arc<str>, Arc<str>);
/// (listener, service, version).
type CounterKey = (Arc<str>, Arc<str>, Arc<str>);

pub struct TableBuilder {
    config: Arc<LbConfig>,
    metrics: Arc<Metrics>,
    catalog: CatalogView,
    /// Routable endpoints by (service, id), shared by successive tables.
    endpoints: HashMap<EpKey, Arc<Endpoint>>,
    /// Built etcd services; static ones are rebuilt only on reload.
    etcd_services: HashMap<Arc<str>, Arc<ServiceTable>>,
    static_services: HashMap<Arc<str>, Arc<ServiceTable>>,
    shared: HashMap<Arc<str>, Arc<ServiceShared>>,
    counters: HashMap<CounterKey, ClassCounters>,
    /// Before the first catalog snapshot, new instances skip slow start (the balancer is
    /// starting, not the instance).
    first_catalog: bool,
    up_labels: HashSet<EpKey>,
    backend_states: HashSet<(Arc<str>, &'static str)>,
    /// Per-service upstream options (PROXY header, TLS), copied into every route.
    upstreams: Arc<HashMap<String, Arc<UpstreamOpts>>>,
    /// Routes' rate limiters, kept across builds (`rate_limit`).
    limiters: crate::rate_limit::Limiters,
    /// Static endpoints' active checks (`[service.check]`).
    checks: crate::static_check::Checks,
}

impl TableBuilder {
    pub fn new(config: Arc<LbConfig>, metrics: Arc<Metrics>) -> Self {
        let mut b = Self {
            config,
            metrics,
            catalog: CatalogView::default(),
            endpoints: HashMap::new(),
            etcd_services: HashMap::new(),
            static_services: HashMap::new(),
            shared: HashMap::new(),
            counters: HashMap::new(),
            first_catalog: true,
            up_labels: HashSet::new(),
            backend_states: HashSet::new(),
            upstreams: Arc::default(),
            limiters: Default::default(),
            checks: Default::default(),
        };
        b.rebuild_static(true);
        b
    }

    pub fn config(&self) -> &Arc<LbConfig> {
        &self.config
    }

    pub fn catalog(&self) -> &CatalogView {
        &self.catalog
    }

    /// A static endpoint's check changed its verdict: its service is rebuilt.
    pub fn static_checks_changed(&mut self) {
        self.rebuild_static(false);
    }

    /// Checks created since the last call, whose tasks the caller starts
    /// (`static_check::spawn`).
    pub fn take_new_checks(&mut self) -> Vec<Arc<crate::static_check::CheckState>> {
        self.checks.take_new()
    }

    /// The upstream options the next tables carry (built with the configuration by
    /// `tcp::upstream_map`, which loads CA files).
    pub fn set_upstreams(&mut self, upstreams: Arc<HashMap<String, Arc<UpstreamOpts>>>) {
        self.upstreams = upstreams;
        // Checked static endpoints are probed the way their requests connect: their
        // checks follow the new options (the endpoints themselves are kept).
        if self.config.services.iter().any(|s| s.check.is_some()) {
            self.rebuild_static(true);
        }
    }

    /// A new configuration (SIGHUP): static services and listeners are rebuilt, endpoints
    /// that did not change are kept.
    pub fn set_config(&mut self, config: Arc<LbConfig>) {
        let tcp_changed = self.config.tcp_services() != config.tcp_services();
        self.config = config;
        self.rebuild_static(false);
        if tcp_changed {
            // Services moved between tcp and http listeners route other instances now.
            let names: Vec<ServiceName> = self.catalog.services.keys().cloned().collect();
            for n in names {
                self.rebuild_etcd_service(&n);
            }
        }
    }

    /// Folds a watcher update in and rebuilds the services it touched.
    pub fn apply(&mut self, update: Update) {
        let mut touched: BTreeSet<ServiceName> = BTreeSet::new();
        let mut all = false;
        for d in &update.diffs {
            match d {
                Diff::Reset(_) => all = true,
                Diff::Put(e) => match e.key.service() {
                    Some(s) => {
                        touched.insert(s.clone());
                    }
                    // A checker came or went: panic mode may flip everywhere.
                    None => all |= matches!(e.key, catalog::Key::Checker(_)),
                },
                Diff::Delete(k) => match k.service() {
                    Some(s) => {
                        touched.insert(s.clone());
                    }
                    None => all |= matches!(k, catalog::Key::Checker(_)),
                },
            }
        }
        let before: HashSet<ServiceName> = self.catalog.services.keys().cloned().collect();
        let checkers_before = self.catalog.checkers.is_empty();
        self.catalog.apply(update);
        all |= checkers_before != self.catalog.checkers.is_empty();
        if all {
            touched.extend(before);
            touched.extend(self.catalog.services.keys().cloned());
        }
        for s in touched {
            self.rebuild_etcd_service(&s);
        }
        self.first_catalog = false;
    }

    fn shared_for(&mut self, name: &Arc<str>) -> Arc<ServiceShared> {
        let m = &self.metrics;
        self.shared
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(ServiceShared::new(
                    m.connect_errors.with_label_values(&[name]),
                    m.retries.with_label_values(&[name, "connect"]),
                    m.retries.with_label_values(&[name, "reset"]),
                    m.retries.with_label_values(&[name, "status"]),
                    m.ejections.with_label_values(&[name]),
                    crate::queue::SlotQueue::new(
                        m.queued.with_label_values(&[name]),
                        m.queue_timeouts.with_label_values(&[name]),
                    ),
                ))
            })
            .clone()
    }

    /// Returns the endpoint for `key`, reusing the current one when address and version
    /// are unchanged. `fresh` collects the keys in use.
    fn endpoint(
        &mut self,
        key: EpKey,
        version: &str,
        addr: std::net::SocketAddr,
        slow_start: std::time::Duration,
        ramp: bool,
    ) -> Arc<Endpoint> {
        if let Some(ep) = self.endpoints.get(&key) {
            if ep.addr == addr && &*ep.version == version && !ep.is_retired() {
                return ep.clone();
            }
            ep.retire();
        }
        let queue = self.shared_for(&key.0).queue.clone();
        let up = &self.config.upstream;
        let ep = Arc::new(
            Endpoint::new(
                key.0.clone(),
                key.1.clone(),
                version.into(),
                addr,
                ramp.then_some(slow_start),
                up.max_idle_per_endpoint,
                up.pool_idle_timeout,
            )
            .with_queue(queue),
        );
        self.endpoints.insert(key, ep.clone());
        ep
    }

    /// Retires the endpoints of `service` that are not in `keep`.
    fn retire_others(&mut self, service: &Arc<str>, keep: &HashSet<Arc<str>>) {
        let metrics = self.metrics.clone();
        let up_labels = &mut self.up_labels;
        self.endpoints.retain(|(s, id), ep| {
            if s != service || keep.contains(id) {
                return true;
            }
            ep.retire();
            if up_labels.remove(&(s.clone(), id.clone())) {
                let _ = metrics.backend_up.remove_label_values(&[s, id]);
            }
            false
        });
    }

    fn rebuild_etcd_service(&mut self, name: &ServiceName) {
        let sname: Arc<str> = name.as_str().into();
        if self.static_services.contains_key(&sname) {
            tracing::warn!(service = %name, "service is defined in lb.toml and in etcd; using lb.toml");
            return;
        }
        let Some(view) = self.catalog.services.get(name).cloned() else {
            self.etcd_services.remove(&sname);
            self.retire_others(&sname, &HashSet::new());
            self.set_state_gauges(&sname, &[]);
            return;
        };
        let config = view
            .config
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default();
        let no_checker = self.catalog.checkers.is_empty();
        let mut classes = Vec::new();
        let mut routable = Vec::new();
        let mut serving = Vec::new();
        // A service reached by a tcp listener routes its `tcp` instances, others `http`.
        let want = if self.config.tcp_services().contains(name.as_str()) {
            Protocol::Tcp
        } else {
            Protocol::Http
        };
        for (id, inst) in &view.instances {
            if inst.value.protocol != want {
                continue;
            }
            let Some(class) = classify(&view, id) else {
                continue;
            };
            classes.push(class);
            if class == InstanceClass::Routable {
                routable.push(&inst.value);
            }
            if class != InstanceClass::Draining {
                serving.push(&inst.value);
            }
        }
        let panic = !serving.is_empty() && (no_checker || routable.is_empty());
        if panic {
            tracing::warn!(service = %name, no_checker, "panic mode: routing to every serving instance");
            routable = serving;
        }
        let ramp = !self.first_catalog;
        let mut keep = HashSet::new();
        let mut members = Vec::new();
        for inst in routable {
            let key: EpKey = (sname.clone(), inst.id.as_str().into());
            keep.insert(key.1.clone());
            let ep = self.endpoint(
                key,
                inst.version.as_str(),
                inst.socket_addr(),
                config.slow_start,
                ramp,
            );
            members.push((ep, inst.weight, inst.version.as_str().to_owned()));
        }
        self.retire_others(&sname, &keep);
        let split: Vec<(String, u32)> = config
            .split
            .iter()
            .map(|(v, s)| (v.as_str().to_owned(), *s))
            .collect();
        let table = self.assemble(sname.clone(), config.algorithm, &split, members, panic);
        self.set_state_gauges(&sname, &classes);
        self.etcd_services.insert(sname, Arc::new(table));
    }

    fn rebuild_static(&mut self, first: bool) {
        let config = self.config.clone();
        let mut names = HashSet::new();
        let mut checked = HashSet::new();
        for s in &config.services {
            let sname: Arc<str> = s.name.get_ref().as_str().into();
            names.insert(sname.clone());
            // Endpoints failing their `[service.check]` are left out, unless all are
            // (panic mode, as for etcd services).
            let opts = self.upstreams.get(&*sname).cloned();
            let passing: Vec<bool> = (s.endpoints.iter())
                .map(|e| match &s.check {
                    Some(spec) => {
                        checked.insert((sname.clone(), *e.addr.get_ref()));
                        let c = self
                            .checks
                            .state(&sname, *e.addr.get_ref(), spec, opts.as_ref());
                        c.is_up()
                    }
                    None => true,
                })
                .collect();
            let panic = !passing.contains(&true) && !passing.is_empty();
            let mut keep = HashSet::new();
            let mut members = Vec::new();
            let mut classes = Vec::new();
            for (e, passes) in s.endpoints.iter().zip(passing) {
                if !passes {
                    classes.push(InstanceClass::Critical);
                    if !panic {
                        continue;
                    }
                }
                let addr = *e.addr.get_ref();
                let key: EpKey = (sname.clone(), addr.to_string().into());
                keep.insert(key.1.clone());
                let ep = self.endpoint(key, e.version.as_str(), addr, s.slow_start, !first);
                if e.weight > 0 {
                    if passes {
                        classes.push(InstanceClass::Routable);
                    }
                    members.push((ep, e.weight, e.version.as_str().to_owned()));
                }
            }
            self.retire_others(&sname, &keep);
            let split: Vec<(String, u32)> = s
                .split
                .iter()
                .map(|(v, w)| (v.as_str().to_owned(), *w))
                .collect();
            let table = self.assemble(sname.clone(), s.algorithm, &split, members, panic);
            self.set_state_gauges(&sname, &classes);
            self.static_services.insert(sname, Arc::new(table));
        }
        self.checks.retain(&checked);
        let gone: Vec<Arc<str>> = self
            .static_services
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.static_services.remove(&n);
            self.retire_others(&n, &HashSet::new());
            self.set_state_gauges(&n, &[]);
            // An etcd service of the same name may now take over.
            if let Ok(svc) = n.parse::<ServiceName>() {
                self.rebuild_etcd_service(&svc);
            }
        }
    }

    /// Groups members by the split and precomputes the selection structures.
    fn assemble(
        &mut self,
        name: Arc<str>,
        algorithm: catalog::Algorithm,
        split: &[(String, u32)],
        members: Vec<(Arc<Endpoint>, u32, String)>,
        panic: bool,
    ) -> ServiceTable {
        let shared = self.shared_for(&name);
        let mut versions: Vec<Arc<str>> = Vec::new();
        let mut version_of = |v: &str| -> usize {
            match versions.iter().position(|x| &**x == v) {
                Some(i) => i,
                None => {
                    versions.push(v.into());
                    versions.len() - 1
                }
            }
        };
        for (ep, _, _) in &members {
            self.up_labels.insert((name.clone(), ep.id.clone()));
            self.metrics
                .backend_up
                .with_label_values(&[&name, &ep.id])
                .set(1);
        }
        let members: Vec<Member> = members
            .into_iter()
            .filter(|(_, w, _)| *w > 0)
            .map(|(ep, weight, v)| Member {
                ep,
                weight,
                version: version_of(&v),
            })
            .collect();
        // Every version's members on their own, split share or not, for requests that
        // name their version (`version_pin`).
        let by_sticky_id = members
            .iter()
            .map(|m| (m.ep.sticky_id, m.clone()))
            .collect();
        let version_groups = (0..versions.len())
            .map(|v| {
                Group::new(
                    members
                        .iter()
                        .filter(|m| m.version == v)
                        .map(Member::clone)
                        .collect(),
                )
            })
            .collect();
        let mut groups = Vec::new();
        let mut shares = Vec::new();
        let listed: Vec<&(String, u32)> = split
            .iter()
            .filter(|(v, s)| *s > 0 && members.iter().any(|m| &*versions[m.version] == v))
            .collect();
        if split.is_empty() || listed.is_empty() {
            // No split, or no listed version has an instance: everyone competes by weight.
            if !members.is_empty() {
                groups.push(Group::new(members));
            }
        } else {
            let mut total = 0u64;
            let mut by_version: Vec<Vec<Member>> = listed.iter().map(|_| Vec::new()).collect();
            for m in members {
                if let Some(i) = listed.iter().position(|(v, _)| &*versions[m.version] == v) {
                    by_version[i].push(m);
                }
            }
            for ((_, share), ms) in listed.iter().zip(by_version) {
                total += *share as u64;
                shares.push(total);
                groups.push(Group::new(ms));
            }
            if groups.len() == 1 {
                shares.clear();
            }
        }
        let limit = self.config.service_limit(&name);
        ServiceTable {
            name,
            algorithm,
            versions,
            groups,
            shares,
            version_groups,
            by_sticky_id,
            panic,
            shared,
            limit,
        }
    }

    fn set_state_gauges(&mut self, service: &Arc<str>, classes: &[InstanceClass]) {
        for class in [
            InstanceClass::Routable,
            InstanceClass::Draining,
            InstanceClass::Critical,
            InstanceClass::Pending,
        ] {
            let n = classes.iter().filter(|c| **c == class).count() as i64;
            let key = (service.clone(), class.label());
            if n == 0 && !self.backend_states.contains(&key) {
                continue;
            }
            self.backend_states.insert(key);
            self.metrics
                .backends
                .with_label_values(&[service, class.label()])
                .set(n);
        }
    }
}
