//! Client-facing listeners (HTTP/1.1 + h2c on one port) and the admin server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use catalog::WatchStats;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::body::RespBody;
use crate::config::ListenerConfig;
use crate::h1_server;
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
        // An accept is traffic: it wakes sleeping busy pollers.
        crate::busy_poll::mark();
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

/// Limits of the own HTTP/1 server loop (see `h1_server`).
pub struct H1Settings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// How a listener serves its connections: HTTP/1 by the balancer's own loop, h2c by
/// hyper's HTTP/2 server. Swapped as a whole on reload.
pub struct ConnSettings {
    pub h1: H1Settings,
    pub h2: http2::Builder<TokioExecutor>,
}

/// The connection settings of a listener.
pub fn conn_builder(l: &ListenerConfig) -> ConnSettings {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(l.max_header_bytes as u32)
        .max_concurrent_streams(256);
    ConnSettings {
        h1: H1Settings {
            header_read_timeout: l.header_read_timeout,
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
        },
        h2,
    }
}

/// Serves an h2c (prior knowledge) connection with hyper until it closes; on shutdown,
/// GOAWAY then the streams in flight finish.
pub async fn serve_h2<IO>(
    io: IO,
    info: Arc<ConnInfo>,
    settings: &ConnSettings,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| proxy::handle(req, info.clone()));
    let conn = settings.h2.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = until_true(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A running listener: its accept loop stops when `stop` is set; its connections then
/// finish their current requests (graceful), or keep going on a reload.
pub struct ListenerHandle {
    pub name: String,
    pub bind: std::net::SocketAddr,
    pub protocol: crate::config::ListenerProtocol,
    pub builder: Arc<ArcSwap<ConnSettings>>,
    /// PROXY / TLS steps, read per accepted connection; replaced on SIGHUP when changed.
    pub setup: crate::client_io::SharedSetup,
    pub stop: watch::Sender<bool>,
    /// `max_connections`, changed in place by a SIGHUP.
    pub limit: Arc<crate::conn_limit::ConnLimit>,
}

/// Accepts connections until `stop` turns true or `shutdown` does; on `shutdown`,
/// connections are shut down gracefully.
#[allow(clippy::too_many_arguments)]
pub fn spawn_listener(
    listener: TcpListener,
    name: Arc<str>,
    builder: Arc<ArcSwap<ConnSettings>>,
    shared: Arc<Shared>,
    tracker: Arc<ConnTracker>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    setup: crate::client_io::SharedSetup,
    limit: Arc<crate::conn_limit::ConnLimit>,
) {
    let active = shared
        .metrics
        .active_connections
        .with_label_values(&[&name]);
    // The destination of PROXY headers sent upstream: the bound address, or per
    // connection (one getsockname) for a wildcard bind.
    let bound = listener.local_addr().ok();
    let local_per_conn = bound.is_none_or(|a| a.ip().is_unspecified());
    tokio::spawn(async move {
        // One wait for the stop signal, kept across accepts (not a new watch waiter per
        // accepted connection); polled only when no connection is waiting.
        let stopped = until_true(&mut stop);
        tokio::pin!(stopped);
        loop {
            if !limit.has_room() {
                tokio::select! {
                    () = limit.room() => {}
                    _ = &mut stopped => break,
                }
            }
            let (stream, peer) = tokio::select! {
                biased;
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut stopped => break,
            };
            // The setup of the moment (a SIGHUP may replace it; this connection keeps its).
            let (name, shared, setup) = (name.clone(), shared.clone(), setup.load_full());
            let builder = builder.load_full();
            let guard = tracker.enter();
            let counted = limit.enter();
            let active = active.clone();
            let shutdown = shutdown.clone();
            // Boxed: the connection's future is several KiB, and tokio moves a task's
            // stage in place when it finishes — a pointer is cheaper.
            tokio::spawn(Box::pin(async move {
                let _guard = (guard, counted);
                // PROXY header and TLS first: `peer` becomes the real client.
                let Some(accepted) = setup.accept(stream, peer).await else {
                    return;
                };
                let (stream, peer) = (accepted.io, accepted.client);
                let mut info = ConnInfo::new(name, peer, shared);
                info.tls = stream.is_tls();
                info.client_cert = stream
                    .client_cert()
                    .map(crate::tls::client_auth::forwarded_client_cert);
                info.local = if accepted.destination.is_some() {
                    accepted.destination
                } else if local_per_conn {
                    stream.tcp().local_addr().ok()
                } else {
                    bound
                };
                let info = Arc::new(info);
                active.inc();
                h1_server::serve(stream, info, builder, shutdown).await;
                active.dec();
            }));
        }
        tracing::info!(listener = %name, "stopped accepting");
    });
}

/// Resolves once the flag is true (or its sender is gone); holds no borrow across awaits.
pub(crate) async fn until_true(rx: &mut watch::Receiver<bool>) {
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

/// Serves the admin port until `stop` turns true (a self-upgrade handed it over): then
/// the socket is closed (the new process holds its own descriptor of it) and each admin
/// connection closes after its current answer (a status stream ends; its browser
/// reconnects, to the new process).
pub fn spawn_admin(listener: TcpListener, st: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = until_true(&mut stop) => break,
            };
            let (st, mut stop) = (st.clone(), stop.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| crate::status::http::admin(req, st.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = until_true(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        // A status stream never ends by itself.
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                    }
                }
            });
        }
        tracing::info!("admin: stopped accepting");
    });
}
