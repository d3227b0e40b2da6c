//! `registrar agent`: parse flags, set up logging, connect etcd, bind the sockets, run.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use catalog::{EtcdConfig, EtcdStore, Keyspace, NodeName};
use registrar::agent::{AgentConfig, BridgeConfig, Metrics};

#[derive(clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    etcd: crate::EtcdArgs,
    /// This node's name (a DNS label); instance ids start with it.
    #[arg(long, env = "WHARF_NODE")]
    node: String,
    #[arg(long, env = "WHARF_STATE_DIR", default_value = "/run/wharf")]
    state_dir: PathBuf,
    /// Address host-network instances are registered with.
    #[arg(long, default_value = "127.0.0.1")]
    advertise: IpAddr,
    /// Prometheus /metrics address.
    #[arg(long, default_value = "127.0.0.1:9103")]
    admin: SocketAddr,
    /// Node lease TTL asked of etcd.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// cgroup directory (relative to the agent's own cgroup) for containers.
    #[arg(long, default_value = "wharf")]
    cgroup_parent: String,
    /// Bridge network for `--network bridge`: NAME=SUBNET/PREFIX.
    #[arg(long, default_value = "wharf0=10.88.0.0/24")]
    bridge: BridgeConfig,
    /// First restart delay (doubles after each quick failure).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    restart_backoff: Duration,
    /// Longest restart delay.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    restart_backoff_max: Duration,
    /// text | json
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

pub fn main(a: AgentArgs) -> Result<i32> {
    let node = NodeName::new(&a.node).with_context(|| format!("--node {:?}", a.node))?;
    let keyspace =
        Keyspace::new(&a.etcd.prefix).with_context(|| format!("--prefix {:?}", a.etcd.prefix))?;
    if a.lease_ttl < Duration::from_secs(2) {
        bail!("--lease-ttl must be at least 2s");
    }
    if a.log_format != "text" && a.log_format != "json" {
        bail!("--log-format must be text or json");
    }
    let cfg = AgentConfig {
        node,
        advertise: a.advertise,
        state_dir: a.state_dir.clone(),
        keyspace,
        lease_ttl: a.lease_ttl,
        cgroup_parent: a.cgroup_parent,
        helper_exe: std::env::current_exe().context("locate own binary")?,
        bridge: a.bridge,
        restart_initial: a.restart_backoff,
        restart_cap: a.restart_backoff_max.max(a.restart_backoff),
    };
    if a.check {
        println!("configuration ok");
        return Ok(0);
    }
    init_tracing(&a.log_format);
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    rt.block_on(async move {
        std::fs::create_dir_all(&a.state_dir)
            .with_context(|| format!("mkdir {}", a.state_dir.display()))?;
        let sock_path = registrar::agent::StateDir::new(&a.state_dir).socket();
        if tokio::net::UnixStream::connect(&sock_path).await.is_ok() {
            bail!("another agent is serving {}", sock_path.display());
        }
        let _ = std::fs::remove_file(&sock_path);
        let api = tokio::net::UnixListener::bind(&sock_path)
            .with_context(|| format!("bind {}", sock_path.display()))?;
        let admin = tokio::net::TcpListener::bind(a.admin)
            .await
            .with_context(|| format!("bind admin {}", a.admin))?;
        let store = EtcdStore::connect(&EtcdConfig::new(a.etcd.etcd.clone()))
            .await
            .context("etcd client")?;
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        registrar::agent::run(cfg, store, api, admin, Arc::new(Metrics::new()), shutdown).await?;
        Ok(0)
    })
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
