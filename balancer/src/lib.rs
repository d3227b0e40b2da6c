//! wharf's L7 HTTP load balancer: routes requests to instances discovered in etcd (and/or
//! listed in `lb.toml`), hot-swapping its routing table on every catalog change without a
//! reload and without dropping a request.
//!
//! # Module map
//!
//! - [`config`]: `lb.toml` (serde + toml) with file:line:key errors.
//! - [`builder`]: catalog + config → routing table, rebuilding only what changed.
//! - [`table`]: the immutable `RoutingTable` one request reads (one `ArcSwap` load).
//! - [`select`]: version split, then p2c / round_robin / least_conn with weights and slow start.
//! - [`endpoint`]: one instance: counters, outlier state, keep-alive pool.
//! - [`proxy`]: the request path (forwarding, headers, retries, error mapping).
//! - [`body`]: streaming request/response bodies; returns pooled connections.
//! - [`server`]: listeners (HTTP/1.1 + h2c), admin server, connection tracking.
//! - [`metrics`]: Prometheus metrics.
//! - [`status`]: the status page, `/api/status` and its live stream (admin port).
//!
//! [`run`] wires them: the binary binds sockets and calls it with a control channel.

pub mod body;
pub mod builder;
pub mod busy_poll;
pub mod chunked;
pub mod cidr;
pub mod client_io;
pub mod config;
mod config_check;
#[cfg(test)]
mod config_props;
pub mod conn_limit;
pub mod deadline;
pub mod describe;
pub mod endpoint;
pub mod h1_head;
pub mod h1_request;
pub mod h1_response;
pub mod h1_server;
pub mod header_rules;
pub mod hop_by_hop;
pub mod l4config;
pub mod l4metrics;
pub mod metrics;
pub mod mirror;
pub mod outlier;
mod plain_or_tls;
pub mod proxy;
pub mod proxy_protocol;
pub mod queue;
pub mod rate_limit;
pub mod request_id;
pub mod select;
pub mod server;
pub mod static_check;
pub mod status;
pub mod sticky;
pub mod strip_prefix;
pub mod table;
pub mod tcp;
#[cfg(test)]
mod test_util;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod upstream_h2;
pub mod upstream_head;
pub mod upstream_io;
pub mod version_pin;
#[cfg(test)]
mod wire_props;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use catalog::{Keyspace, Store, WatchConfig, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::builder::TableBuilder;
use crate::config::LbConfig;
use crate::metrics::Metrics;
use crate::proxy::Shared;
use crate::server::{AdminState, ConnTracker, ListenerHandle};

/// Binds a listening socket the way a proxy wants it (SO_REUSEADDR, large backlog).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Messages from the binary (signals) to a running balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the configuration file (SIGHUP).
    Reload,
    /// Stop accepting, finish in-flight requests, return (SIGTERM).
    Shutdown,
    /// A self-upgrade handed the sockets to a new process that is ready: shut down like
    /// [`Control::Shutdown`], and leave the admin port to the new process at once (stop
    /// accepting on it, close admin connections after their current answer), so that
    /// `/metrics`, `/healthz` and `/api/status` describe the serving process only.
    HandOver,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("listener {name} ({addr}): {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Admin(std::io::Error),
    #[error("listener {name}: {msg}")]
    Listener { name: String, msg: String },
    #[error("service {service}: upstream TLS: {source}")]
    UpstreamTls {
        service: String,
        source: tls::upstream::UpstreamTlsError,
    },
}

/// What the L4 parts of every listener share.
#[derive(Clone)]
pub struct L4Ctx {
    pub metrics: Arc<l4metrics::L4Metrics>,
    pub upstreams: Arc<tcp::UpstreamMap>,
    /// A duplicate of every listening socket, by listener name: handed to the new process
    /// on a self-upgrade, and the socket a listener whose protocol changes on reload
    /// restarts on. Emptied at shutdown (a socket left open would queue connections
    /// nobody accepts).
    pub kept: upgrade::Sockets,
}

impl L4Ctx {
    /// Keeps a duplicate of a listener's socket.
    fn keep(&self, name: &str, sock: &TcpListener) {
        match socket2::SockRef::from(sock).try_clone() {
            Ok(dup) => {
                self.kept_sockets().insert(name.to_owned(), dup.into());
            }
            Err(e) => tracing::warn!(listener = name, error = %e,
                "cannot keep a socket duplicate; an upgrade or a protocol change would rebind this listener"),
        }
    }

