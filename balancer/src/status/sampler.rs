//! Once a second: read every endpoint's counters, keep a few seconds of history per
//! instance, compute req/s, error rate and p99 over that window, join them with the
//! catalog summary and publish the status JSON. Also turns what only the sampler can see
//! (outlier ejections, discovery relists, etcd going stale) into events.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::endpoint::{Endpoint, now_ms};
use crate::server::AdminState;
use crate::status::StatusHub;
use crate::status::catalog::state_name;
use crate::status::events::now_unix_ms;
use crate::status::stats::StatsSnapshot;
use crate::table::{HostMatch, RoutingTable};

/// Rates are computed over this much history.
pub const WINDOW: Duration = Duration::from_secs(3);
/// After a catalog change, wait this long for more before publishing (bounds the JSON
/// rebuilds during a burst of updates; the page still follows within a fraction of a second).
const COALESCE: Duration = Duration::from_millis(100);
/// Staleness above which the page logs "etcd unreachable".
const STALE_EVENT: Duration = Duration::from_secs(10);

type Key = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Sampler {
    /// Per instance: the endpoint object's creation time (identifies it) and samples.
    history: HashMap<Key, (Instant, VecDeque<(Instant, StatsSnapshot)>)>,
    /// Change over the window and its length, per instance (from the last tick).
    window: HashMap<Key, (StatsSnapshot, f64)>,
    ejected: HashSet<Key>,
    resets: u64,
    stale: bool,
}

pub fn spawn(admin: Arc<AdminState>) {
    // The first document is published before the admin port opens, so `/api/status`
    // never answers "not computed yet" to a client that connects at once.
    let hub = admin.status.clone();
    let mut s = Sampler::default();
    s.sample(&admin);
    s.publish(&admin, &hub);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutting_down = admin.shutting_down.clone();
        loop {
            enum Wake {
                Tick,
                Changed,
                Shutdown,
            }
            let wake = tokio::select! {
                _ = tick.tick() => Wake::Tick,
                _ = hub.changed.notified() => Wake::Changed,
                _ = shutting_down.wait_for(|s| *s) => Wake::Shutdown,
            };
            match wake {
                Wake::Tick => s.sample(&admin),
                // Coalesce a burst of catalog changes into one publication.
                Wake::Changed => tokio::time::sleep(COALESCE).await,
                Wake::Shutdown => {
                    // Wakes SSE streams one last time; they end on shutdown themselves.
                    s.publish(&admin, &hub);
                    return;
                }
            }
            s.publish(&admin, &hub);
        }
    });
}

/// Every endpoint in the table, once, by (service, instance id).
fn endpoints(table: &RoutingTable) -> HashMap<Key, (Arc<Endpoint>, bool)> {
    let mut out = HashMap::new();
    for l in &table.listeners {
        for r in &l.routes {
            let Some(svc) = &r.service else { continue };
            for g in &svc.groups {
                for m in &g.members {
                    out.insert(
                        (svc.name.clone(), m.ep.id.clone()),
                        (m.ep.clone(), svc.panic),
                    );
                }
            }
        }
    }
    out
}

