//! `protocol = "tcp"` listeners: each client connection is streamed to one instance of the
//! listener's service, chosen exactly like an HTTP request's (split, weight, algorithm,
//! health, ejection; the same routing table), with connect retries on other instances.
//!
//! Per connection: PROXY header / TLS from the client (`client_io`), pick + connect
//! (retries), optional PROXY header and TLS to the upstream, then `pump`.

mod low_water;
mod pipes;
pub mod pump;
mod splice;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::client_io::{Accepted, ClientIo, SharedSetup};
use crate::config::LbConfig;
use crate::endpoint::Endpoint;
use crate::l4config::ProxyVersion;
use crate::l4metrics::L4Metrics;
use crate::outlier;
use crate::proxy::Shared;
use crate::proxy_protocol;
use crate::server::{ConnTracker, until_true};
use crate::table::{ListenerSettings, ServiceTable, TcpSettings};
use crate::tls::upstream::{UpstreamTlsClient, UpstreamTlsError};
use crate::upstream_io;
use pump::{End, Meter, Metered};

/// What to do on an upstream connection before streaming: per service, from the config.
#[derive(Default, Clone)]
pub struct UpstreamOpts {
    pub proxy: Option<ProxyVersion>,
    pub tls: Option<UpstreamTlsClient>,
    /// HTTP services only: the instances speak HTTP/2 (`upstream_h2`).
    pub http2: bool,
}

/// Upstream options of every service that has some; swapped on reload.
pub type UpstreamMap = ArcSwap<HashMap<String, Arc<UpstreamOpts>>>;

/// Builds the per-service upstream options of `config` (loads CA files and client
/// certificates). Used by tcp listeners and, through the routing table's routes, by the
/// HTTP upstream client. With `watch`, client certificates follow their files (a task per
/// service, which ends once the options are dropped); without (`--check`), nothing is
/// spawned.
pub fn upstream_map(
    config: &LbConfig,
    watch: Option<&Arc<L4Metrics>>,
) -> Result<HashMap<String, Arc<UpstreamOpts>>, (String, UpstreamTlsError)> {
    let mut names: Vec<String> = config
        .services
        .iter()
        .map(|s| s.name.get_ref().as_str().to_owned())
        .collect();
    names.extend(
        config
            .upstream
            .services
            .iter()
            .map(|s| s.name.get_ref().as_str().to_owned()),
    );
    let tcp = config.tcp_services();
    let mut out = HashMap::new();
    for name in names {
        let crate::l4config::ServiceUpstream { proxy, tls, http2 } = config.service_l4(&name);
        if proxy.is_none() && tls.is_none() && !http2 {
            continue;
        }
        let tls = tls
            .map(|t| {
                let alpn: &[&[u8]] = if tcp.contains(&name) {
                    &[]
                } else if http2 {
                    &[b"h2"]
                } else {
                    &[b"http/1.1"]
                };
                UpstreamTlsClient::new(t, alpn)
            })
            .transpose()
            .map_err(|e| (name.clone(), e))?
            .map(|(client, cert_watch)| {
                if let (Some(w), Some(metrics)) = (cert_watch, watch) {
                    tokio::spawn(w.run(name.clone(), metrics.clone()));
                }
                client
            });
        out.insert(name, Arc::new(UpstreamOpts { proxy, tls, http2 }));
    }
    Ok(out)
}

/// Everything a tcp listener's connections share.
pub struct TcpContext {
    pub name: Arc<str>,
    /// Read per connection: a SIGHUP may replace it.
    pub setup: SharedSetup,
    pub shared: Arc<Shared>,
    pub upstreams: Arc<UpstreamMap>,
    pub metrics: Arc<L4Metrics>,
    /// Pre-resolved per-listener series (no label lookup per connection).
    pub active: prometheus::IntGauge,
    pub bytes_in: prometheus::IntCounter,
    pub bytes_out: prometheus::IntCounter,
    /// `tcp_connections{listener, service, "ok"}` of the service last routed to: one
    /// label lookup per reload instead of per connection.
    ok: ArcSwapOption<(Arc<str>, prometheus::IntCounter)>,
    /// `max_connections`.
    pub limit: Arc<crate::conn_limit::ConnLimit>,
}

impl TcpContext {
    pub fn new(
        name: Arc<str>,
        setup: SharedSetup,
        shared: Arc<Shared>,
        upstreams: Arc<UpstreamMap>,
        metrics: Arc<L4Metrics>,
        limit: Arc<crate::conn_limit::ConnLimit>,
    ) -> Self {
        Self {
            limit,
            active: metrics.tcp_active.with_label_values(&[&name]),
            bytes_in: metrics.tcp_bytes.with_label_values(&[&name, "in"]),
            bytes_out: metrics.tcp_bytes.with_label_values(&[&name, "out"]),
            ok: ArcSwapOption::empty(),
            name,
            setup,
            shared,
            upstreams,
            metrics,
        }
    }

    /// Counts a connection of `service` by result.
    fn count(&self, service: &str, result: &str) {
        self.metrics
            .tcp_connections
            .with_label_values(&[&self.name, service, result])
            .inc();
    }

