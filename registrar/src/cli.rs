//! The CLI commands that talk to the agent's socket or, for operator commands, to etcd.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use catalog::{EtcdConfig, EtcdStore, Keyspace, ServiceName, StatusRange};
use registrar::api::{self, Network, Request, Response, RunRequest};
use registrar::runtime::Limits;

use crate::{AgentAddr, Cmd, EtcdArgs};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    at: AgentAddr,
    #[arg(long)]
    service: String,
    #[arg(long)]
    version: String,
    /// Image on the agent's host: rootfs dir, OCI layout dir or docker-save tarball.
    #[arg(long)]
    image: String,
    /// Port of the first replica (passed as $PORT).
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 1)]
    replicas: u16,
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    pids: Option<u64>,
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// host | bridge
    #[arg(long, default_value = "host")]
    network: String,
    /// no | on-failure[:N] | always
    #[arg(long, default_value = "no")]
    restart: registrar::restart::RestartPolicy,
    /// http | tcp
    #[arg(long, default_value = "http")]
    protocol: String,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `registrar rollout web --image IMG --version v2 [--steps 5,25,50,100] ...`
#[derive(clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    at: AgentAddr,
    #[command(flatten)]
    etcd: EtcdArgs,
    service: String,
    /// Image of the new version (rootfs dir, OCI layout dir or docker-save tarball).
    #[arg(long, required_unless_present_any = ["abort", "resume"])]
    image: Option<String>,
    /// The new version.
    #[arg(long, required_unless_present_any = ["abort", "resume"])]
    version: Option<String>,
    /// New replicas (default: as many as the old versions run).
    #[arg(long)]
    replicas: Option<u16>,
    /// New replicas started at a time.
    #[arg(long, default_value_t = 1)]
    max_surge: u16,
    /// Canary steps in percent of traffic, e.g. 5,25,50,100. Without: a plain rolling
    /// replacement, one surge at a time.
    #[arg(long)]
    steps: Option<String>,
    /// How long each step (or, with --metrics, each replaced surge) is watched.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    step_wait: Duration,
    /// Highest tolerated share of 5xx answers from the new version, e.g. 1% (default: the
    /// service's canary gates, else 1%).
    #[arg(long, value_parser = crate_parse_rate)]
    max_error_rate: Option<f64>,
    /// Highest tolerated new/old p99 latency ratio (default: the service's, else 1.5).
    #[arg(long)]
    max_p99_ratio: Option<f64>,
    /// A balancer's metrics page (repeat for every balancer replica). Steps are gated only
    /// when given.
    #[arg(long = "metrics")]
    metrics: Vec<String>,
    /// Host network: port of the new replica 0 (replica i gets port + i); default: the
    /// first port above every port of the service's containers.
    #[arg(long)]
    port: Option<u16>,
    /// How long new replicas may take to pass their checks and be routed by every balancer.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Continue an interrupted rollout with its recorded settings.
    #[arg(long, conflicts_with_all = ["abort", "image", "version"])]
    resume: bool,
    /// Roll an interrupted rollout back.
    #[arg(long, conflicts_with_all = ["image", "version"])]
    abort: bool,
    /// Command of the new replicas (default: the old replicas' command).
    #[arg(last = true)]
    command: Vec<String>,
}

fn crate_parse_rate(s: &str) -> Result<f64, String> {
    registrar::rollout::plan::parse_rate(s)
}

#[derive(clap::Subcommand)]
pub enum ServiceCmd {
    /// Change settings of a service; unspecified ones keep their value.
    Set(Box<ServiceSetArgs>),
}

#[derive(clap::Args)]
pub struct ServiceSetArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    service: String,
    /// HTTP health check path (a TCP connect check when never set).
    #[arg(long)]
    check_path: Option<String>,
    /// Use a TCP connect check instead of HTTP.
    #[arg(long, conflicts_with = "check_path")]
    tcp_check: bool,
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    #[arg(long)]
    rise: Option<u32>,
    #[arg(long)]
    fall: Option<u32>,
    /// Accepted status codes, e.g. 200-299 (repeatable).
    #[arg(long)]
    expect: Vec<StatusRange>,
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    slow_start: Option<Duration>,
    /// p2c | round_robin | least_conn
    #[arg(long)]
    algorithm: Option<String>,
}

