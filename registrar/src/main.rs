//! `registrar`: the wharf node agent, its CLI, and the container runtime helper.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use registrar::runtime::{ContainerSpec, Limits, NetSpec, helper};

mod agent_cmd;
mod cli;

#[derive(Parser)]
#[command(
    name = "registrar",
    version,
    about = "wharf node agent, its CLI, and the bundled container runtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct AgentAddr {
    /// The agent's state directory (its API socket is <state-dir>/agent.sock).
    #[arg(long, env = "WHARF_STATE_DIR", default_value = "/run/wharf")]
    state_dir: PathBuf,
}

#[derive(clap::Args, Clone)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "WHARF_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, env = "WHARF_PREFIX", default_value = catalog::defaults::PREFIX)]
    prefix: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (one per host).
    Agent(Box<agent_cmd::AgentArgs>),
    /// Start containers of a service version through the agent.
    Run(Box<cli::RunArgs>),
    /// List the agent's containers.
    Ps {
        #[command(flatten)]
        at: AgentAddr,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a container's output.
    Logs {
        #[command(flatten)]
        at: AgentAddr,
        name: String,
    },
    /// Drain, then stop a container, or every container of a service (version).
    Stop {
        #[command(flatten)]
        at: AgentAddr,
        /// Container name or service name.
        name: String,
        #[arg(long)]
        version: Option<String>,
        /// Time between SIGTERM and SIGKILL.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Remove a stopped container and its logs.
    Rm {
        #[command(flatten)]
        at: AgentAddr,
        name: String,
    },
    /// Start an exited container again, with its recorded spec.
    Start {
        #[command(flatten)]
        at: AgentAddr,
        name: String,
    },
    /// Print a container's run parameters (JSON).
    Inspect {
        #[command(flatten)]
        at: AgentAddr,
        name: String,
    },
    /// Register a process wharf did not start, under this node's lease.
    Register {
        #[command(flatten)]
        at: AgentAddr,
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "v1")]
        version: String,
        /// ADDR:PORT the process listens on.
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "http")]
        protocol: String,
    },
    /// Remove a registration made with `register`.
    Deregister {
        #[command(flatten)]
        at: AgentAddr,
        #[arg(long)]
        service: String,
        #[arg(long)]
        port: u16,
    },
    /// Operator: change a service's settings (health check, algorithm, drain timeout, …).
    Service {
        #[command(subcommand)]
        cmd: cli::ServiceCmd,
    },
    /// Operator: set the traffic split between versions, e.g. `split web v1=90 v2=10`.
    Split {
        #[command(flatten)]
        etcd: EtcdArgs,
        service: String,
        /// VERSION=SHARE pairs; `--clear` removes the split.
        shares: Vec<String>,
        #[arg(long, conflicts_with = "shares")]
        clear: bool,
    },
    /// Operator: roll a service out to a new version — rolling replacement, or canary
    /// steps gated on the balancers' metrics with automatic rollback; `--resume`/`--abort`.
    Rollout(Box<cli::RolloutArgs>),
    /// Run one container in the foreground, without an agent (exit status = the app's).
    Oneshot(Box<OneshotArgs>),
    /// Internal: run the container described by DIR/spec.json (started by the agent).
    #[command(name = "__helper", hide = true)]
    Helper { dir: PathBuf },
}

#[derive(clap::Args)]
struct OneshotArgs {
    /// Image: a rootfs directory, an OCI image layout directory or a `docker save` tarball.
    #[arg(long)]
    image: PathBuf,
    /// Where container and image state live.
    #[arg(long, default_value = "/run/wharf")]
    state_dir: PathBuf,
    /// Container name (default: random).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    hostname: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    #[arg(long, default_value = "/")]
    workdir: String,
    /// UID[:GID] to run the command as.
    #[arg(long)]
    user: Option<String>,
    /// Memory limit, e.g. 64M.
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    pids: Option<u64>,
    /// host | none
    #[arg(long, default_value = "host")]
    network: String,
    /// cgroup directory, relative to our own cgroup, that holds the container's cgroup.
    #[arg(long, default_value = "wharf")]
    cgroup_parent: String,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        // Both runtime paths stay single-threaded: no tokio runtime is ever built for them.
        Cmd::Helper { dir } => exit(run_helper(&dir)),
        Cmd::Oneshot(args) => exit(oneshot(*args)),
        Cmd::Agent(args) => exit(agent_cmd::main(*args)),
        other => exit(cli::main(other)),
    }
}

fn exit(r: Result<i32>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("registrar: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn run_helper(dir: &std::path::Path) -> Result<i32> {
    let file = ContainerSpec::spec_file(dir);
    let spec: ContainerSpec = serde_json::from_slice(
        &std::fs::read(&file).with_context(|| format!("read {}", file.display()))?,
    )
    .with_context(|| format!("parse {}", file.display()))?;
    let status = helper::run(&spec);
    if let Some(e) = &status.error {
        eprintln!("wharf: container {}: {e}", spec.id);
    }
    Ok(status.code)
}

fn oneshot(a: OneshotArgs) -> Result<i32> {
    let name = a
        .name
        .unwrap_or_else(|| format!("c{:08x}", rand::random::<u32>()));
    let store = registrar::image::Store::new(a.state_dir.join("images"));
    let image = store.resolve(&a.image)?;
    let dir = a.state_dir.join("oneshot").join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let (uid, gid) = parse_user(a.user.as_deref())?;
    let spec = ContainerSpec {
        id: name.clone(),
        layers: image.layers,
        dir: dir.clone(),
        args: a.command,
        env: parse_env(&a.env)?,
        hostname: a.hostname.unwrap_or_else(|| name.clone()),
        cwd: a.workdir,
        uid,
        gid,
        limits: Limits {
            memory: a
                .memory
                .as_deref()
                .map(registrar::runtime::spec::parse_bytes)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            cpus: a.cpus,
            pids: a.pids,
        },
        cgroup_parent: a.cgroup_parent,
        net: match a.network.as_str() {
            "host" => NetSpec::Host,
            "none" => NetSpec::None,
            other => anyhow::bail!("--network {other:?}: oneshot supports host or none"),
        },
    };
    let status = helper::run_foreground(&spec);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(e) = &status.error {
        eprintln!("registrar: {e}");
    }
    Ok(status.code)
}

pub(crate) fn parse_env(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn parse_user(user: Option<&str>) -> Result<(u32, u32)> {
    let Some(u) = user else { return Ok((0, 0)) };
    let (uid, gid) = u.split_once(':').unwrap_or((u, u));
    Ok((
        uid.parse()
            .with_context(|| format!("--user {u:?}: numeric UID expected"))?,
        gid.parse()
            .with_context(|| format!("--user {u:?}: numeric GID expected"))?,
    ))
}