    /// Counts a connection streamed to `service`.
    fn count_ok(&self, service: &Arc<str>) {
        if let Some(ok) = &*self.ok.load()
            && ok.0 == *service
        {
            ok.1.inc();
            return;
        }
        let counter = self
            .metrics
            .tcp_connections
            .with_label_values(&[&self.name, service, "ok"]);
        counter.inc();
        self.ok.store(Some(Arc::new((service.clone(), counter))));
    }
}

/// Accepts until `stop` (listener removed) or `shutdown` (process draining) turns true.
pub fn spawn_listener(
    listener: TcpListener,
    ctx: Arc<TcpContext>,
    tracker: Arc<ConnTracker>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut shut = shutdown.clone();
        // One future for both stop signals, kept across accepts: re-creating the two
        // watch waits per accepted connection cost more than the accept itself.
        let stopped = async {
            tokio::select! {
                _ = until_true(&mut stop) => {}
                _ = until_true(&mut shut) => {}
            }
        };
        tokio::pin!(stopped);
        loop {
            if !ctx.limit.has_room() {
                tokio::select! {
                    () = ctx.limit.room() => {}
                    _ = &mut stopped => break,
                }
            }
            let (stream, peer) = tokio::select! {
                // Accept first: the stop signals are then polled only when no connection
                // is waiting (tokio's coop budget makes accept pend now and then).
                biased;
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = %ctx.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut stopped => break,
            };
            let guard = tracker.enter();
            let counted = ctx.limit.enter();
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            // Boxed: the connection's future is ~2 KiB (the TLS and PROXY states apart), and
            // tokio moves a task's stage in place when it finishes — a pointer is cheaper.
            tokio::spawn(Box::pin(async move {
                let _guard = (guard, counted);
                handle(&ctx, stream, peer, shutdown).await;
            }));
        }
        tracing::info!(listener = %ctx.name, "stopped accepting");
    });
}

/// Picks and connects, trying other instances on failure (bounded by `retries` and the
/// service's retry budget).
async fn connect(svc: &ServiceTable, s: &ListenerSettings) -> Option<(Arc<Endpoint>, TcpStream)> {
    svc.shared.deposit(s.retry_budget_percent);
    let mut tried = Vec::new();
    for attempt in 0..=s.retries {
        if attempt > 0 {
            if !svc.shared.withdraw() {
                return None;
            }
            svc.shared.retries_connect.inc();
        }
        let m = crate::select::pick(svc, Default::default(), &tried, std::time::Instant::now())?;
        tried.push(Arc::as_ptr(&m.ep) as usize);
        match tokio::time::timeout(s.connect_timeout, upstream_io::connect_tcp(m.ep.addr)).await {
            Ok(Ok(up)) => {
                m.ep.record_success();
                return Some((m.ep.clone(), up));
            }
            Ok(Err(e)) => {
                tracing::debug!(service = %svc.name, instance = %m.ep.id, error = %e, "connect failed");
                svc.shared.connect_errors.inc();
                outlier::record_failure(&m.ep, svc, s);
            }
            Err(_) => {
                tracing::debug!(service = %svc.name, instance = %m.ep.id, "connect timed out");
                svc.shared.connect_errors.inc();
                outlier::record_failure(&m.ep, svc, s);
            }
        }
    }
    None
}

/// A plain client connection's first steps are inline; TLS, PROXY headers and the
/// buffered copy are boxed (`slow_path`, `setup.accept`): their states are several KiB,
/// and the task's future is as large as its largest state — allocated, and copied once,
/// per connection.
async fn handle(
    ctx: &TcpContext,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let setup = ctx.setup.load_full();
    let accepted = if setup.is_passthrough() {
        Accepted {
            io: ClientIo::Plain(stream),
            client: peer,
            destination: None,
        }
    } else {
        match Box::pin(setup.accept(stream, peer)).await {
            Some(a) => a,
            None => return,
        }
    };
    drop(setup);
    let client_addr = accepted.client;
    let start = Instant::now();
    let table = ctx.shared.table.load_full();
    let Some(lt) = table
        .listener(&ctx.name)
        .filter(|l| l.protocol == crate::config::ListenerProtocol::Tcp)
    else {
        return;
    };
    let Some(route) = lt.routes.first() else {
        return;
    };
    let Some(svc) = route.service.as_deref().filter(|s| !s.is_empty()) else {
        tracing::warn!(listener = %ctx.name, service = %route.service_name, "no instance to send a connection to");
        ctx.count(&route.service_name, "no_instance");
        return;
    };
    let Some((ep, upstream)) = connect(svc, &lt.settings).await else {
        tracing::warn!(listener = %ctx.name, service = %svc.name, client = %client_addr, "no instance accepted the connection");
        ctx.count(&route.service_name, "connect_error");
        return;
    };
    ctx.count_ok(&route.service_name);
    let _in_flight = ep.start_request();
    let opts = ctx.upstreams.load().get(&*svc.name).cloned();
    // Read while the table is at hand: the connection may outlive this table.
    let access_log = lt.settings.access_log;
    let settings = lt.settings.tcp;
    drop(table);
    let client_tls = accepted.io.is_tls();
    let meter = Meter::new(&ctx.bytes_in, &ctx.bytes_out);
    ctx.active.inc();
    let end = match (accepted.io, opts) {
        (ClientIo::Plain(client), None) => {
            plain(settings, client, upstream, &meter, shutdown).await
        }
        (client, opts) => {
            let a = (accepted.client, accepted.destination);
            Box::pin(slow_path(
                settings, client, a, upstream, &ep, opts, &meter, shutdown,
            ))
            .await
        }
    };
    ctx.active.dec();
    let reason = match end {
        End::Done => None,
        End::IdleTimeout => Some("idle_timeout"),
        End::DrainDeadline => Some("drain_deadline"),
    };
    if let Some(r) = reason {
        ctx.metrics
            .tcp_closed
            .with_label_values(&[&ctx.name, r])
            .inc();
    }
    if access_log {
        tracing::info!(target: "access", listener = %ctx.name, client = %client_addr,
            service = %ep.service, instance = %ep.id, upstream = %ep.addr,
            bytes_in = meter.totals().0, bytes_out = meter.totals().1,
            ms = start.elapsed().as_millis() as u64, closed = reason.unwrap_or("done"),
            tls = client_tls);
    }
}

