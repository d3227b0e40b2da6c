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
use clap::Parser;

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
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
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

/// `--check`: the file is valid (or we would not be here); with etcd, list the catalog
/// once and print the routes it would produce.
async fn check(config: Arc<LbConfig>) -> Result<()> {
    println!("configuration OK");
    let metrics = Arc::new(balancer::metrics::Metrics::new());
    let mut builder = balancer::builder::TableBuilder::new(config.clone(), metrics);
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
    print!("{}", builder.describe());
    Ok(())
}

async fn serve(config: Arc<LbConfig>, path: PathBuf) -> Result<()> {
    let mut listeners = HashMap::new();
    for l in &config.listeners {
        let sock = balancer::bind(l.bind)
            .with_context(|| format!("listener {} cannot bind {}", l.name.get_ref(), l.bind))?;
        listeners.insert(l.name.get_ref().clone(), sock);
    }
    let admin = balancer::bind(config.admin.bind)
        .with_context(|| format!("admin cannot bind {}", config.admin.bind))?;
    let store = match &config.discovery.etcd {
        Some(etcd) => Some(
            EtcdStore::connect(&etcd.etcd)
                .await
                .context("connecting to etcd")?,
        ),
        None => None,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(signals(tx));
    let deadline = config.shutdown_timeout;
    let opts = RunOptions {
        config,
        config_path: Some(path),
        listeners,
        admin,
        store,
        ready: None,
    };
    balancer::run(opts, rx).await?;
    // Pooled upstream connections and tasks die with the runtime.
    let _ = deadline.min(Duration::from_secs(1));
    Ok(())
}

async fn signals(tx: tokio::sync::mpsc::UnboundedSender<Control>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        let c = tokio::select! {
            _ = hup.recv() => Control::Reload,
            _ = term.recv() => Control::Shutdown,
            _ = int.recv() => Control::Shutdown,
        };
        if tx.send(c).is_err() {
            return;
        }
    }
}
