//! The agent's Prometheus metrics and its admin HTTP server (`/metrics`, `/healthz`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing::debug;

pub struct Metrics {
    registry: Registry,
    pub containers_running: IntGauge,
    pub container_starts: IntCounter,
    pub container_exits: IntCounterVec,
    pub registrations: IntCounter,
    pub deregistrations: IntCounter,
    pub etcd_errors: IntCounter,
    pub lease_regrants: IntCounter,
    pub api_requests: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |n: &str, h: &str| {
            let g = IntGauge::new(n, h).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |n: &str, h: &str| {
            let c = IntCounter::new(n, h).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |n: &str, h: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(n, h), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        Self {
            containers_running: gauge(
                "registrar_containers_running",
                "Containers whose helper is running.",
            ),
            container_starts: counter(
                "registrar_container_starts_total",
                "Container runs started.",
            ),
            container_exits: counter_vec(
                "registrar_container_exits_total",
                "Container runs that ended, by exit code class.",
                &["result"],
            ),
            registrations: counter(
                "registrar_registrations_total",
                "Instances registered in etcd.",
            ),
            deregistrations: counter(
                "registrar_deregistrations_total",
                "Instances removed from etcd.",
            ),
            etcd_errors: counter("registrar_etcd_errors_total", "Failed etcd operations."),
            lease_regrants: counter(
                "registrar_lease_regrants_total",
                "Node leases granted again after a loss.",
            ),
            api_requests: counter_vec(
                "registrar_api_requests_total",
                "Local API requests.",
                &["op"],
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics` and `/healthz` on an already-bound listener until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let resp = match req.uri().path() {
                        "/metrics" => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(metrics.render()))),
                        "/healthz" => {
                            Response::builder().body(Full::new(Bytes::from_static(b"ok\n")))
                        }
                        _ => Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found\n"))),
                    };
                    Ok::<_, Infallible>(resp.expect("static response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
