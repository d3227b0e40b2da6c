//! Prometheus metrics of one checker, in its own registry (several checkers can share a
//! process in tests).
//!
//! Probe counters are looked up once per service and shared by that service's probe tasks,
//! so a probe costs a few atomic adds and no label hashing.

use std::sync::Arc;

use catalog::WatchStats;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::probe::Verdict;
use crate::rules::Status;

/// Every metric the checker exports.
pub struct Metrics {
    registry: Registry,
    probes: IntCounterVec,
    probe_seconds: HistogramVec,
    pub transitions: IntCounterVec,
    pub instances: IntGaugeVec,
    pub write_errors: IntCounter,
    pub writes: IntCounterVec,
    pub lease_losses: IntCounter,
    pub live_checkers: IntGauge,
    pub loop_lag: Histogram,
    pub stalls: IntCounter,
    pub discarded: IntCounter,
    watch_staleness: prometheus::Gauge,
    watch_malformed: IntCounter,
    watch_resets: IntCounter,
    watch_reconnects: IntCounter,
}

/// The probe metrics of one service, shared by its probe tasks.
pub struct ServiceMetrics {
    by_verdict: [IntCounter; 4],
    seconds: Histogram,
    discarded: IntCounter,
}

impl ServiceMetrics {
    pub fn observe(&self, verdict: Verdict, seconds: f64) {
        self.by_verdict[verdict.index()].inc();
        self.seconds.observe(seconds);
    }

    /// A probe timeout dropped because the checker was starved while it ran.
    pub fn discard(&self) {
        self.discarded.inc();
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails on an invalid name or a duplicate registration: a programming error caught
    // by every test that builds `Metrics`.
    r.expect("metric definition")
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let probes = must(IntCounterVec::new(
            Opts::new(
                "healthcheck_probes_total",
                "Probes run, by service and result (pass, fail, timeout, error).",
            ),
            &["service", "result"],
        ));
        let probe_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "healthcheck_probe_duration_seconds",
                "Time one probe took, by service.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["service"],
        ));
        let transitions = must(IntCounterVec::new(
            Opts::new(
                "healthcheck_transitions_total",
                "Status changes, by service and new status.",
            ),
            &["service", "to"],
        ));
        let instances = must(IntGaugeVec::new(
            Opts::new(
                "healthcheck_instances",
                "Instances this checker owns, by status (pending, passing, critical).",
            ),
            &["state"],
        ));
        let write_errors = must(IntCounter::new(
            "healthcheck_etcd_write_errors_total",
            "etcd writes that failed and will be retried.",
        ));
        let writes = must(IntCounterVec::new(
            Opts::new(
                "healthcheck_etcd_writes_total",
                "etcd writes done, by kind (mark, unmark, deregister) and result (applied, stale).",
            ),
            &["kind", "result"],
        ));
        let lease_losses = must(IntCounter::new(
            "healthcheck_lease_losses_total",
            "Times the checker lease was lost and granted again.",
        ));
        let live_checkers = must(IntGauge::new(
            "healthcheck_live_checkers",
            "Checker replicas sharing the work, this one included.",
        ));
        let loop_lag = must(Histogram::with_opts(
            HistogramOpts::new(
                "healthcheck_event_loop_lag_seconds",
                "How late the checker's event loop woke a 25 ms ticker: time the checker was starved.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        ));
        let stalls = must(IntCounter::new(
            "healthcheck_stalls_total",
            "Times the event loop woke 250 ms or more late (stopped, throttled or overloaded checker).",
        ));
        let discarded = must(IntCounter::new(
            "healthcheck_probes_discarded_total",
            "Probe timeouts not counted because the checker was starved during the probe; each is redone.",
        ));
        let watch_staleness = must(prometheus::Gauge::new(
            "healthcheck_watch_staleness_seconds",
            "Time since etcd last confirmed the catalog watch is current (-1 before the first list).",
        ));
        let watch_malformed = must(IntCounter::new(
            "healthcheck_watch_malformed_total",
            "Catalog entries skipped because they could not be decoded.",
        ));
        let watch_resets = must(IntCounter::new(
            "healthcheck_watch_resets_total",
            "Full relists of the catalog.",
        ));
        let watch_reconnects = must(IntCounter::new(
            "healthcheck_watch_reconnects_total",
            "Catalog watch streams re-opened after an error.",
        ));
        reg(Box::new(probes.clone()));
        reg(Box::new(probe_seconds.clone()));
        reg(Box::new(transitions.clone()));
        reg(Box::new(instances.clone()));
        reg(Box::new(write_errors.clone()));
        reg(Box::new(writes.clone()));
        reg(Box::new(lease_losses.clone()));
        reg(Box::new(live_checkers.clone()));
        reg(Box::new(loop_lag.clone()));
        reg(Box::new(stalls.clone()));
        reg(Box::new(discarded.clone()));
        reg(Box::new(watch_staleness.clone()));
        reg(Box::new(watch_malformed.clone()));
        reg(Box::new(watch_resets.clone()));
        reg(Box::new(watch_reconnects.clone()));
        for s in [Status::Pending, Status::Passing, Status::Critical] {
            instances.with_label_values(&[s.as_str()]).set(0);
        }
        Arc::new(Self {
            registry,
            probes,
            probe_seconds,
            transitions,
            instances,
            write_errors,
            writes,
            lease_losses,
            live_checkers,
            loop_lag,
            stalls,
            discarded,
            watch_staleness,
            watch_malformed,
            watch_resets,
            watch_reconnects,
        })
    }

    /// The probe counters of `service`.
    pub fn service(&self, service: &str) -> Arc<ServiceMetrics> {
        Arc::new(ServiceMetrics {
            by_verdict: Verdict::ALL.map(|v| self.probes.with_label_values(&[service, v.as_str()])),
            seconds: self.probe_seconds.with_label_values(&[service]),
            discarded: self.discarded.clone(),
        })
    }

    pub fn state_gauge(&self, status: Status) -> IntGauge {
        self.instances.with_label_values(&[status.as_str()])
    }

    /// The text exposition, after copying the watcher's own counters in.
    pub fn render(&self, watch: &WatchStats) -> String {
        self.watch_staleness
            .set(watch.since_sync().map_or(-1.0, |d| d.as_secs_f64()));
        catch_up(&self.watch_malformed, watch.malformed());
        catch_up(&self.watch_resets, watch.resets());
        catch_up(&self.watch_reconnects, watch.reconnects());
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for valid metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Moves a counter up to a total kept elsewhere.
fn catch_up(counter: &IntCounter, total: u64) {
    let have = counter.get();
    if total > have {
        counter.inc_by(total - have);
    }
}
