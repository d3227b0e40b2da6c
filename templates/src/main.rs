//! `render`: the confd replacement. Thin: parse the CLI and config, set up logging, connect
//! to etcd, bind the admin port, hand over to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use catalog::EtcdStore;
use clap::{Parser, ValueEnum};
use templates::{ApplyOptions, Metrics, Settings, load_resources};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    version,
    about = "Renders configuration files from the wharf catalog in etcd (confd replacement)."
)]
struct Cli {
    /// Path of render.toml.
    #[arg(long, short, default_value = "/etc/wharf/render.toml")]
    config: PathBuf,
    /// Render every resource once and exit; non-zero exit status if any failed.
    #[arg(long)]
    onetime: bool,
    /// Render and compare only: never write a destination nor run a command.
    #[arg(long)]
    noop: bool,
    /// Validate render.toml, the resources and their templates, then exit.
    #[arg(long)]
    check: bool,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Reload HAProxy through its master CLI (`haproxy -W -S <socket>`) and wait until the new
    /// worker runs; exits non-zero if HAProxy rejected the reload. Meant for `reload_cmd`.
    HaproxyReload {
        #[arg(long)]
        master_socket: PathBuf,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Sub::HaproxyReload {
        master_socket,
        timeout,
    }) = &cli.command
    {
        return match templates::haproxy::reload(master_socket, *timeout) {
            Ok(procs) => {
                println!("haproxy reloaded: workers {:?}", procs.workers);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("render haproxy-reload: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("render: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("render: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(&cli.config)?;
    let resources = match load_resources(&settings) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("render: {e}");
            }
            anyhow::bail!("{} invalid template resource file(s)", errors.len());
        }
    };
    if cli.check {
        let problems = templates::check_templates(&resources);
        for p in &problems {
            eprintln!("render: {p}");
        }
        if !problems.is_empty() {
            return Ok(ExitCode::FAILURE);
        }
        println!(
            "{}: ok ({} template resources)",
            cli.config.display(),
            resources.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = EtcdStore::connect(&settings.etcd)
        .await
        .context("connecting to etcd")?;
    let metrics = Arc::new(Metrics::new());
    let opts = ApplyOptions { noop: cli.noop };
    if cli.onetime {
        let errors = templates::run_once(&store, &settings, &resources, &metrics, opts).await;
        for e in &errors {
            eprintln!("render: {e}");
        }
        return Ok(if errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    let admin = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin port {}", settings.admin_listen))?;
    info!(addr = %admin.local_addr()?, "admin server listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup_signal = signal(SignalKind::hangup())?;
    let (hup_tx, hup_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup_signal.recv().await.is_some() {
            info!("SIGHUP: re-reading template resources");
            // A full channel already holds a pending re-read.
            let _ = hup_tx.try_send(());
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = tokio::spawn(templates::metrics::serve_admin(admin, metrics.clone(), {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    }));
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    };
    templates::run(store, settings, resources, metrics, opts, hup_rx, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    Ok(ExitCode::SUCCESS)
}