    fn forget(&self, name: &str) {
        self.kept_sockets().remove(name);
    }

    /// Another duplicate of a kept listening socket.
    fn duplicate(&self, name: &str) -> std::io::Result<std::net::TcpListener> {
        match self.kept_sockets().get(name) {
            Some(s) => s.try_clone(),
            None => Err(std::io::Error::other("no socket duplicate kept")),
        }
    }

    fn kept_sockets(&self) -> std::sync::MutexGuard<'_, HashMap<String, std::net::TcpListener>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`run`] needs: sockets already bound, so tests can use port 0.
pub struct RunOptions<S> {
    pub config: Arc<LbConfig>,
    /// Re-read on [`Control::Reload`]; without it a reload is a no-op.
    pub config_path: Option<PathBuf>,
    /// Bound listeners by listener name; a configured listener missing here is bound by
    /// `run` itself.
    pub listeners: HashMap<String, std::net::TcpListener>,
    pub admin: std::net::TcpListener,
    /// etcd (or any `Store`); `None` runs on static services only.
    pub store: Option<S>,
    /// Told once every listener accepts (the self-upgrade waits for it).
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
    /// Filled with duplicates of the listening sockets (kept current across reloads) so
    /// the binary can hand them to a new process.
    pub handover: Option<upgrade::Sockets>,
}

fn to_tokio(l: std::net::TcpListener) -> std::io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Runs the balancer until [`Control::Shutdown`] (or the control channel closes), then
/// drains client connections for at most `shutdown_timeout`.
pub async fn run<S: Store>(
    opts: RunOptions<S>,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let l4_metrics = Arc::new(l4metrics::L4Metrics::register(&metrics.registry));
    let upstreams = Arc::new(
        tcp::upstream_map(&opts.config, Some(&l4_metrics))
            .map_err(|(service, source)| RunError::UpstreamTls { service, source })?,
    );
    let l4 = L4Ctx {
        metrics: l4_metrics,
        upstreams: Arc::new(arc_swap::ArcSwap::new(upstreams.clone())),
        kept: opts.handover.clone().unwrap_or_default(),
    };
    let mut builder = TableBuilder::new(opts.config.clone(), metrics.clone());
    builder.set_upstreams(upstreams);
    // Static endpoints' checks report each change of verdict here (a table rebuild).
    let (checks_tx, mut checks_rx) = mpsc::unbounded_channel();
    static_check::spawn_new(&mut builder, &checks_tx);
    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(builder.table()),
        metrics: metrics.clone(),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tracker = Arc::new(ConnTracker::default());
    if opts.config.busy_polling {
        busy_poll::start(shutdown_rx.clone(), metrics.busy_polling_workers.clone());
    }
    let status = status::StatusHub::new(opts.config.discovery.etcd.is_some());
    status.catalog_changed(&builder);
    let admin = Arc::new(AdminState {
        shared: shared.clone(),
        watch: ArcSwap::from_pointee(None),
        shutting_down: shutdown_rx.clone(),
        status: status.clone(),
    });
    status::sampler::spawn(admin.clone());
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    server::spawn_admin(
        to_tokio(opts.admin).map_err(RunError::Admin)?,
        admin.clone(),
        admin_stop_rx,
    );

    // Discovery: list-then-watch; the first snapshot is awaited (bounded) so that routes
    // to etcd services do not answer 503 just because the balancer is starting.
    let mut updates = None;
    if let (Some(store), Some(etcd)) = (opts.store, opts.config.discovery.etcd.as_ref()) {
        let ks = Keyspace::new(&etcd.prefix).unwrap_or_default();
        let watcher = Watcher::spawn(
            store,
            ks.clone(),
            WatchConfig::new(vec![ks.services(), ks.checkers()]),
        );
        let (mut rx, stats) = watcher.into_parts();
        admin.watch.store(Arc::new(Some(stats)));
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(u)) => {
                builder.apply(u);
                shared.table.store(Arc::new(builder.table()));
                status.catalog_changed(&builder);
            }
            _ => tracing::warn!(
                "etcd did not answer within 5s; serving static services until it does"
            ),
        }
        updates = Some(rx);
    }

