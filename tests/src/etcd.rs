//! Real etcd servers for tests: Debian's `etcd` binary on free loopback ports with a
//! temporary data directory.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use catalog::{EtcdConfig, EtcdStore};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::wait::free_port;

/// Certificate files of a TLS etcd server.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// Where the etcd binary is: `$WHARF_ETCD_BIN`, else `etcd` on the `PATH`.
fn etcd_bin() -> String {
    std::env::var("WHARF_ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned())
}

/// One etcd member process. Stopped (SIGKILL, then reaped) when dropped.
pub struct EtcdServer {
    name: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, also when clients must use TLS.
    metrics_port: u16,
    initial_cluster: String,
    tls: Option<ServerTls>,
    child: Option<Child>,
    /// Owns the temporary directory of a standalone server (members of a cluster share the
    /// cluster's).
    _dir: Option<TempDir>,
}

impl EtcdServer {
    /// Starts a single-member cluster and waits until it is healthy.
    pub fn start() -> Result<Self> {
        Self::start_on(None)
    }

    /// Starts a single-member cluster that serves clients over TLS only.
    pub fn start_tls(tls: ServerTls) -> Result<Self> {
        Self::start_with(None, Some(tls))
    }

    /// Starts a new single-member cluster (fresh data dir, new cluster id) on `client_port`
    /// if given, e.g. to replace a server a client is already pointed at.
    pub fn start_on(client_port: Option<u16>) -> Result<Self> {
        Self::start_with(client_port, None)
    }

    fn start_with(client_port: Option<u16>, tls: Option<ServerTls>) -> Result<Self> {
        // Free ports can be taken by someone else between probe and bind: retry a few times.
        let mut last = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("wharf-etcd-").tempdir()?;
            let (client, peer) = (client_port.map_or_else(free_port, Ok)?, free_port()?);
            let name = "m0".to_owned();
            let cluster = format!("{name}=http://127.0.0.1:{peer}");
            let mut server = Self::new(dir.path(), &name, client, peer, cluster)?;
            server._dir = Some(dir);
            server.tls = tls.clone();
            match server
                .spawn()
                .and_then(|_| server.wait_healthy(Duration::from_secs(20)))
            {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn new(
        base: &Path,
        name: &str,
        client_port: u16,
        peer_port: u16,
        cluster: String,
    ) -> Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            data_dir: base.join(format!("{name}.etcd")),
            log_path: base.join(format!("{name}.log")),
            client_port,
            peer_port,
            metrics_port: free_port()?,
            initial_cluster: cluster,
            tls: None,
            child: None,
            _dir: None,
        })
    }

    /// `http://127.0.0.1:<port>` (`https://` for a TLS server).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// PID of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A `catalog` client for this member.
    pub async fn store(&self) -> Result<EtcdStore> {
        let mut config = EtcdConfig::new([self.endpoint()]);
        config.request_timeout = Duration::from_secs(5);
        Ok(EtcdStore::connect(&config).await?)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", "wharf-test"])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            // Frequent progress notifications exercise the watcher's resume path.
            .args(["--experimental-watch-progress-notify-interval", "1s"])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics_port),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
            if let Some(ca) = &tls.client_ca {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} (apt-get install etcd-server)", etcd_bin()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/health` answers true, failing early if the process exits.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("etcd exited with {status}; log:\n{}", self.log_tail());
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn healthy(&self) -> bool {
        let probe = || -> std::io::Result<String> {
            let addr = ([127, 0, 0, 1], self.metrics_port).into();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        };
        probe().is_ok_and(|body| body.contains("\"health\":\"true\""))
    }

    /// The last lines etcd logged, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the process with SIGKILL (a crash) and reaps it. The data dir stays.
    pub fn kill(&mut self) {
        self.signal_and_reap(Signal::SIGKILL);
    }

    /// Stops the process with SIGTERM (a clean shutdown) and reaps it.
    pub fn stop(&mut self) {
        self.signal_and_reap(Signal::SIGTERM);
    }

    fn signal_and_reap(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    /// Starts the same member again on the same ports and data dir, and waits until healthy.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(20))
    }

    /// Starts a stopped member without waiting (a cluster member cannot be healthy alone).
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    /// Saves a snapshot of the data (`etcdctl snapshot save`).
    pub fn snapshot(&self, path: &Path) -> Result<()> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "snapshot", "save"])
            .arg(path)
            .output()
            .context("running etcdctl (apt-get install etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl snapshot save: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops the member, replaces its data with `snapshot` (same name, peers and token, so
    /// the same cluster id, but the snapshot's older revision), and starts it again: what an
    /// operator's restore from backup looks like to clients.
    pub fn restore(&mut self, snapshot: &Path) -> Result<()> {
        self.kill();
        std::fs::remove_dir_all(&self.data_dir)?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--name", &self.name])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", "wharf-test"])
            .args(["--initial-advertise-peer-urls", &peer])
            .output()
            .context("running etcdctl snapshot restore")?;
        if !out.status.success() {
            bail!(
                "etcdctl snapshot restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(20))
    }

    /// Compacts the history up to the current revision.
    pub async fn compact(&self) -> Result<i64> {
        let store = self.store().await?;
        let rev = store.revision().await?;
        store.compact(rev).await?;
        Ok(rev)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asks the kernel to SIGKILL the child if the thread that started it dies, so that a test
/// binary killed by a timeout does not leave etcd servers behind. Start servers from the
/// test's own thread (not from a short-lived blocking-pool thread).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// A multi-member etcd cluster on loopback, sharing one temporary directory.
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one is healthy.
    pub fn start(size: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wharf-etcd-cluster-")
            .tempdir()?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdServer> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                EtcdServer::new(
                    dir.path(),
                    &format!("m{i}"),
                    *client,
                    *peer,
                    cluster.clone(),
                )
            })
            .collect::<Result<_>>()?;
        for m in &mut members {
            m.spawn()?;
        }
        for m in &mut members {
            m.wait_healthy(Duration::from_secs(30))?;
        }
        Ok(Self { members, _dir: dir })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// A client that balances over every member.
    pub async fn store(&self) -> Result<EtcdStore> {
        Ok(EtcdStore::connect(&EtcdConfig::new(self.endpoints())).await?)
    }
}
