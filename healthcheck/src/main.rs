//! `healthcheck`: probes every instance and writes health marks to etcd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use catalog::EtcdStore;
use clap::{Parser, ValueEnum};
use healthcheck::FileConfig;
use healthcheck::config::DEFAULT_ADMIN;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Probes every instance in the wharf catalog (HTTP GET expecting 2XX, or TCP connect) and
/// writes health marks to etcd; replicas share the instances by rendezvous hashing.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML); every setting has a default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// etcd client URLs, comma separated (overrides [etcd] endpoints).
    #[arg(long, value_delimiter = ',', env = "WHARF_ETCD")]
    etcd: Vec<String>,
    /// Checker id, a DNS label unique among replicas (default: the host name).
    #[arg(long)]
    id: Option<String>,
    /// Admin address for /metrics and /healthz [default: 127.0.0.1:9101].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// etcd key prefix (default: /wharf/v1).
    #[arg(long)]
    prefix: Option<String>,
    /// TTL of the checker lease, e.g. "15s".
    #[arg(long, value_parser = humantime::parse_duration)]
    lease_ttl: Option<Duration>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Runtime threads: 1 runs everything on one thread (cheapest per probe), more spread
    /// the probes over several cores [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Print every instance's health mark from etcd as a table, and the live checkers,
    /// then exit (does not probe).
    #[arg(long)]
    status: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let (file, settings, origin) = match load(&cli) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("healthcheck: {e:#}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "{origin}: ok (checker {}, prefix {}, etcd {})",
            settings.checker_id,
            settings.keyspace,
            file.etcd.endpoints.join(",")
        );
        return ExitCode::SUCCESS;
    }
    if cli.status {
        return status(&file, &settings);
    }
    // One thread: no cross-thread wake-ups (futex calls) and no work stealing, the cheapest
    // per probe. More: probes, watch and writes spread over cores.
    let mut builder = match cli.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("healthcheck: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli, file, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--status`: one consistent read of the catalog (the watcher's first snapshot), printed.
fn status(file: &FileConfig, settings: &healthcheck::Settings) -> ExitCode {
    let run = async {
        let store = EtcdStore::connect(&file.etcd)
            .await
            .context("connecting to etcd")?;
        let ks = settings.keyspace.clone();
        let watcher = catalog::Watcher::spawn(
            store,
            ks.clone(),
            catalog::WatchConfig::new(vec![ks.services(), ks.checkers()]),
        );
        let (mut rx, _stats) = watcher.into_parts();
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("etcd did not answer within 10s")?
            .context("the catalog watcher stopped")?;
        let mut view = catalog::CatalogView::default();
        view.apply(first);
        anyhow::Ok(healthcheck::status::render(
            &view,
            catalog::model::now_millis(),
        ))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match rt
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run))
    {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("healthcheck: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> Result<(FileConfig, healthcheck::Settings, String)> {
    let (mut file, origin) = match &cli.config {
        Some(path) => (FileConfig::load(path)?, path.display().to_string()),
        None => (FileConfig::default(), "command line".to_owned()),
    };
    if !cli.etcd.is_empty() {
        file.etcd.endpoints = cli.etcd.clone();
    }
    if let Some(id) = &cli.id {
        file.id = Some(id.clone());
    }
    if let Some(prefix) = &cli.prefix {
        file.prefix = prefix.clone();
    }
    if let Some(ttl) = cli.lease_ttl {
        file.lease_ttl = ttl;
    }
    if let Some(admin) = cli.admin {
        file.admin = Some(admin);
    }
    let settings = file.settings(&origin)?;
    Ok((file, settings, origin))
}

async fn serve(cli: Cli, file: FileConfig, settings: healthcheck::Settings) -> Result<()> {
    let admin_addr = match file.admin.or(cli.admin) {
        Some(a) => a,
        None => DEFAULT_ADMIN.parse().context("default admin address")?,
    };
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin address {admin_addr}"))?;
    tracing::info!(admin = %admin.local_addr()?, "admin server listening");
    let store = EtcdStore::connect(&file.etcd)
        .await
        .context("connecting to etcd")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    healthcheck::run(store, settings, admin, shutdown).await;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a terminal only: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