    let mut bound = opts.listeners;
    let mut handles: Vec<ListenerHandle> = Vec::new();
    for l in &opts.config.listeners {
        let name = l.name.get_ref().clone();
        let sock = match bound.remove(&name) {
            Some(s) => s,
            None => bind(l.bind).map_err(|source| RunError::Bind {
                name: name.clone(),
                addr: l.bind,
                source,
            })?,
        };
        let sock = to_tokio(sock).map_err(|source| RunError::Bind {
            name: name.clone(),
            addr: l.bind,
            source,
        })?;
        handles.push(
            start_listener(sock, l, &shared, &tracker, &shutdown_rx, &l4)
                .map_err(|msg| RunError::Listener { name, msg })?,
        );
    }
    tracing::info!(listeners = handles.len(), "balancer running");
    if let Some(ready) = opts.ready {
        let _ = ready.send(());
    }

    let mut config_path = opts.config_path;
    loop {
        tokio::select! {
                    u = async { match updates.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                        let Some(u) = u else { updates = None; continue };
                        builder.apply(u);
                        // Coalesce a burst into one swap.
                        while let Some(more) = updates.as_mut().and_then(|rx| rx.try_recv().ok()) {
                            builder.apply(more);
                        }
                        shared.table.store(Arc::new(builder.table()));
                        status.catalog_changed(&builder);
                    }
                    Some(()) = checks_rx.recv() => {
                        while checks_rx.try_recv().is_ok() {}
                        builder.static_checks_changed();
                        shared.table.store(Arc::new(builder.table()));
                        status.catalog_changed(&builder);
                    }
                    c = control.recv() => match c {
                        Some(Control::Reload) => {
        let failures = reload_failures(&shared);
                            reload(&mut config_path, &mut builder, &mut handles, &shared, &tracker, &shutdown_rx, &l4);
                            static_check::spawn_new(&mut builder, &checks_tx);
                            status.reloaded(&builder, reload_failures(&shared) > failures);
                        }
                        Some(Control::HandOver) => {
                            tracing::info!("handed over: the admin port is the new process's");
                            let _ = admin_stop.send(true);
                            break;
                        }
                        Some(Control::Shutdown) | None => break,
                    },
                }
    }

    // Graceful shutdown: stop accepting, let in-flight requests finish, close idle ones.
    let deadline = builder.config().shutdown_timeout;
    tracing::info!(open = tracker.open(), ?deadline, "shutting down");
    for h in &handles {
        let _ = h.stop.send(true);
    }
    // Close our socket duplicates too, so new connections are refused (or, after an
    // upgrade, go to the new process only) instead of waiting in a queue nobody reads.
    l4.kept_sockets().clear();
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(deadline, tracker.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.open(),
            "shutdown deadline passed; closing the rest"
        );
    }
    Ok(())
}