/// A connection with TLS on a side or a PROXY header to send upstream: header, upstream
/// TLS, then the buffered copy.
#[allow(clippy::too_many_arguments)]
async fn slow_path(
    settings: TcpSettings,
    client: ClientIo,
    (client_addr, destination): (SocketAddr, Option<SocketAddr>),
    mut upstream: TcpStream,
    ep: &Endpoint,
    opts: Option<Arc<UpstreamOpts>>,
    meter: &Meter<'_>,
    shutdown: watch::Receiver<bool>,
) -> End {
    if let Some(v) = opts.as_ref().and_then(|o| o.proxy) {
        let dst = destination
            .or_else(|| client.tcp().local_addr().ok())
            .unwrap_or(ep.addr);
        let header = match v {
            ProxyVersion::V1 => proxy_protocol::encode_v1(client_addr, dst),
            ProxyVersion::V2 => proxy_protocol::encode_v2(client_addr, dst),
        };
        if upstream.write_all(&header).await.is_err() {
            return End::Done;
        }
    }
    match (client, opts.and_then(|o| o.tls.clone())) {
        (ClientIo::Plain(client), None) => plain(settings, client, upstream, meter, shutdown).await,
        (client, None) => buffered(settings, client, upstream, meter, shutdown).await,
        (client, Some(tls)) => match tls.connect(ep.addr.ip(), upstream).await {
            Ok(up) => buffered(settings, client, up, meter, shutdown).await,
            Err(e) => {
                tracing::warn!(service = %ep.service, instance = %ep.id, error = %e, "upstream TLS handshake failed");
                End::Done
            }
        },
    }
}

/// Two plain sockets: spliced (zero copy) when two pipes are to be had, else copied
/// (boxed: the buffered copy's state is large and rarely needed).
async fn plain(
    settings: TcpSettings,
    client: TcpStream,
    upstream: TcpStream,
    meter: &Meter<'_>,
    shutdown: watch::Receiver<bool>,
) -> End {
    match pipes::Pipes::take() {
        Some(pipes) => {
            let batching = settings.bulk_batching;
            let relay = pin!(splice::relay(&client, &upstream, pipes, meter, batching));
            pump_on(settings, relay, meter, shutdown).await
        }
        None => {
            let client = ClientIo::Plain(client);
            Box::pin(buffered(settings, client, upstream, meter, shutdown)).await
        }
    }
}

/// Streams until the relay ends, the connection idles out or the drain deadline passes.
/// `relay` is pinned by the caller: passed by value, it would be stored again in each
/// enclosing future (rustc keeps an async fn's arguments and their moved copies apart).
async fn pump_on<F>(
    settings: TcpSettings,
    relay: Pin<&mut F>,
    meter: &Meter<'_>,
    shutdown: watch::Receiver<bool>,
) -> End
where
    F: Future<Output = std::io::Result<()>>,
{
    let TcpSettings {
        idle_timeout,
        drain_timeout,
        ..
    } = settings;
    pump::pump(relay, meter, idle_timeout, drain_timeout, shutdown).await
}

/// The buffered copy (TLS on a side, or no pipe to spare). A connection cut short by
/// the idle timeout or the drain deadline is told so, bounded (TLS close_notify
/// included); one that ended by itself was already shut down by the copy.
async fn buffered<U>(
    settings: TcpSettings,
    client: ClientIo,
    mut upstream: U,
    meter: &Meter<'_>,
    shutdown: watch::Receiver<bool>,
) -> End
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = Metered {
        inner: client,
        meter,
    };
    let end = {
        let copy = pin!(pump::copy(&mut client, &mut upstream));
        pump_on(settings, copy, meter, shutdown).await
    };
    if end != End::Done {
        let bye = Duration::from_secs(1);
        let _ = tokio::time::timeout(bye, client.shutdown()).await;
        let _ = tokio::time::timeout(bye, upstream.shutdown()).await;
    }
    end
}