impl Sampler {
    fn sample(&mut self, admin: &AdminState) {
        let now = Instant::now();
        let table = admin.shared.table.load_full();
        let eps = endpoints(&table);
        self.history.retain(|k, _| eps.contains_key(k));
        self.window.clear();
        let hub = &admin.status;
        let now_ms = now_ms();
        for (key, (ep, _)) in &eps {
            let snap = ep.stats.snapshot();
            let created = ep.stats.created();
            let (born, h) = self
                .history
                .entry(key.clone())
                .or_insert_with(|| (created, VecDeque::new()));
            if *born != created {
                // A new endpoint object for the same instance: its counters restarted.
                *born = created;
                h.clear();
            }
            if h.is_empty() {
                // Counting began at zero when the endpoint was created.
                h.push_back((ep.stats.created(), StatsSnapshot::default()));
            }
            h.push_back((now, snap));
            while h.len() > 2 && now.duration_since(h[1].0) >= WINDOW {
                h.pop_front();
            }
            if let (Some((t0, first)), Some((t1, last))) = (h.front(), h.back())
                && t1 > t0
                && let Some(d) = last.delta(first)
            {
                self.window
                    .insert(key.clone(), (d, t1.duration_since(*t0).as_secs_f64()));
            }
            let ejected = ep.is_ejected(now_ms);
            if ejected && self.ejected.insert(key.clone()) {
                hub.events.push(
                    "ejected",
                    Some(&key.0),
                    Some(&key.1),
                    format!(
                        "{}/{} ejected by outlier detection (consecutive failures)",
                        key.0, key.1
                    ),
                );
            } else if !ejected && self.ejected.remove(key) {
                hub.events.push(
                    "recovered",
                    Some(&key.0),
                    Some(&key.1),
                    format!("{}/{} back from ejection", key.0, key.1),
                );
            }
        }
        self.ejected.retain(|k| eps.contains_key(k));

        if let Some(stats) = admin.watch.load().as_ref() {
            let resets = stats.resets();
            if resets > self.resets && self.resets > 0 {
                hub.events.push(
                    "discovery",
                    None,
                    None,
                    "discovery relisted the catalog (etcd compaction, restart or reconnect)".into(),
                );
            }
            self.resets = self.resets.max(resets);
            let stale = stats.since_sync().is_some_and(|d| d > STALE_EVENT);
            if stale != self.stale {
                self.stale = stale;
                hub.events.push(
                    "discovery",
                    None,
                    None,
                    if stale {
                        format!(
                            "etcd has not confirmed the catalog for over {}s; serving the last known state",
                            STALE_EVENT.as_secs()
                        )
                    } else {
                        "etcd confirms the catalog again".into()
                    },
                );
            }
        }
    }

    fn publish(&self, admin: &AdminState, hub: &StatusHub) {
        let doc = self.document(admin, hub);
        match serde_json::to_vec(&doc) {
            Ok(v) => hub.publish(Bytes::from(v)),
            Err(e) => tracing::warn!(error = %e, "status document did not serialize"),
        }
    }