fn start_listener(
    sock: TcpListener,
    l: &config::ListenerConfig,
    shared: &Arc<Shared>,
    tracker: &Arc<ConnTracker>,
    shutdown: &watch::Receiver<bool>,
    l4: &L4Ctx,
) -> Result<ListenerHandle, String> {
    let (stop, stop_rx) = watch::channel(false);
    let builder = Arc::new(ArcSwap::from_pointee(server::conn_builder(l)));
    let name = l.name.get_ref().clone();
    let full = shared.metrics.listener_full.with_label_values(&[&name]);
    let limit = conn_limit::ConnLimit::new(l.max_connections, full);
    let setup = Arc::new(ArcSwap::from_pointee(client_setup(l, l4)?));
    tls::publish_crl(&l4.metrics, &name, setup.load().tls.as_ref());
    l4.keep(&name, &sock);
    // Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt here instead
    // of one per connection (also for sockets inherited on an upgrade).
    if let Err(e) = socket2::SockRef::from(&sock).set_tcp_nodelay(true) {
        tracing::debug!(listener = %name, error = %e, "cannot set TCP_NODELAY on the listener");
    }
    match l.protocol {
        config::ListenerProtocol::Http => server::spawn_listener(
            sock,
            name.as_str().into(),
            builder.clone(),
            shared.clone(),
            tracker.clone(),
            stop_rx,
            shutdown.clone(),
            setup.clone(),
            limit.clone(),
        ),
        config::ListenerProtocol::Tcp => tcp::spawn_listener(
            sock,
            Arc::new(tcp::TcpContext::new(
                name.as_str().into(),
                setup.clone(),
                shared.clone(),
                l4.upstreams.clone(),
                l4.metrics.clone(),
                limit.clone(),
            )),
            tracker.clone(),
            stop_rx,
            shutdown.clone(),
        ),
    }
    Ok(ListenerHandle {
        name,
        bind: l.bind,
        protocol: l.protocol,
        builder,
        setup,
        stop,
        limit,
    })
}

/// A listener's PROXY / TLS steps (loads its certificates: the error names the file).
fn client_setup(l: &config::ListenerConfig, l4: &L4Ctx) -> Result<client_io::ClientSetup, String> {
    let tls = tls::listener(l, &l4.metrics).map_err(|e| e.to_string())?;
    Ok(client_io::ClientSetup::new(l, tls, l4.metrics.clone()))
}

fn reload_failures(shared: &Shared) -> u64 {
    shared.metrics.reloads.with_label_values(&["error"]).get()
}

