//! Running the real `registrar agent` against a real etcd in tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use catalog::{EtcdStore, Instance, Keyspace, Store};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wharf_tests::{EtcdServer, free_port};

use super::{BIN, ChildGuard};

pub struct TestAgent {
    pub node: String,
    pub state: PathBuf,
    pub endpoint: String,
    pub admin_port: u16,
    pub guard: ChildGuard,
    pub log: PathBuf,
    extra: Vec<String>,
}

impl TestAgent {
    pub fn start(etcd: &EtcdServer, node: &str, state: &Path, extra: &[&str]) -> Self {
        let mut a = Self {
            node: node.into(),
            state: state.into(),
            endpoint: etcd.endpoint(),
            admin_port: 0,
            guard: ChildGuard(None),
            log: state.with_extension("agent.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn();
        a
    }

    /// Starts the agent process (again) with the same settings.
    pub fn spawn(&mut self) {
        self.admin_port = free_port().unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["agent", "--etcd", &self.endpoint, "--node", &self.node])
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--admin", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--restart-backoff", "100ms", "--cgroup-parent", "wharf"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.guard = ChildGuard(Some(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.state.join("agent.sock")).is_err()
            || !self.ready()
        {
            assert!(
                Instant::now() < deadline,
                "agent did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ready(&self) -> bool {
        self.log_text().contains("agent ready")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a CLI command against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("WHARF_STATE_DIR", &self.state)
            .env("WHARF_ETCD", &self.endpoint)
            .stdin(Stdio::null());
        c.output().unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "registrar {args:?} failed: {}{}\nagent log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn kill9(&mut self) {
        self.guard.signal(Signal::SIGKILL);
        let _ = self.guard.wait_code();
    }

    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.state.join("containers").join(name)
    }

    /// The cgroup name of a container (the runtime's container id).
    pub fn cgroup_name(&self, name: &str) -> String {
        format!("{}-{name}", self.node)
    }

    pub fn helper_pid(&self, name: &str) -> Option<i32> {
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(self.container_dir(name).join("meta.json")).ok()?)
                .ok()?;
        meta["helper_pid"].as_i64().map(|p| p as i32)
    }

    pub fn init_pid(&self, name: &str) -> Option<i32> {
        fs::read_to_string(self.container_dir(name).join("init.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for TestAgent {
    /// Containers outlive their agent by design; a test must not leave them behind.
    fn drop(&mut self) {
        self.guard.signal(Signal::SIGKILL);
        let Ok(rd) = fs::read_dir(self.state.join("containers")) else {
            return;
        };
        let names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for name in names {
            let helper = self.helper_pid(&name);
            if let Some(init) = self.init_pid(&name) {
                let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
            }
            if let Some(h) = helper {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Path::new(&format!("/proc/{h}")).exists() && Instant::now() < deadline {
                    // Reap it if it was the agent's child that is now ours (it is not); just wait.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// This node's instances in etcd, by key.
pub async fn instances(store: &EtcdStore, service: &str) -> Vec<(String, Instance, i64, i64)> {
    let keys = Keyspace::default();
    let prefix = keys.service(&catalog::ServiceName::new(service).unwrap());
    let listing = store.list(&[prefix]).await.unwrap();
    listing
        .kvs
        .into_iter()
        .filter(|kv| String::from_utf8_lossy(&kv.key).contains("/instances/"))
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                serde_json::from_slice(&kv.value).unwrap(),
                kv.mod_revision,
                kv.lease,
            )
        })
        .collect()
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

/// `GET path` over a socket bound to `device`, so the request cannot leave the host.
pub async fn http_get_via(addr: &str, device: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind_device(Some(device.as_bytes()))?;
    let mut s = tokio::time::timeout(Duration::from_secs(2), socket.connect(target))
        .await
        .map_err(std::io::Error::other)??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
