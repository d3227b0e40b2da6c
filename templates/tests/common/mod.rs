//! Shared helpers of render's integration tests: catalog writes to a real etcd, a scratch
//! directory with render.toml / conf.d / templates, the real `render` binary held by a guard,
//! metrics scraping and small HTTP backends.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use catalog::store::Store;
use catalog::{EtcdStore, Keyspace};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tempfile::TempDir;

pub const WAIT: Duration = Duration::from_secs(20);

/// Writes catalog keys the way registrar and healthcheck do.
pub struct Catalog {
    pub store: EtcdStore,
    pub ks: Keyspace,
}

impl Catalog {
    pub fn new(store: EtcdStore) -> Self {
        Self {
            store,
            ks: Keyspace::default(),
        }
    }

    fn instance_key(&self, svc: &str, id: &str) -> String {
        self.ks
            .instance(&svc.parse().unwrap(), &id.parse().unwrap())
    }

    pub async fn checker(&self, id: &str) -> Result<()> {
        let key = self.ks.checker(&id.parse().unwrap());
        let v = json!({"version": "test", "started": 1});
        self.store
            .put(&key, v.to_string().into_bytes(), None)
            .await?;
        Ok(())
    }

    pub async fn instance(
        &self,
        svc: &str,
        id: &str,
        version: &str,
        port: u16,
        weight: u32,
        protocol: &str,
    ) -> Result<()> {
        let v = json!({"id": id, "service": svc, "version": version, "node": "n1",
                       "addr": "127.0.0.1", "port": port, "weight": weight,
                       "protocol": protocol});
        self.store
            .put(
                &self.instance_key(svc, id),
                v.to_string().into_bytes(),
                None,
            )
            .await?;
        Ok(())
    }

    /// A health mark about the current registration of `id`.
    pub async fn health(&self, svc: &str, id: &str, status: &str) -> Result<()> {
        let inst = self
            .store
            .get(&self.instance_key(svc, id))
            .await?
            .context("health mark for an unregistered instance")?;
        let key = self.ks.health(&svc.parse().unwrap(), &id.parse().unwrap());
        let v = json!({"status": status, "since": 1, "checker": "c1",
                       "observed_mod_rev": inst.mod_revision});
        self.store
            .put(&key, v.to_string().into_bytes(), None)
            .await?;
        Ok(())
    }

    /// Registers `id` and marks it passing.
    pub async fn up(&self, svc: &str, id: &str, version: &str, port: u16) -> Result<()> {
        self.instance(svc, id, version, port, 100, "http").await?;
        self.health(svc, id, "passing").await
    }

    pub async fn config(&self, svc: &str, config: serde_json::Value) -> Result<()> {
        let key = self.ks.config(&svc.parse().unwrap());
        self.store
            .put(&key, config.to_string().into_bytes(), None)
            .await?;
        Ok(())
    }

    pub async fn remove(&self, svc: &str, id: &str) -> Result<()> {
        self.store.delete(&self.instance_key(svc, id)).await?;
        let key = self.ks.health(&svc.parse().unwrap(), &id.parse().unwrap());
        self.store.delete(&key).await?;
        Ok(())
    }

    pub async fn raw(&self, key: &str, value: &str) -> Result<()> {
        self.store.put(key, value.as_bytes().to_vec(), None).await?;
        Ok(())
    }
}

/// A scratch directory laid out like /etc/wharf: render.toml, conf.d/, templates/, out/.
pub struct Setup {
    pub dir: TempDir,
    pub admin_port: u16,
}

impl Setup {
    pub fn new(etcd_endpoint: &str, extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wharf-render-").tempdir()?;
        for d in ["conf.d", "templates", "out"] {
            std::fs::create_dir(dir.path().join(d))?;
        }
        let admin_port = wharf_tests::free_port()?;
        let config = format!(
            "{extra}\n[etcd]\nendpoints = [\"{etcd_endpoint}\"]\ndial_timeout = \"1s\"\n\
             request_timeout = \"2s\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"
        );
        std::fs::write(dir.path().join("render.toml"), config)?;
        Ok(Self { dir, admin_port })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("render.toml")
    }

    pub fn template(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.path("templates").join(name), text)?;
        Ok(())
    }

    pub fn resource(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.path("conf.d").join(format!("{name}.toml")), text)?;
        Ok(())
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.path("out").join(name)
    }

    pub fn read_out(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.out(name)).ok()
    }

    /// `render --onetime` (plus `args`), to completion.
    pub fn onetime(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_render"))
            .arg("--config")
            .arg(self.config())
            .arg("--onetime")
            .args(args)
            .env("RUST_LOG", "info")
            .output()?)
    }

    pub fn spawn(&self) -> Result<RenderProc> {
        let log = self.path("render.log");
        let child = Command::new(env!("CARGO_BIN_EXE_render"))
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "info,templates=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.path("render.out"))?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(RenderProc {
            child: Some(child),
            log,
            admin_port: self.admin_port,
        })
    }
}

/// A running `render`; SIGTERM, then SIGKILL, when dropped.
pub struct RenderProc {
    child: Option<Child>,
    pub log: PathBuf,
    pub admin_port: u16,
}

impl RenderProc {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map_or(0, |c| c.id() as i32))
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(self.pid(), sig)?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Value of a metric line starting with `series` (name plus labels), 0 when absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        metric(self.admin_port, series).await
    }

    /// Stops with SIGTERM and returns whether it exited cleanly in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RenderProc {
    fn drop(&mut self) {
        let _ = self.terminate(Duration::from_secs(5));
    }
}

/// Scrapes `/metrics` on the admin port; the value of the first line starting with
/// `series`, 0 when there is none.
pub async fn metric(port: u16, series: &str) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix(series)
            && rest.starts_with(' ')
        {
            return Ok(rest.trim().parse()?);
        }
    }
    Ok(0.0)
}

/// Waits for `what` with the shared deadline, polling a synchronous condition.
pub async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    wharf_tests::eventually(what, WAIT, || {
        let v = f();
        async move { v }
    })
    .await
}

/// Files left in a directory besides `keep` (stray temp files would show here).
pub fn strays(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !keep.contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if !cond {
        bail!("{}", msg());
    }
    Ok(())
}
