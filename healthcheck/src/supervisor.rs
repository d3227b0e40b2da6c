//! The supervisor: folds the catalog watch, decides which instances this checker owns,
//! runs one probe task per owned instance, and turns the tasks' verdicts into mark writes.
//!
//! Marks are reconciled, not just emitted: for every owned instance the supervisor knows the
//! mark it wants in etcd (status, instance `mod_revision`, lease generation) and what it last
//! asked the writer for. A missing or foreign mark seen on the watch, a new lease, or the slow
//! refresh makes the two differ and causes one write; a steady fleet causes none.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use catalog::model::now_millis;
use catalog::{CheckerId, Health, HealthStatus, ServiceName, Update};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::metrics::{Metrics, ServiceMetrics};
use crate::probe::Target;
use crate::rules::{Status, Step};
use crate::shard;
use crate::stall::StallGuard;
use crate::task::{ProbeJob, ProbeTask, Report};
use crate::view::{Changes, View};
use crate::writer::{Item, LeaseInfo, WriteDone, WriteKind, WriteRequest, WriteResult};

/// What the supervisor needs to know about its environment.
pub struct SupervisorConfig {
    pub me: CheckerId,
    /// Rewrite every mark this often even when nothing changed (`None`: never).
    pub mark_refresh: Option<Duration>,
    /// Floor of `deregister_after`; shorter values from etcd are raised to it.
    pub min_deregister_after: Duration,
    /// Tells probe tasks whether a timeout overlapped a stall of the checker itself.
    pub stalls: Arc<StallGuard>,
}

/// What was last asked of the writer for an instance's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wish {
    status: Status,
    guard: i64,
    /// The lease generation the write was applied under, once `done`.
    lease_generation: u64,
    ticket: u64,
    /// Applied. Until then the writer puts the mark under whatever lease is current, so a
    /// new lease alone is no reason to ask again.
    done: bool,
}

/// One owned instance.
struct Slot {
    generation: u64,
    _task: ProbeTask,
    target: Arc<Target>,
    create_revision: i64,
    status: Status,
    /// A status taken over from an earlier verdict is re-asserted only once a probe agrees.
    confirmed: bool,
    since: u64,
    consecutive: u32,
    output: String,
    sent: Option<Wish>,
    /// The watch showed a mark that is not ours, or none: check again at the next tick.
    dirty: bool,
    /// A guard that already failed; no new write with it until the watch brings news.
    stale_guard: i64,
    refresh_at: Instant,
    deregister_sent: bool,
}

pub struct Supervisor {
    config: SupervisorConfig,
    metrics: Arc<Metrics>,
    view: View,
    slots: HashMap<Item, Slot>,
    service_metrics: HashMap<ServiceName, Arc<ServiceMetrics>>,
    reports_tx: mpsc::UnboundedSender<Report>,
    writes: mpsc::UnboundedSender<WriteRequest>,
    lease: Option<LeaseInfo>,
    /// Marks of vanished instances whose deletion was asked for.
    cleanups: std::collections::HashSet<Item>,
    next_generation: u64,
    next_ticket: u64,
}

impl Supervisor {
    pub fn new(
        config: SupervisorConfig,
        metrics: Arc<Metrics>,
        writes: mpsc::UnboundedSender<WriteRequest>,
    ) -> (Self, mpsc::UnboundedReceiver<Report>) {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let sup = Self {
            config,
            metrics,
            view: View::default(),
            slots: HashMap::new(),
            service_metrics: HashMap::new(),
            reports_tx,
            writes,
            lease: None,
            cleanups: std::collections::HashSet::new(),
            next_generation: 0,
            next_ticket: 0,
        };
        (sup, reports)
    }