    fn document(&self, admin: &AdminState, hub: &StatusHub) -> Value {
        let table = admin.shared.table.load_full();
        let eps = endpoints(&table);
        let summary = hub.summary();
        let now = now_ms();
        let mut services = Vec::new();
        let mut total = Agg::default();
        let (mut n_instances, mut n_serving) = (0, 0);
        for (name, svc) in &summary.services {
            let mut versions: Vec<(String, Agg, usize, usize)> = Vec::new();
            let mut svc_agg = Agg::default();
            let mut panic = false;
            let mut instances = Vec::new();
            for (id, inst) in &svc.instances {
                let key: Key = (name.as_str().into(), id.as_str().into());
                let ep = eps.get(&key);
                panic |= ep.is_some_and(|(_, p)| *p);
                let mut state = state_name(inst.class);
                if ep.is_some_and(|(e, _)| e.is_ejected(now)) {
                    state = "ejected";
                }
                let mut agg = Agg::default();
                if let Some((d, secs)) = self.window.get(&key) {
                    agg.add(d, *secs);
                }
                svc_agg.merge(&agg);
                let vi = match versions.iter().position(|v| v.0 == inst.version) {
                    Some(i) => i,
                    None => {
                        versions.push((inst.version.clone(), Agg::default(), 0, 0));
                        versions.len() - 1
                    }
                };
                versions[vi].1.merge(&agg);
                versions[vi].2 += 1;
                n_instances += 1;
                if state == "serving" {
                    versions[vi].3 += 1;
                    n_serving += 1;
                }
                instances.push(json!({
                    "id": id,
                    "version": inst.version,
                    "node": inst.node,
                    "addr": inst.addr,
                    "protocol": inst.protocol,
                    "weight": inst.weight,
                    "state": state,
                    "routed": ep.is_some(),
                    "in_flight": ep.map_or(0, |(e, _)| e.in_flight()),
                    "health": inst.health.as_ref().map(|h| json!({
                        "status": h.status,
                        "since_ms": h.since_ms,
                        "checker": h.checker,
                        "output": h.output,
                    })),
                    "rps": agg.rps(),
                    "error_rate": agg.error_rate(),
                    "p99_ms": agg.p99_ms(),
                }));
            }
            total.merge(&svc_agg);
            let split_total: u32 = svc.split.iter().map(|(_, n)| n).sum();
            services.push(json!({
                "name": name,
                "source": svc.source,
                "algorithm": svc.algorithm,
                "panic": panic,
                "split": svc.split.iter().map(|(v, n)| json!({
                    "version": v,
                    "share": n,
                    "percent": if split_total == 0 { 0.0 } else { *n as f64 * 100.0 / split_total as f64 },
                })).collect::<Vec<_>>(),
                "versions": versions.iter().map(|(v, a, n, serving)| json!({
                    "version": v,
                    "instances": n,
                    "serving": serving,
                    "rps": a.rps(),
                    "error_rate": a.error_rate(),
                    "p99_ms": a.p99_ms(),
                })).collect::<Vec<_>>(),
                "rps": svc_agg.rps(),
                "error_rate": svc_agg.error_rate(),
                "p99_ms": svc_agg.p99_ms(),
                "instances": instances,
            }));
        }
        let listeners: Vec<Value> = table
            .listeners
            .iter()
            .map(|l| {
                json!({
                    "name": &*l.name,
                    "routes": l.routes.iter().map(|r| json!({
                        "host": match &r.host {
                            HostMatch::Any => "*".to_owned(),
                            HostMatch::Exact(h) => h.clone(),
                            HostMatch::Suffix(s) => format!("*{s}"),
                        },
                        "path_prefix": &*r.path_prefix,
                        "service": &*r.service_name,
                        "known": r.service.is_some(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let discovery = match admin.watch.load().as_ref() {
            Some(w) => json!({
                "source": "etcd",
                "staleness_s": w.since_sync().map(|d| d.as_secs_f64()),
                "revision": table.revision,
                "events": w.events(),
                "resets": w.resets(),
                "reconnects": w.reconnects(),
                "malformed": w.malformed(),
            }),
            None => json!({
                "source": if hub.etcd { "etcd" } else { "static" },
                "staleness_s": null,
                "revision": table.revision,
            }),
        };
        json!({
            "balancer": {
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": hub.started.elapsed().as_secs(),
            },
            "generated_at_ms": now_unix_ms(),
            "window_s": WINDOW.as_secs(),
            "discovery": discovery,
            "totals": {
                "services": summary.services.len(),
                "instances": n_instances,
                "serving": n_serving,
                "rps": total.rps(),
                "error_rate": total.error_rate(),
                "p99_ms": total.p99_ms(),
            },
            "listeners": listeners,
            "services": services,
            "events": hub.events.recent(),
        })
    }
}

/// Window counts of several instances (their windows are the same length within a tick).
#[derive(Default)]
struct Agg {
    counts: StatsSnapshot,
    rps: f64,
}

impl Agg {
    fn add(&mut self, d: &StatsSnapshot, secs: f64) {
        self.counts.add(d);
        if secs > 0.0 {
            self.rps += d.attempts as f64 / secs;
        }
    }

    fn merge(&mut self, o: &Agg) {
        self.counts.add(&o.counts);
        self.rps += o.rps;
    }

    fn rps(&self) -> f64 {
        (self.rps * 10.0).round() / 10.0
    }

    fn error_rate(&self) -> f64 {
        self.counts.error_ratio()
    }

    fn p99_ms(&self) -> Option<f64> {
        self.counts
            .quantile(0.99)
            .map(|d| (d.as_secs_f64() * 1e5).round() / 100.0)
    }
}
