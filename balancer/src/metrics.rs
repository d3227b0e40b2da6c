//! Prometheus metrics. Label sets are bounded: listener, service, version, code class,
//! instance id (bounded by the catalog); never paths or client addresses.
//!
//! The request path never looks a label set up: the routing table resolves the handles it
//! needs (`ClassCounters`, histograms) when it is built, so a request only bumps atomics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of one balancer process.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub connect_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub ejections: IntCounterVec,
    pub active_connections: IntGaugeVec,
    /// `balancer_listener_full_total{listener}`: accepting paused at `max_connections`.
    pub listener_full: IntCounterVec,
    /// `balancer_rate_limited_total{listener,service}`: requests answered 429 by a route's
    /// `rate_limit`.
    pub rate_limited: IntCounterVec,
    /// `balancer_mirrored_requests_total{service,version,result}`: copies sent by routes'
    /// `mirror` (result: 2xx-5xx, error, timeout, no_instance, skipped).
    pub mirrored: IntCounterVec,
    /// `balancer_queued_requests_total{service}`: requests that waited for an instance
    /// below its `max_requests`.
    pub queued: IntCounterVec,
    /// `balancer_queue_timeouts_total{service}`: of those, the ones answered 503 after
    /// `queue_timeout`.
    pub queue_timeouts: IntCounterVec,
    pub backends: IntGaugeVec,
    pub backend_up: IntGaugeVec,
    pub discovery_events: IntCounter,
    pub discovery_malformed: IntCounter,
    pub discovery_resets: IntCounter,
    pub discovery_staleness: prometheus::Gauge,
    pub discovery_revision: IntGauge,
    pub table_builds: IntCounter,
    pub reloads: IntCounterVec,
    pub busy_polling_workers: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let requests = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_requests_total",
                    "Client requests answered, by listener, service, version and status class.",
                ),
                &["listener", "service", "version", "code"],
            )
            .unwrap(),
        );
        let duration = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "balancer_request_duration_seconds",
                    "Time from request head to response head, by the version that answered \
                     (\"none\" when no instance was picked).",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ]),
                &["listener", "service", "version"],
            )
            .unwrap(),
        );
        let connect_errors = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_upstream_connect_errors_total",
                    "Failed connection attempts to upstream instances.",
                ),
                &["service"],
            )
            .unwrap(),
        );
        let retries = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_retries_total",
                    "Requests sent again to another instance.",
                ),
                &["service", "reason"],
            )
            .unwrap(),
        );
        let ejections = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_outlier_ejections_total",
                    "Instances ejected by passive outlier detection.",
                ),
                &["service"],
            )
            .unwrap(),
        );
        let active_connections = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "balancer_active_connections",
                    "Open client connections per listener.",
                ),
                &["listener"],
            )
            .unwrap(),
        );
        let listener_full = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_listener_full_total",
                    "Times a listener stopped accepting at its max_connections (new connections wait in the listen backlog).",
                ),
                &["listener"],
            )
            .unwrap(),
        );
        let rate_limited = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_rate_limited_total",
                    "Requests answered 429 by a route's rate_limit (per client), by listener and service.",
                ),
                &["listener", "service"],
            )
            .unwrap(),
        );
        let queued = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_queued_requests_total",
                    "Requests that waited because every instance of their service was at its max_requests.",
                ),
                &["service"],
            )
            .unwrap(),
        );
        let queue_timeouts = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_queue_timeouts_total",
                    "Queued requests answered 503 because no instance had a free slot within queue_timeout.",
                ),
                &["service"],
            )
            .unwrap(),
        );
        let mirrored = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_mirrored_requests_total",
                    "Copies of requests sent by routes' mirror to one version, by the copy's result (answers are thrown away).",
                ),
                &["service", "version", "result"],
            )
            .unwrap(),
        );
        let backends = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "balancer_backends",
                    "Instances per service and state (routable, draining, critical, pending).",
                ),
                &["service", "state"],
            )
            .unwrap(),
        );
        let backend_up = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "balancer_backend_up",
                    "1 when the instance is routable (label instance_id: Prometheus owns `instance`).",
                ),
                &["service", "instance_id"],
            )
            .unwrap(),
        );
        let discovery_events = reg(
            &r,
            IntCounter::new(
                "balancer_discovery_events_total",
                "Catalog changes applied from etcd.",
            )
            .unwrap(),
        );
        let discovery_malformed = reg(
            &r,
            IntCounter::new(
                "balancer_discovery_malformed_total",
                "Catalog entries skipped because they could not be decoded.",
            )
            .unwrap(),
        );
        let discovery_resets = reg(
            &r,
            IntCounter::new(
                "balancer_discovery_resets_total",
                "Full relists of the catalog.",
            )
            .unwrap(),
        );
        let discovery_staleness = reg(
            &r,
            prometheus::Gauge::new(
                "balancer_discovery_staleness_seconds",
                "Seconds since etcd last confirmed the catalog is current (-1 before the first list).",
            )
            .unwrap(),
        );
        let discovery_revision = reg(
            &r,
            IntGauge::new(
                "balancer_discovery_revision",
                "etcd revision of the routing table.",
            )
            .unwrap(),
        );
        let table_builds = reg(
            &r,
            IntCounter::new(
                "balancer_routing_table_swaps_total",
                "Routing tables published.",
            )
            .unwrap(),
        );
        let reloads = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "balancer_config_reloads_total",
                    "Configuration reloads (SIGHUP) by result.",
                ),
                &["result"],
            )
            .unwrap(),
        );
        let busy_polling_workers = reg(
            &r,
            IntGauge::new(
                "balancer_busy_polling_workers",
                "Worker threads spinning instead of sleeping (busy_polling = true, while traffic flows).",
            )
            .unwrap(),
        );
        // Both results exist from the start, so `increase()` and alerts see the first one.
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        Self {
            registry: r,
            requests,
            duration,
            connect_errors,
            retries,
            ejections,
            active_connections,
            listener_full,
            rate_limited,
            mirrored,
            queued,
            queue_timeouts,
            backends,
            backend_up,
            discovery_events,
            discovery_malformed,
            discovery_resets,
            discovery_staleness,
            discovery_revision,
            table_builds,
            reloads,
            busy_polling_workers,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Counters of one listener × service × version, one per status class, and the
    /// version's latency histogram (what a rollout gate compares between versions).
    pub fn classes(&self, listener: &str, service: &str, version: &str) -> ClassCounters {
        let c = |code| {
            self.requests
                .with_label_values(&[listener, service, version, code])
        };
        ClassCounters {
            classes: CLASSES.map(c),
            duration: self
                .duration
                .with_label_values(&[listener, service, version]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Pre-resolved request counters by status class, and the duration histogram, of one
/// listener × service × version.
#[derive(Clone)]
pub struct ClassCounters {
    classes: [IntCounter; 5],
    duration: Histogram,
}

/// The status classes counted, as labels; [`class_of`] indexes them.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index in [`CLASSES`] of `status`.
#[inline]
pub fn class_of(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

impl ClassCounters {
    pub fn inc(&self, status: u16) {
        let i = class_of(status);
        self.classes[i].inc();
    }

    /// Counts an answer and the time it took.
    pub fn record(&self, status: u16, seconds: f64) {
        self.inc(status);
        self.duration.observe(seconds);
    }
}
