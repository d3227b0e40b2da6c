//! Client-facing listeners (HTTP/1.1 + h2c on one port) and the admin server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use catalog::WatchStats;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::body::RespBody;
use crate::config::ListenerConfig;
use crate::proxy::{self, ConnInfo, Shared};

/// Counts open client connections so shutdown can wait for them.
#[derive(Default)]
pub struct ConnTracker {
    open: AtomicUsize,
    idle: Notify,
}

impl ConnTracker {
    pub fn enter(self: &Arc<Self>) -> TrackGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        TrackGuard(self.clone())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits until no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct TrackGuard(Arc<ConnTracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// hyper's default (and cheapest) HTTP/1 header-count limit.
const HYPER_MAX_HEADERS: usize = 100;

/// The hyper server settings of a listener.
pub fn conn_builder(l: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.header_read_timeout)
        .max_buf_size(l.max_header_bytes)
        // One contiguous write per response (head + small body copied together) instead
        // of a writev over a queue of buffers.
        .writev(false)
        .keep_alive(true);
    // hyper's own limit is 100 headers, parsed into an uninitialised stack array; setting
    // any limit makes it fill a fresh array per request instead, so only set other values.
    if l.max_headers != HYPER_MAX_HEADERS {
        b.http1().max_headers(l.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(l.max_header_bytes as u32)
        .max_concurrent_streams(256);
    b
}

/// A running listener: its accept loop stops when `stop` is set; its connections then
/// finish their current requests (graceful), or keep going on a reload.
pub struct ListenerHandle {
    pub name: String,
    pub bind: std::net::SocketAddr,
    pub builder: Arc<ArcSwap<auto::Builder<TokioExecutor>>>,
    pub stop: watch::Sender<bool>,
}

/// Accepts connections until `stop` turns true or `shutdown` does; on `shutdown`,
/// connections are shut down gracefully.
#[allow(clippy::too_many_arguments)]
pub fn spawn_listener(
    listener: TcpListener,
    name: Arc<str>,
    builder: Arc<ArcSwap<auto::Builder<TokioExecutor>>>,
    shared: Arc<Shared>,
    tracker: Arc<ConnTracker>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    setup: Arc<crate::client_io::ClientSetup>,
) {
    let active = shared
        .metrics
        .active_connections
        .with_label_values(&[&name]);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = until_true(&mut stop) => break,
            };
            let _ = stream.set_nodelay(true);
            let (name, shared, setup) = (name.clone(), shared.clone(), setup.clone());
            let builder = builder.load_full();
            let guard = tracker.enter();
            let active = active.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _guard = guard;
                // PROXY header and TLS first: `peer` becomes the real client.
                let Some((stream, peer)) = setup.accept(stream, peer).await else {
                    return;
                };
                let mut info = ConnInfo::new(name, peer, shared);
                info.tls = stream.is_tls();
                let info = Arc::new(info);
                active.inc();
                let svc =
                    service_fn(move |req: Request<Incoming>| proxy::handle(req, info.clone()));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = until_true(&mut shutdown) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                active.dec();
            });
        }
        tracing::info!(listener = %name, "stopped accepting");
    });
}

async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// State the admin server reads.
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub watch: ArcSwap<Option<Arc<WatchStats>>>,
    pub shutting_down: watch::Receiver<bool>,
    /// Status page data (`/`, `/status`, `/api/status`): see `crate::status`.
    pub status: Arc<crate::status::StatusHub>,
}

impl AdminState {
    fn refresh(&self) {
        let m = &self.shared.metrics;
        if let Some(stats) = self.watch.load().as_ref() {
            let staleness = stats.since_sync().map_or(-1.0, |d| d.as_secs_f64());
            m.discovery_staleness.set(staleness);
            sync_counter(&m.discovery_events, stats.events());
            sync_counter(&m.discovery_malformed, stats.malformed());
            sync_counter(&m.discovery_resets, stats.resets());
        }
        m.discovery_revision.set(self.shared.table.load().revision);
    }
}

fn sync_counter(c: &prometheus::IntCounter, v: u64) {
    let cur = c.get();
    if v > cur {
        c.inc_by(v - cur);
    }
}

pub(crate) async fn admin(
    req: Request<Incoming>,
    st: Arc<AdminState>,
) -> Result<Response<RespBody>, std::convert::Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => {
            st.refresh();
            let mut r = Response::new(RespBody::full(st.shared.metrics.encode()));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/healthz" => {
            if *st.shutting_down.borrow() {
                proxy::plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n", false)
            } else {
                proxy::plain(StatusCode::OK, "ok\n", false)
            }
        }
        _ => proxy::plain(
            StatusCode::NOT_FOUND,
            "try / (status page), /api/status, /metrics or /healthz\n",
            false,
        ),
    })
}

pub fn spawn_admin(listener: TcpListener, st: Arc<AdminState>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| crate::status::http::admin(req, st.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