pub fn main(cmd: Cmd) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(cmd))
}

async fn call(at: &AgentAddr, req: Request) -> Result<Response> {
    let sock = registrar::agent::StateDir::new(&at.state_dir).socket();
    Ok(api::call(&sock, &req).await?)
}

/// Awaits a slow agent call; on a terminal, says what is happening and for how long
/// (one updating stderr line after the first second), so a drain does not look like a hang.
async fn with_progress<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    tokio::pin!(fut);
    let mut shown = false;
    loop {
        tokio::select! {
            out = &mut fut => {
                if shown {
                    eprint!("\r\x1b[2K");
                }
                return out;
            }
            _ = tick.tick() => {
                shown = true;
                eprint!("\r\x1b[2K{what}… {}s", start.elapsed().as_secs());
                let _ = std::io::stderr().flush();
            }
        }
    }
}

/// Prints an answer; an error answer becomes exit status 1.
fn print(resp: Response) -> Result<i32> {
    match resp {
        Response::Ok { message } => {
            if !message.is_empty() {
                println!("{message}");
            }
            Ok(0)
        }
        Response::Logs { text } => {
            print!("{text}");
            Ok(0)
        }
        Response::Containers { containers } => {
            print!("{}", containers_table(containers));
            Ok(0)
        }
        Response::Spec { run } => {
            println!("{}", serde_json::to_string_pretty(&run)?);
            Ok(0)
        }
        Response::Error { message } => {
            eprintln!("registrar: {message}");
            Ok(1)
        }
    }
}

/// `registrar ps`: one aligned row per container, grouped by service and version.
pub fn containers_table(mut containers: Vec<registrar::api::ContainerInfo>) -> String {
    if containers.is_empty() {
        return "no containers (start some with `registrar run`)\n".to_owned();
    }
    containers
        .sort_by(|a, b| (&a.service, &a.version, &a.name).cmp(&(&b.service, &b.version, &b.name)));
    let mut t = catalog::table::TextTable::new(&[
        "NAME",
        "SERVICE",
        "VERSION",
        "STATE",
        "ADDRESS",
        "INSTANCE",
        ">PID",
        ">EXIT",
        ">RESTARTS",
    ]);
    for c in &containers {
        t.row(&[
            c.name.clone(),
            c.service.clone(),
            c.version.clone(),
            c.state.clone(),
            format!("{}:{}", c.addr, c.port),
            c.instance.clone(),
            c.helper_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            c.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            c.restarts.to_string(),
        ]);
    }
    let mut out = t.render();
    let serving = containers.iter().filter(|c| c.state == "serving").count();
    out.push_str(&format!(
        "{} container(s), {serving} serving\n",
        containers.len()
    ));
    out
}

fn protocol(s: &str) -> Result<catalog::Protocol> {
    match s {
        "http" => Ok(catalog::Protocol::Http),
        "tcp" => Ok(catalog::Protocol::Tcp),
        _ => bail!("--protocol {s:?}: expected http or tcp"),
    }
}