/// SIGHUP: a bad file keeps everything as it is; a good one applies listeners, routes and
/// static services. New sockets are bound before anything changes.
fn reload(
    path: &mut Option<PathBuf>,
    builder: &mut TableBuilder,
    handles: &mut Vec<ListenerHandle>,
    shared: &Arc<Shared>,
    tracker: &Arc<ConnTracker>,
    shutdown: &watch::Receiver<bool>,
    l4: &L4Ctx,
) {
    let reloads = &shared.metrics.reloads;
    let Some(p) = path.as_ref() else {
        tracing::warn!("reload requested but the configuration has no file");
        return;
    };
    let config = match LbConfig::load(p) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            reloads.with_label_values(&["error"]).inc();
            return;
        }
    };
    // Runtime settings are read once, when the runtime starts.
    let running = builder.config();
    if (running.worker_threads, running.busy_polling)
        != (config.worker_threads, config.busy_polling)
    {
        tracing::warn!(
            "worker_threads / busy_polling changed: they take effect at the next start \
             (or `balancer upgrade`); the rest of the file is applied"
        );
    }
    let same = |h: &ListenerHandle, l: &config::ListenerConfig| {
        h.name == *l.name.get_ref() && h.bind == l.bind
    };
    // Same name and address, another protocol: a new accept loop on the same socket.
    let switched = |h: &ListenerHandle| {
        config
            .listeners
            .iter()
            .find(|l| same(h, l))
            .filter(|l| l.protocol != h.protocol)
    };
    let mut fresh = Vec::new();
    for l in &config.listeners {
        if handles.iter().any(|h| same(h, l)) {
            continue;
        }
        // A bind that moves to an address we hold under another name cannot be taken yet.
        match bind(l.bind).and_then(to_tokio) {
            Ok(s) => fresh.push((s, l.clone())),
            Err(e) => {
                tracing::error!(listener = %l.name.get_ref(), addr = %l.bind, error = %e,
                    "reload failed: cannot bind; keeping the running configuration");
                reloads.with_label_values(&["error"]).inc();
                return;
            }
        }
    }
    let upstreams = match tcp::upstream_map(&config, Some(&l4.metrics)) {
        Ok(u) => u,
        Err((service, e)) => {
            tracing::error!(%service, error = %e, "reload failed: upstream TLS; keeping the running configuration");
            reloads.with_label_values(&["error"]).inc();
            return;
        }
    };
    // Listeners that stay get new TLS / PROXY steps if theirs changed (certificates load
    // now; a failure keeps everything as it is). Stored below, once nothing can fail: new
    // connections use them, the socket and established connections are untouched.
    let mut setups = Vec::new();
    for h in handles.iter() {
        let Some(l) = config.listeners.iter().find(|l| same(h, l)) else {
            continue;
        };
        if l.protocol != h.protocol {
            continue;
        }
        if h.setup.load().config == client_io::SetupConfig::of(l) {
            continue;
        }
        match client_setup(l, l4) {
            Ok(s) => setups.push((h.setup.clone(), s)),
            Err(e) => {
                tracing::error!(listener = %h.name, error = %e,
                    "reload failed; keeping the running configuration");
                reloads.with_label_values(&["error"]).inc();
                return;
            }
        }
    }
    for h in handles.iter() {
        let Some(l) = switched(h) else {
            continue;
        };
        match l4.duplicate(&h.name).and_then(to_tokio) {
            Ok(s) => fresh.push((s, l.clone())),
            Err(e) => {
                tracing::error!(listener = %h.name, error = %e,
                    "reload failed: cannot reuse the listening socket; keeping the running configuration");
                reloads.with_label_values(&["error"]).inc();
                return;
            }
        }
    }
    let mut started = Vec::new();
    for (s, l) in fresh {
        match start_listener(s, &l, shared, tracker, shutdown, l4) {
            Ok(h) => started.push(h),
            Err(e) => {
                tracing::error!(listener = %l.name.get_ref(), error = %e,
                    "reload failed; keeping the running configuration");
                for h in started {
                    // A listener restarted for a new protocol still runs under its name.
                    if !handles.iter().any(|o| o.name == h.name) {
                        l4.forget(&h.name);
                    }
                    let _ = h.stop.send(true);
                }
                reloads.with_label_values(&["error"]).inc();
                return;
            }
        }
    }
    let upstreams = Arc::new(upstreams);
    for (slot, setup) in setups {
        tracing::info!(listener = %setup.listener, tls = setup.tls.is_some(),
            proxy_protocol = setup.proxy.is_some(), "listener TLS/PROXY settings replaced");
        let old = slot.swap(Arc::new(setup));
        old.retire();
        let new = slot.load();
        tls::publish_crl(&l4.metrics, &new.listener, new.tls.as_ref());
        tls::forget_expiry(
            &l4.metrics,
            &new.listener,
            old.config.tls(),
            new.config.tls(),
        );
    }
    l4.upstreams.store(upstreams.clone());
    builder.set_upstreams(upstreams);
    builder.set_config(config.clone());
    shared.table.store(Arc::new(builder.table()));
    handles.retain(|h| match config.listeners.iter().find(|l| same(h, l)) {
        Some(l) if l.protocol != h.protocol => {
            // Its successor (started above on the same socket) accepts from now on. Its
            // connections find no routes of their protocol in the new table: a relayed
            // TCP connection goes on, an HTTP one gets 503 + close at its next request.
            tracing::info!(listener = %h.name, from = ?h.protocol, to = ?l.protocol,
                "listener protocol changed");
            h.setup.load().retire();
            let _ = h.stop.send(true);
            false
        }
        Some(l) => {
            h.builder.store(Arc::new(server::conn_builder(l)));
            h.limit.set_max(l.max_connections);
            true
        }
        None => {
            // Its certificates are no longer polled (a listener that moved to a new address
            // has a setup of its own).
            let old = h.setup.load();
            old.retire();
            // Same name on a new address: the new listener's socket is already kept, and its
            // certificates' expiry series are its own.
            if !config.listeners.iter().any(|l| *l.name.get_ref() == h.name) {
                l4.forget(&h.name);
                tls::forget_expiry(&l4.metrics, &h.name, old.config.tls(), None);
                tls::publish_crl(&l4.metrics, &h.name, None);
            }
            let _ = h.stop.send(true);
            false
        }
    });
    handles.extend(started);
    reloads.with_label_values(&["ok"]).inc();
    tracing::info!("configuration reloaded");
}
