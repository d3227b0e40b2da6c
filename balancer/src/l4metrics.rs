//! Prometheus metrics of the L4 features (tcp listeners, TLS, PROXY protocol), registered
//! in the balancer's one registry next to `metrics::Metrics`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct L4Metrics {
    /// `balancer_tcp_connections_total{listener,service,result}`: result = `ok`,
    /// `no_instance`, `connect_error`.
    pub tcp_connections: IntCounterVec,
    pub tcp_active: IntGaugeVec,
    /// `balancer_tcp_bytes_total{listener,direction}`: `in` = client → upstream.
    pub tcp_bytes: IntCounterVec,
    /// `balancer_tcp_closed_total{listener,reason}`: `idle_timeout`, `drain_deadline`.
    pub tcp_closed: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub tls_expiry: GaugeVec,
    /// `balancer_tls_crl_next_update_timestamp_seconds{listener}`: the earliest
    /// `nextUpdate` of the client-certificate CRLs read (absent without a CRL).
    pub tls_crl_next_update: GaugeVec,
    pub proxy_rejected: IntCounterVec,
    /// `balancer_listener_refused_total{listener}`: connections from a source outside the
    /// listener's `allow_sources`, closed at once.
    pub source_refused: IntCounterVec,
    /// `balancer_upstream_tls_certificate_reloads_total{service,result}`: client
    /// certificates presented to instances, reloaded from disk (ok, error).
    pub upstream_tls_reloads: IntCounterVec,
    /// `balancer_upstream_tls_certificate_expiry_seconds{service}`, through
    /// [`UpstreamCertExpiry`].
    pub upstream_tls_expiry: UpstreamCertExpiry,
}

/// The expiry gauge of the client certificates presented to instances. A reload starts a
/// new watch per service while the old one may still run (until no connection or route
/// holds the old options), and a failed reload starts one that ends at once: the gauge
/// shows the certificate of the newest watch still running, and its series goes once no
/// watch of the service is left.
pub struct UpstreamCertExpiry {
    gauge: GaugeVec,
    next_id: AtomicU64,
    /// Running watches by service: id → `notAfter` (Unix time).
    live: Mutex<HashMap<String, BTreeMap<u64, i64>>>,
}

impl UpstreamCertExpiry {
    /// An id for a new watch: later watches get larger ones.
    pub fn watch_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Watch `id` of `service` has a certificate valid until `not_after`; `now` in Unix time.
    pub fn set(&self, service: &str, id: u64, not_after: i64, now: i64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let watches = live.entry(service.to_owned()).or_default();
        watches.insert(id, not_after);
        self.publish(service, watches, now);
    }

    /// Watch `id` of `service` ended.
    pub fn end(&self, service: &str, id: u64, now: i64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(watches) = live.get_mut(service) else {
            return;
        };
        watches.remove(&id);
        if watches.is_empty() {
            live.remove(service);
            let _ = self.gauge.remove_label_values(&[service]);
        } else {
            self.publish(service, watches, now);
        }
    }

    fn publish(&self, service: &str, watches: &BTreeMap<u64, i64>, now: i64) {
        if let Some((_, not_after)) = watches.last_key_value() {
            self.gauge
                .with_label_values(&[service])
                .set((not_after - now) as f64);
        }
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl L4Metrics {
    pub fn register(r: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        Self {
            tcp_connections: counter(
                "balancer_tcp_connections_total",
                "TCP client connections by listener, service and result (ok, no_instance, connect_error).",
                &["listener", "service", "result"],
            ),
            tcp_active: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "balancer_tcp_active_connections",
                        "TCP connections being proxied.",
                    ),
                    &["listener"],
                )
                .unwrap(),
            ),
            tcp_bytes: counter(
                "balancer_tcp_bytes_total",
                "Bytes proxied by tcp listeners; direction in = client to upstream, out = upstream to client.",
                &["listener", "direction"],
            ),
            tcp_closed: counter(
                "balancer_tcp_closed_total",
                "TCP connections closed by the balancer (idle_timeout, drain_deadline).",
                &["listener", "reason"],
            ),
            tls_handshakes: counter(
                "balancer_tls_handshakes_total",
                "TLS handshakes with clients by listener and result (ok, error, timeout).",
                &["listener", "result"],
            ),
            tls_reloads: counter(
                "balancer_tls_certificate_reloads_total",
                "Certificate (re)loads from disk by listener and result; on error the previous certificate stays.",
                &["listener", "result"],
            ),
            tls_expiry: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "balancer_tls_certificate_expiry_seconds",
                        "Seconds until the served certificate expires (negative: expired).",
                    ),
                    &["listener", "certificate"],
                )
                .unwrap(),
            ),
            tls_crl_next_update: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "balancer_tls_crl_next_update_timestamp_seconds",
                        "Unix time of the earliest nextUpdate of a listener's client-certificate CRLs; past it, the clients they cover are refused until a fresh CRL is read.",
                    ),
                    &["listener"],
                )
                .unwrap(),
            ),
            proxy_rejected: counter(
                "balancer_proxy_protocol_rejected_total",
                "Connections rejected for their PROXY protocol header (untrusted, missing, malformed).",
                &["listener", "reason"],
            ),
            source_refused: counter(
                "balancer_listener_refused_total",
                "Connections closed at once because their client is outside the listener's allow_sources.",
                &["listener"],
            ),
            upstream_tls_reloads: counter(
                "balancer_upstream_tls_certificate_reloads_total",
                "Reloads from disk of the client certificate presented to a service's instances, by result; on error the previous certificate stays.",
                &["service", "result"],
            ),
            upstream_tls_expiry: UpstreamCertExpiry {
                gauge: reg(
                    r,
                    GaugeVec::new(
                        Opts::new(
                            "balancer_upstream_tls_certificate_expiry_seconds",
                            "Seconds until the client certificate presented to a service's instances expires (negative: expired).",
                        ),
                        &["service"],
                    )
                    .unwrap(),
                ),
                next_id: AtomicU64::new(0),
                live: Mutex::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;

    /// The gauge's value for `service`, read without creating the series.
    fn gauge(m: &L4Metrics, service: &str) -> Option<f64> {
        let families = m.upstream_tls_expiry.gauge.collect();
        let series = families.first()?.get_metric();
        series
            .iter()
            .find(|s| s.get_label().iter().any(|l| l.value() == service))
            .map(|s| s.get_gauge().get_value())
    }

    #[test]
    fn the_newest_running_watch_shows_and_the_series_goes_with_the_last() {
        let m = L4Metrics::register(&Registry::new());
        let e = &m.upstream_tls_expiry;
        let (old, new) = (e.watch_id(), e.watch_id());
        e.set("db", old, 1_000, 100);
        assert_eq!(gauge(&m, "db"), Some(900.0));
        // A reload's watch takes over while the old one still runs (and still polls).
        e.set("db", new, 5_000, 100);
        e.set("db", old, 1_000, 101);
        assert_eq!(gauge(&m, "db"), Some(4_899.0));
        // The new one ends first (a reload that failed later): the old one shows again.
        e.end("db", new, 102);
        assert_eq!(gauge(&m, "db"), Some(898.0));
        e.end("db", old, 103);
        assert_eq!(gauge(&m, "db"), None);
    }
}