async fn run(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Run(a) => {
            let a = *a;
            let network = match a.network.as_str() {
                "host" => Network::Host,
                "bridge" => Network::Bridge,
                o => bail!("--network {o:?}: expected host or bridge"),
            };
            let req = RunRequest {
                service: a.service,
                version: a.version,
                image: std::path::absolute(&a.image)?
                    .to_string_lossy()
                    .into_owned(),
                port: a.port,
                replicas: a.replicas,
                first: 0,
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
                env: crate::parse_env(&a.env)?,
                network,
                restart: a.restart,
                protocol: protocol(&a.protocol)?,
                command: a.command,
            };
            let what = format!(
                "starting {} × {} {} (waiting for the port to accept connections)",
                req.replicas, req.service, req.version
            );
            print(with_progress(&what, call(&a.at, Request::Run(req))).await?)
        }
        Cmd::Ps { at, json } => {
            let resp = call(&at, Request::Ps).await?;
            if json && let Response::Containers { containers } = &resp {
                println!("{}", serde_json::to_string_pretty(containers)?);
                return Ok(0);
            }
            print(resp)
        }
        Cmd::Logs { at, name } => print(call(&at, Request::Logs { name }).await?),
        Cmd::Stop {
            at,
            name,
            version,
            grace,
        } => {
            let what = format!(
                "stopping {name}{}: draining (no new requests) for the service's drain timeout, then SIGTERM, SIGKILL after the grace period",
                version
                    .as_deref()
                    .map(|v| format!(" {v}"))
                    .unwrap_or_default()
            );
            let req = Request::Stop {
                name,
                version,
                grace,
            };
            print(with_progress(&what, call(&at, req)).await?)
        }
        Cmd::Rm { at, name } => print(call(&at, Request::Rm { name }).await?),
        Cmd::Start { at, name } => print(call(&at, Request::Start { name }).await?),
        Cmd::Inspect { at, name } => print(call(&at, Request::Inspect { name }).await?),
        Cmd::Register {
            at,
            service,
            version,
            addr,
            protocol: p,
        } => print(
            call(
                &at,
                Request::Register {
                    service,
                    version,
                    addr: addr.ip(),
                    port: addr.port(),
                    protocol: protocol(&p)?,
                },
            )
            .await?,
        ),
        Cmd::Deregister { at, service, port } => {
            print(call(&at, Request::Deregister { service, port }).await?)
        }
        Cmd::Service {
            cmd: ServiceCmd::Set(a),
        } => service_set(*a).await,
        Cmd::Split {
            etcd,
            service,
            shares,
            clear,
        } => {
            let split = if clear {
                Default::default()
            } else {
                registrar::operator::parse_split(&shares)?
            };
            let (store, keys, svc) = connect(&etcd, &service).await?;
            let c = registrar::operator::update_config(&store, &keys, &svc, |c| {
                c.split = split.clone()
            })
            .await?;
            println!("{}", serde_json::to_string(&c.split)?);
            Ok(0)
        }
        Cmd::Rollout(a) => rollout(*a).await,
        Cmd::Agent(_) | Cmd::Oneshot(_) | Cmd::Helper { .. } => unreachable!("handled in main"),
    }
}

async fn connect(etcd: &EtcdArgs, service: &str) -> Result<(EtcdStore, Keyspace, ServiceName)> {
    let svc = ServiceName::new(service).with_context(|| format!("service {service:?}"))?;
    let keys =
        Keyspace::new(&etcd.prefix).with_context(|| format!("--prefix {:?}", etcd.prefix))?;
    let store = EtcdStore::connect(&EtcdConfig::new(etcd.etcd.clone())).await?;
    Ok((store, keys, svc))
}

async fn rollout(a: RolloutArgs) -> Result<i32> {
    use registrar::rollout::{Action, Options, Outcome, Rollout};
    if a.max_p99_ratio.is_some_and(|r| r.is_nan() || r < 1.0) {
        bail!("--max-p99-ratio must be at least 1");
    }
    for m in &a.metrics {
        if !m.starts_with("http://") {
            bail!("--metrics {m:?}: expected http://HOST:PORT/metrics");
        }
    }
    let action = if a.abort {
        Action::Abort
    } else if a.resume {
        Action::Resume
    } else {
        let image = a.image.context("--image")?;
        Action::Start(Box::new(Options {
            version: a.version.context("--version")?,
            image: std::path::absolute(&image)?.to_string_lossy().into_owned(),
            command: a.command,
            port: a.port,
            replicas: a.replicas,
            max_surge: a.max_surge,
            steps: match &a.steps {
                Some(s) => registrar::rollout::plan::parse_steps(s).map_err(anyhow::Error::msg)?,
                None => vec![],
            },
            step_wait: a.step_wait,
            ready_timeout: a.ready_timeout,
            max_error_rate: a.max_error_rate,
            max_p99_ratio: a.max_p99_ratio,
            metrics: a.metrics,
        }))
    };
    let abort = a.abort;
    let (store, keys, svc) = connect(&a.etcd, &a.service).await?;
    let socket = registrar::agent::StateDir::new(&a.at.state_dir).socket();
    match Rollout::new(store, keys, svc, socket, a.json)
        .run(action)
        .await?
    {
        Outcome::Succeeded => Ok(0),
        Outcome::RolledBack(_) if abort => Ok(0),
        Outcome::RolledBack(reason) => {
            eprintln!("registrar: rollout rolled back: {reason}");
            Ok(1)
        }
    }
}

