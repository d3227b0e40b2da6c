//! Prometheus metrics of `render`, and the admin HTTP server that exposes them.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// The stages a render can fail in, the `stage` label of the failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading the catalog from etcd.
    List,
    /// Evaluating the template.
    Render,
    /// Staging, installing or backing up the file.
    Write,
    Check,
    Reload,
    /// Restoring the previous file (or reloading it) after a failed reload.
    Rollback,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::List => "list",
            Stage::Render => "render",
            Stage::Write => "write",
            Stage::Check => "check",
            Stage::Reload => "reload",
            Stage::Rollback => "rollback",
        }
    }
}

/// Every metric `render` exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Templates evaluated, by resource.
    pub renders: IntCounterVec,
    /// Destination files replaced (bytes changed and checks passed), by resource.
    pub writes: IntCounterVec,
    /// Failed runs, by resource and stage.
    pub failures: IntCounterVec,
    /// Unix time of the last run that left the destination up to date, by resource.
    pub last_success: GaugeVec,
    /// Successful reload commands, by resource.
    pub reloads: IntCounterVec,
    /// Rollbacks after a failed reload, by resource.
    pub rollbacks: IntCounterVec,
    /// Catalog entries skipped because they could not be decoded.
    pub malformed: IntCounter,
    /// etcd revision of the last listing used.
    pub revision: IntGauge,
    /// Template resources loaded.
    pub resources: IntGauge,
    /// Failed re-reads of the template resources (SIGHUP); the old set stays active.
    pub config_reload_failures: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let renders = counter_vec(
            "wharf_render_renders_total",
            "Templates evaluated.",
            &["resource"],
        );
        let writes = counter_vec(
            "wharf_render_writes_total",
            "Destination files replaced.",
            &["resource"],
        );
        let failures = counter_vec(
            "wharf_render_failures_total",
            "Failed runs by stage (list, render, write, check, reload, rollback).",
            &["resource", "stage"],
        );
        let reloads = counter_vec(
            "wharf_render_reloads_total",
            "Successful reload commands.",
            &["resource"],
        );
        let rollbacks = counter_vec(
            "wharf_render_rollbacks_total",
            "Previous files restored after a failed reload.",
            &["resource"],
        );
        let last_success = GaugeVec::new(
            Opts::new(
                "wharf_render_last_success_timestamp_seconds",
                "Unix time of the last run that left the destination up to date.",
            ),
            &["resource"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_success.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        Self {
            renders,
            writes,
            failures,
            last_success,
            reloads,
            rollbacks,
            malformed: counter(
                "wharf_render_malformed_entries_total",
                "Catalog entries skipped because they could not be decoded.",
            ),
            revision: gauge(
                "wharf_render_catalog_revision",
                "etcd revision of the last listing rendered from.",
            ),
            resources: gauge("wharf_render_resources", "Template resources loaded."),
            config_reload_failures: counter(
                "wharf_render_config_reload_failures_total",
                "Re-reads of the template resources that failed; the previous set stays active.",
            ),
            registry,
        }
    }

    pub fn failed(&self, resource: &str, stage: Stage) {
        self.failures
            .with_label_values(&[resource, stage.as_str()])
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `GET /metrics` and `GET /healthz` until `shutdown` completes.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        continue;
                    }
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
                    });
                    let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    if let Err(e) = conn {
                        debug!(error = %e, "admin connection ended with an error");
                    }
                });
            }
        }
    }
}

fn answer(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.encode(),
        ),
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