    /// Runs until the watcher stops. Dropping the future aborts every probe task.
    pub async fn run(
        mut self,
        mut updates: mpsc::Receiver<Update>,
        mut reports: mpsc::UnboundedReceiver<Report>,
        mut done: mpsc::UnboundedReceiver<WriteDone>,
        mut lease: watch::Receiver<Option<LeaseInfo>>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.lease = *lease.borrow_and_update();
        loop {
            tokio::select! {
                update = updates.recv() => match update {
                    Some(u) => self.on_update(u),
                    None => return,
                },
                Some(report) = reports.recv() => self.on_report(report),
                Some(d) = done.recv() => self.on_done(d),
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let new = *lease.borrow_and_update();
                    if new.is_some() && new != self.lease {
                        self.lease = new;
                        // Every mark must now hang off the new lease.
                        let items: Vec<Item> = self.slots.keys().cloned().collect();
                        for item in items {
                            self.reconcile(&item);
                        }
                    }
                }
                _ = tick.tick() => self.housekeeping(),
            }
        }
    }

    fn on_update(&mut self, update: Update) {
        let mut changes = Changes::default();
        self.view.apply(update.diffs, &mut changes);
        let mut live = self.view.checkers.clone();
        live.insert(self.config.me.clone());
        self.metrics.live_checkers.set(live.len() as i64);
        if changes.all || changes.checkers {
            let items: BTreeSet<Item> = self
                .view
                .instances
                .keys()
                .chain(self.slots.keys())
                .chain(self.view.marks.keys())
                .cloned()
                .collect();
            for item in items {
                self.evaluate(&item, &live);
            }
            return;
        }
        for svc in changes.services {
            let items: Vec<Item> = self
                .view
                .instances
                .keys()
                .filter(|(s, _)| *s == svc)
                .cloned()
                .collect();
            for item in items {
                self.evaluate(&item, &live);
            }
        }
        for item in changes.instances {
            self.evaluate(&item, &live);
        }
        for item in changes.marks {
            if self.view.instances.contains_key(&item) {
                self.mark_changed(&item);
            } else {
                self.evaluate(&item, &live);
            }
        }
    }

    /// Starts, restarts or stops the probing of one instance.
    fn evaluate(&mut self, item: &Item, live: &BTreeSet<CheckerId>) {
        let name = format!("{}/{}", item.0, item.1);
        let mine = shard::owner(&name, live) == Some(&self.config.me);
        let Some(rec) = self.view.instances.get(item) else {
            self.drop_slot(item);
            self.clean_up(item, mine);
            return;
        };
        if !mine {
            self.drop_slot(item);
            return;
        }
        let spec = self.view.spec_for(item, &rec.value);
        let target = Arc::new(Target::new(&rec.value, &spec, self.config.me.as_str()));
        let create_revision = rec.create_revision;
        match self.slots.get(item) {
            Some(slot) if slot.create_revision == create_revision => {
                if *slot.target != *target {
                    // Same registration, new check: keep the verdict, restart the probes.
                    let status = slot.status;
                    let generation = self.spawn_generation();
                    let task = self.spawn_task(item, generation, target.clone(), status);
                    if let Some(slot) = self.slots.get_mut(item) {
                        slot._task = task;
                        slot.generation = generation;
                        slot.target = target;
                        slot.deregister_sent = false;
                    }
                }
            }
            _ => {
                // New to us, or a new registration of the id: never inherit an old verdict.
                self.drop_slot(item);
                let adopted = self.adoptable(item, create_revision);
                let status = adopted
                    .as_ref()
                    .map_or(Status::Pending, |h| match h.status {
                        HealthStatus::Passing => Status::Passing,
                        HealthStatus::Critical => Status::Critical,
                    });
                let generation = self.spawn_generation();
                let task = self.spawn_task(item, generation, target.clone(), status);
                self.metrics.state_gauge(status).inc();
                let slot = Slot {
                    generation,
                    _task: task,
                    target,
                    create_revision,
                    status,
                    confirmed: status == Status::Pending,
                    since: adopted.as_ref().map_or_else(now_millis, |h| h.since),
                    consecutive: adopted.as_ref().map_or(0, |h| h.consecutive),
                    output: adopted.map(|h| h.output).unwrap_or_default(),
                    sent: None,
                    dirty: false,
                    stale_guard: 0,
                    refresh_at: Instant::now(),
                    deregister_sent: false,
                };
                self.slots.insert(item.clone(), slot);
            }
        }
        self.reconcile(item);
    }

    /// Deletes the mark of an instance that is gone (only the owner does, and only while the
    /// instance key stays absent), so marks do not pile up after instances.
    fn clean_up(&mut self, item: &Item, mine: bool) {
        if !self.view.marks.contains_key(item) {
            self.cleanups.remove(item);
            return;
        }
        if !mine || !self.cleanups.insert(item.clone()) {
            return;
        }
        self.next_ticket += 1;
        let _ = self.writes.send(WriteRequest {
            item: item.clone(),
            ticket: self.next_ticket,
            guard: 0,
            kind: WriteKind::Unmark,
        });
    }

    /// The current or last mark of this registration, if any: taken over rather than
    /// starting pending, so a change of owner does not take an instance out of service.
    fn adoptable(&self, item: &Item, create_revision: i64) -> Option<Health> {
        let current = self.view.marks.get(item).map(|r| &r.value);
        current
            .or_else(|| self.view.last_marks.get(item))
            .filter(|h| h.observed_mod_rev >= create_revision)
            .cloned()
    }

    fn spawn_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn spawn_task(
        &mut self,
        item: &Item,
        generation: u64,
        target: Arc<Target>,
        initial: Status,
    ) -> ProbeTask {
        let metrics = self
            .service_metrics
            .entry(item.0.clone())
            .or_insert_with(|| self.metrics.service(item.0.as_str()))
            .clone();
        ProbeJob {
            item: item.clone(),
            generation,
            target,
            initial,
            metrics,
            stalls: self.config.stalls.clone(),
            reports: self.reports_tx.clone(),
        }
        .spawn()
    }

    fn drop_slot(&mut self, item: &Item) {
        if let Some(slot) = self.slots.remove(item) {
            self.metrics.state_gauge(slot.status).dec();
        }
    }

    fn on_report(&mut self, report: Report) {
        let Some(slot) = self.slots.get_mut(&report.item) else {
            return;
        };
        if slot.generation != report.generation {
            return; // from a task that was replaced; its probe was about something older
        }
        let (svc, id) = &report.item;
        match report.step {
            Step::Changed { from, to } => {
                self.metrics.state_gauge(from).dec();
                self.metrics.state_gauge(to).inc();
                self.metrics
                    .transitions
                    .with_label_values(&[svc.as_str(), to.as_str()])
                    .inc();
                slot.status = to;
                slot.confirmed = true;
                slot.since = now_millis();
                slot.consecutive = report.consecutive;
                slot.deregister_sent = false;
                if to == Status::Passing {
                    info!(service = %svc, instance = %id, %from, %to, probes = report.consecutive, output = %report.output, "instance is now passing");
                } else {
                    warn!(service = %svc, instance = %id, %from, %to, probes = report.consecutive, output = %report.output, "instance is now critical");
                }
                slot.output = report.output;
            }
            Step::Confirmed => {
                slot.confirmed = true;
                slot.consecutive = report.consecutive;
                slot.output = report.output;
            }
            Step::Unchanged => return,
        }
        self.reconcile(&report.item);
    }

    fn on_done(&mut self, done: WriteDone) {
        if !self.view.instances.contains_key(&done.item) {
            // A clean-up that ran (or found the instance back): allow another later.
            self.cleanups.remove(&done.item);
        }
        let Some(slot) = self.slots.get_mut(&done.item) else {
            return;
        };
        let (svc, id) = &done.item;
        match (done.kind, done.result) {
            ("deregister", WriteResult::Applied { .. }) => {
                warn!(service = %svc, instance = %id, "deregistered an instance that stayed critical past deregister_after");
            }
            ("deregister", WriteResult::Stale) => slot.deregister_sent = false,
            (_, WriteResult::Stale) => {
                if slot.sent.is_some_and(|w| w.ticket == done.ticket) {
                    info!(service = %svc, instance = %id, "verdict dropped: the instance was re-registered or removed meanwhile");
                    slot.stale_guard = slot.sent.map_or(0, |w| w.guard);
                    slot.sent = None;
                }
            }
            (_, WriteResult::Applied { lease_generation }) => {
                let Some(wish) = slot.sent.as_mut().filter(|w| w.ticket == done.ticket) else {
                    return;
                };
                wish.done = true;
                wish.lease_generation = lease_generation;
                if let Some(every) = self.config.mark_refresh {
                    let spread = rand::rng().random_range(0.75..1.25);
                    slot.refresh_at = Instant::now() + every.mul_f64(spread);
                }
                let current = self.lease.map_or(0, |l| l.generation);
                if done.kind == "mark" && lease_generation != current {
                    // Applied under a lease that has since been replaced.
                    self.reconcile(&done.item);
                }
            }
        }
    }

    /// The watch showed a change of an instance's mark: if it is not what we want, look
    /// again at the next tick (by then a concurrent owner change has settled).
    fn mark_changed(&mut self, item: &Item) {
        let me = &self.config.me;
        let Some(slot) = self.slots.get_mut(item) else {
            return;
        };
        let guard = self.view.instances.get(item).map_or(0, |r| r.mod_revision);
        let ours = match self.view.marks.get(item) {
            None => slot.status == Status::Pending,
            Some(m) => {
                let status = match m.value.status {
                    HealthStatus::Passing => Status::Passing,
                    HealthStatus::Critical => Status::Critical,
                };
                &m.value.checker == me && status == slot.status && m.value.observed_mod_rev == guard
            }
        };
        if !ours && slot.sent.is_some() {
            slot.dirty = true;
        }
    }

    /// Asks the writer for whatever makes etcd show this checker's verdict.
    fn reconcile(&mut self, item: &Item) {
        let Some(rec) = self.view.instances.get(item) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(item) else {
            return;
        };
        let guard = rec.mod_revision;
        if guard == slot.stale_guard {
            return;
        }
        let lease_generation = self.lease.map_or(0, |l| l.generation);
        let kind = match slot.status {
            Status::Pending => {
                // A mark about an earlier registration must not make the new one routable.
                let stale = self
                    .view
                    .marks
                    .get(item)
                    .is_some_and(|m| m.value.observed_mod_rev < rec.create_revision);
                if !stale {
                    return;
                }
                WriteKind::Unmark
            }
            _ if !slot.confirmed => return,
            status => WriteKind::Mark(Health {
                status: if status == Status::Passing {
                    HealthStatus::Passing
                } else {
                    HealthStatus::Critical
                },
                since: slot.since,
                checker: self.config.me.clone(),
                consecutive: slot.consecutive,
                output: truncate(&slot.output, 256),
                observed_mod_rev: guard,
            }),
        };
        let lease_generation = if matches!(kind, WriteKind::Mark(_)) {
            lease_generation
        } else {
            0
        };
        let same = slot.sent.is_some_and(|w| {
            w.status == slot.status
                && w.guard == guard
                && (!w.done || w.lease_generation == lease_generation)
        });
        if same && !slot.dirty {
            return;
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        slot.sent = Some(Wish {
            status: slot.status,
            guard,
            lease_generation,
            ticket,
            done: false,
        });
        slot.dirty = false;
        let _ = self.writes.send(WriteRequest {
            item: item.clone(),
            ticket,
            guard,
            kind,
        });
    }

    /// Periodic work: marks found missing or foreign, the slow refresh, deregistration.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let now_ms = now_millis();
        let mut todo = Vec::new();
        for (item, slot) in &mut self.slots {
            let refresh_due = self.config.mark_refresh.is_some()
                && slot.sent.is_some()
                && slot.status != Status::Pending
                && now >= slot.refresh_at;
            if refresh_due {
                slot.dirty = true;
            }
            if slot.dirty {
                todo.push(item.clone());
            }
            if slot.status == Status::Critical
                && slot.confirmed
                && !slot.deregister_sent
                && let Some(after) = slot.target.deregister_after
            {
                let after = after.max(self.config.min_deregister_after);
                if now_ms.saturating_sub(slot.since) >= after.as_millis() as u64
                    && let Some(rec) = self.view.instances.get(item)
                {
                    slot.deregister_sent = true;
                    self.next_ticket += 1;
                    let _ = self.writes.send(WriteRequest {
                        item: item.clone(),
                        ticket: self.next_ticket,
                        guard: rec.mod_revision,
                        kind: WriteKind::Deregister,
                    });
                }
            }
        }
        for item in todo {
            self.reconcile(&item);
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