async fn service_set(a: ServiceSetArgs) -> Result<i32> {
    let algorithm = a
        .algorithm
        .as_deref()
        .map(|s| {
            serde_json::from_value::<catalog::Algorithm>(serde_json::Value::String(s.into()))
                .map_err(|_| {
                    anyhow::anyhow!("--algorithm {s:?}: expected p2c, round_robin or least_conn")
                })
        })
        .transpose()?;
    if a.rise == Some(0) || a.fall == Some(0) {
        bail!("--rise and --fall must be at least 1");
    }
    if let Some(p) = &a.check_path
        && !p.starts_with('/')
    {
        bail!("--check-path {p:?} must start with '/'");
    }
    let (store, keys, svc) = connect(&a.etcd, &a.service).await?;
    let c = registrar::operator::update_config(&store, &keys, &svc, |c| {
        if let Some(p) = &a.check_path {
            c.check.path = Some(p.clone());
        }
        if a.tcp_check {
            c.check.path = None;
        }
        if let Some(v) = a.interval {
            c.check.interval = v;
        }
        if let Some(v) = a.timeout {
            c.check.timeout = v;
        }
        if let Some(v) = a.rise {
            c.check.rise = v;
        }
        if let Some(v) = a.fall {
            c.check.fall = v;
        }
        if !a.expect.is_empty() {
            c.check.expect = a.expect.clone();
        }
        if let Some(v) = a.drain_timeout {
            c.drain_timeout = v;
        }
        if let Some(v) = a.slow_start {
            c.slow_start = v;
        }
        if let Some(v) = algorithm {
            c.algorithm = v;
        }
    })
    .await?;
    println!("{}", serde_json::to_string(&c)?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, version: &str, state: &str, port: u16) -> registrar::api::ContainerInfo {
        registrar::api::ContainerInfo {
            name: name.into(),
            service: "web".into(),
            version: version.into(),
            instance: format!("n1-{name}-{port}"),
            addr: "127.0.0.1".into(),
            port,
            state: state.into(),
            helper_pid: (state != "exited").then_some(4242),
            exit_code: (state == "exited").then_some(137),
            restarts: 0,
        }
    }

    #[test]
    fn ps_table_is_aligned_grouped_and_summed_up() {
        let text = containers_table(vec![
            info("web-v2-0", "v2", "serving", 8090),
            info("web-v1-10", "v1", "exited", 8080),
            info("web-v1-0", "v1", "draining", 8081),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("NAME       SERVICE  VERSION  STATE"),
            "{text}"
        );
        assert!(lines[1].starts_with("web-v1-0 "), "{text}");
        assert!(lines[2].starts_with("web-v1-10"), "{text}");
        assert!(lines[3].starts_with("web-v2-0 "), "{text}");
        let state = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[2][state..state + 6], "exited", "{text}");
        assert!(lines[2].ends_with("137         0"), "{text}");
        assert_eq!(lines[4], "3 container(s), 1 serving");
        assert_eq!(
            containers_table(vec![]),
            "no containers (start some with `registrar run`)\n"
        );
    }
}
