//! Prometheus metrics of the L4 features (tcp listeners, TLS, PROXY protocol), registered
//! in the balancer's one registry next to `metrics::Metrics`.

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
        }
    }
}
