//! `balancer --config lb.toml`: parse, set up logging, bind sockets, run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use balancer::config::LbConfig;
use balancer::{Control, RunOptions};
use catalog::{EtcdStore, Keyspace, WatchConfig, Watcher};
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: every connection allocates its task, its sockets'
/// readiness slots (tokio aligns those to 128 bytes: glibc serves aligned requests by
/// splitting larger chunks, ~650 instructions each) and the connection's state (~2 KiB,
/// past glibc's per-thread cache). See README "Performance".
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "wharf's L7 HTTP load balancer: backends from etcd, hot-swapped"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "lb.toml", env = "BALANCER_CONFIG")]
    config: PathBuf,
    /// Validate the configuration and exit; with etcd configured, also print what would
    /// be routed right now.
    #[arg(long)]
    check: bool,
    /// Worker threads (overrides `worker_threads`); 1 = single-threaded runtime.
    #[arg(long)]
    threads: Option<usize>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask the running balancer (`[upgrade] socket` of the configuration) to start the
    /// current binary, hand it the listening sockets and drain; prints the new pid.
    Upgrade,
}

fn init_tracing(format: &str) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .ok()
        .filter(|_| !spec.is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // rustls warns once per handshake about what a client sent (an IP address as SNI, as
    // wrk and other OpenSSL-based clients do): nothing an operator can act on, and a log
    // line per connection. Shown only when RUST_LOG names rustls.
    if !spec.contains("rustls")
        && let Ok(quiet) = "rustls=error".parse()
    {
        filter = filter.add_directive(quiet);
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a terminal only: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Raises the soft limit on open files to the hard one, as HAProxy and nginx do: every
/// client connection costs one descriptor, its upstream another, a spliced TCP
/// connection two pipes more, and a distribution's default soft limit (1024) would cap a
/// front door at a few hundred connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let config = match LbConfig::load(&cli.config) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("balancer: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Cmd::Upgrade) = cli.command {
        return upgrade_command(&config);
    }
    raise_fd_limit();
    let threads = cli.threads.or(config.worker_threads).unwrap_or(0);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("balancer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if cli.check {
        rt.block_on(check(config))
    } else {
        rt.block_on(serve(config, cli.config))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balancer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn upgrade_command(config: &LbConfig) -> ExitCode {
    let Some(path) = &config.upgrade.socket else {
        eprintln!(
            "balancer upgrade: the configuration has no [upgrade] socket (send SIGUSR2 instead)"
        );
        return ExitCode::from(2);
    };
    // The old process waits up to ready_timeout for the new one, then answers.
    match balancer::upgrade::control::request(
        path,
        config.upgrade.ready_timeout + Duration::from_secs(10),
    ) {
        Ok(pid) => {
            println!("upgraded: new process {pid} serves; the old one drains and exits");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("balancer upgrade failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whole days from now until the Unix time `at` (negative: past).
fn days_from_now(at: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (at - now).div_euclid(86_400)
}

/// `--check`: the file is valid (or we would not be here); with etcd, list the catalog
/// once and print the routes it would produce.
async fn check(config: Arc<LbConfig>) -> Result<()> {
    // Files the configuration points at: certificates, keys, CA bundles.
    let provider = balancer::tls::provider();
    let mut files = Vec::new();
    for l in &config.listeners {
        for c in l.tls.iter().flat_map(|t| &t.certificates) {
            let loaded = balancer::tls::certs::load(c, &provider)
                .with_context(|| format!("listener {}", l.name.get_ref()))?;
            let days = days_from_now(loaded.not_after);
            files.push(format!(
                "listener {}: certificate {} for {:?}, expires in {days} days",
                l.name.get_ref(),
                c.cert.get_ref().display(),
                loaded.names
            ));
        }
        if let Some(auth) = l.tls.as_ref().and_then(|t| t.client_auth.as_ref()) {
            let verifier = balancer::tls::client_auth::verifier(auth, &provider)
                .with_context(|| format!("listener {}: client_auth", l.name.get_ref()))?;
            files.push(format!(
                "listener {}: client certificates {} against {}{}{}",
                l.name.get_ref(),
                if auth.optional {
                    "checked when sent"
                } else {
                    "required"
                },
                auth.ca.get_ref().display(),
                auth.crl
                    .as_ref()
                    .map(|c| format!(", revoked ones listed in {}", c.display()))
                    .unwrap_or_default(),
                match verifier.crl_next_update.map(days_from_now) {
                    Some(days) if days < 0 => format!(" (EXPIRED {} days ago)", -days),
                    Some(days) => format!(" (next update due in {days} days)"),
                    None => String::new(),
                }
            ));
        }
    }
    let upstreams = balancer::tcp::upstream_map(&config, None)
        .map_err(|(service, e)| anyhow::anyhow!("service {service}: upstream TLS: {e}"))?;
    println!("configuration OK");
    for f in files {
        println!("{f}");
    }
    let metrics = Arc::new(balancer::metrics::Metrics::new());
    let mut builder = balancer::builder::TableBuilder::new(config.clone(), metrics);
    // The routes carry their service's upstream options (`--check` lists HTTP/2 ones).
    builder.set_upstreams(Arc::new(upstreams));
    if let Some(etcd) = &config.discovery.etcd {
        let store = EtcdStore::connect(&etcd.etcd)
            .await
            .context("connecting to etcd")?;
        let ks = Keyspace::new(&etcd.prefix).context("discovery.etcd.prefix")?;
        let mut w = Watcher::spawn(
            store,
            ks.clone(),
            WatchConfig::new(vec![ks.services(), ks.checkers()]),
        );
        let first =
            tokio::time::timeout(etcd.etcd.dial_timeout + etcd.etcd.request_timeout, w.next())
                .await
                .ok()
                .flatten()
                .context("etcd did not answer (dry run needs a reachable etcd)")?;
        builder.apply(first);
        println!("etcd revision {}", builder.catalog().revision);
    }
    print!("{}", balancer::describe::describe(&builder.table()));
    Ok(())
}

async fn serve(config: Arc<LbConfig>, path: PathBuf) -> Result<()> {
    // Started by a running balancer's upgrade: its listening sockets come first.
    let mut inherited = balancer::upgrade::inherit().context("self-upgrade handover")?;
    if let Some(i) = &inherited {
        tracing::info!(
            sockets = i.sockets.len(),
            "upgrade: received listening sockets"
        );
    }
    let mut listeners = HashMap::new();
    for l in &config.listeners {
        let name = l.name.get_ref();
        let sock = match inherited.as_mut().and_then(|i| i.take(name, l.bind)) {
            Some(s) => s,
            None => balancer::bind(l.bind)
                .with_context(|| format!("listener {name} cannot bind {}", l.bind))?,
        };
        listeners.insert(name.clone(), sock);
    }
    let admin = match inherited
        .as_mut()
        .and_then(|i| i.take(balancer::upgrade::ADMIN, config.admin.bind))
    {
        Some(s) => s,
        None => balancer::bind(config.admin.bind)
            .with_context(|| format!("admin cannot bind {}", config.admin.bind))?,
    };
    // Duplicates of every listening socket, for our own upgrade later.
    let sockets: balancer::upgrade::Sockets = Default::default();
    sockets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(balancer::upgrade::ADMIN.into(), admin.try_clone()?);
    let store = match &config.discovery.etcd {
        Some(etcd) => Some(
            EtcdStore::connect(&etcd.etcd)
                .await
                .context("connecting to etcd")?,
        ),
        None => None,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let upgrader = Arc::new(balancer::upgrade::control::Upgrader::new(
        std::env::args_os().skip(1).collect(),
        sockets.clone(),
        config.upgrade.ready_timeout,
        tx.clone(),
        config.upgrade.pid_file.clone(),
    )?);
    tokio::spawn(signals(tx, upgrader.clone()));
    if let Some(sock) = &config.upgrade.socket {
        balancer::upgrade::control::spawn_control_socket(sock.clone(), upgrader.clone())
            .with_context(|| format!("upgrade socket {}", sock.display()))?;
    }
    // Once every listener accepts: tell the old process (if any) and claim the pid file.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let pid_file = config.upgrade.pid_file.clone();
    tokio::spawn(async move {
        if ready_rx.await.is_err() {
            return;
        }
        if let Some(p) = &pid_file
            && let Err(e) = std::fs::write(p, format!("{}\n", std::process::id()))
        {
            tracing::error!(path = %p.display(), error = %e, "cannot write the pid file");
        }
        if let Some(mut i) = inherited {
            match i.ready() {
                Ok(()) => tracing::info!("upgrade: ready; the old process drains"),
                Err(e) => tracing::error!(error = %e, "upgrade: cannot tell the old process"),
            }
        }
    });
    let opts = RunOptions {
        config: config.clone(),
        config_path: Some(path),
        listeners,
        admin,
        store,
        ready: Some(ready_tx),
        handover: Some(sockets),
    };
    balancer::run(opts, rx).await?;
    if !upgrader.handed_over()
        && let Some(p) = &config.upgrade.pid_file
        && std::fs::read_to_string(p).is_ok_and(|t| t.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(p);
    }
    let code = upgrader.finish().await;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

async fn signals(
    tx: tokio::sync::mpsc::UnboundedSender<Control>,
    upgrader: Arc<balancer::upgrade::control::Upgrader>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        let c = tokio::select! {
            _ = hup.recv() => Control::Reload,
            _ = term.recv() => Control::Shutdown,
            _ = int.recv() => Control::Shutdown,
            _ = usr2.recv() => {
                // SIGUSR2: self-upgrade (the outcome is logged).
                let u = upgrader.clone();
                tokio::spawn(async move { let _ = u.upgrade().await; });
                continue;
            }
        };
        if tx.send(c).is_err() {
            return;
        }
    }
}
