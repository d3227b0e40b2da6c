//! The stack a rollout test runs against: real etcd, the registrar agent with 4 × v1
//! busybox httpd replicas, the healthcheck, and two balancers routing to them.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use wharf_tests::{EtcdServer, eventually, free_port, workspace_bin};

use crate::common::{self, ChildGuard, agent::TestAgent, busybox_rootfs};

const HTTPD: &str = "exec httpd -f -p $PORT -h /www";

/// A busybox image whose `/` answers `version` and whose `/cgi-bin/v` answers `version`
/// too, or a 500 on about one request in ten when `bad`.
pub fn image(dir: &Path, version: &str, bad: bool) -> PathBuf {
    let root = busybox_rootfs(dir);
    fs::create_dir_all(root.join("www/cgi-bin")).unwrap();
    fs::write(root.join("www/index.html"), format!("{version}\n")).unwrap();
    let fail = if bad {
        "n=$(od -An -N1 -tu1 /dev/urandom); if [ $((n % 10)) -eq 0 ]; then \
         printf 'Status: 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nboom\\n'; exit 0; fi\n"
    } else {
        ""
    };
    let cgi = root.join("www/cgi-bin/v");
    fs::write(
        &cgi,
        format!("#!/bin/sh\n{fail}printf 'Content-Type: text/plain\\r\\n\\r\\n{version}\\n'\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&cgi, fs::Permissions::from_mode(0o755)).unwrap();
    root
}

pub struct Balancer {
    pub addr: SocketAddr,
    pub metrics: String,
    _proc: ChildGuard,
}

/// Fields drop in order: clients of etcd first, the directory holding every state last.
pub struct Stack {
    pub lbs: Vec<Balancer>,
    _checker: ChildGuard,
    pub agent: TestAgent,
    pub etcd: EtcdServer,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// The logs of every process, for a failing assertion.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["healthcheck.log", "balancer0.log", "balancer1.log"] {
            let text = fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out += &format!("--- {f} (last 40 lines)\n");
            for l in tail.into_iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out + "--- agent\n" + &self.agent.log_text()
    }
}

/// `n` consecutive free ports for the replicas (host network: replica i binds port + i),
/// below the ephemeral range so that no outgoing connection takes one meanwhile.
fn free_range(n: u16) -> u16 {
    loop {
        let base = 20_000 + rand::random::<u16>() % 10_000;
        if (base..base + n).all(|p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()) {
            return base;
        }
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> ChildGuard {
    let log = fs::File::create(log).unwrap();
    ChildGuard(Some(
        Command::new(bin)
            .env("RUST_LOG", "info,balancer::proxy=debug")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    ))
}

/// etcd, agent, checker, two balancers, and 4 × v1 serving through both.
pub async fn stack(v1: &str) -> Result<Stack> {
    let etcd = EtcdServer::start()?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let agent = TestAgent::start(&etcd, &common::unique("n"), &state, &[]);
    agent.cli_ok(&[
        "service",
        "set",
        "web",
        "--check-path",
        "/",
        "--interval",
        "200ms",
        "--timeout",
        "1s",
        "--rise",
        "2",
        "--fall",
        "3",
        "--drain-timeout",
        "1s",
    ]);
    let endpoint = etcd.endpoint();
    let checker = spawn(
        &workspace_bin("healthcheck")?,
        &[
            "--etcd",
            &endpoint,
            "--id",
            "c1",
            "--admin",
            &format!("127.0.0.1:{}", free_port()?),
            "--lease-ttl",
            "5s",
        ],
        &dir.path().join("healthcheck.log"),
    );
    let mut lbs = Vec::new();
    for i in 0..2 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin = free_port()?;
        let toml = dir.path().join(format!("lb{i}.toml"));
        fs::write(
            &toml,
            format!(
                "[admin]\nbind = \"127.0.0.1:{admin}\"\n[discovery.etcd]\nendpoints = [\"{endpoint}\"]\n\
                 [[listener]]\nname = \"web\"\nbind = \"{addr}\"\nprotocol = \"http\"\n\
                 [[listener.route]]\npath_prefix = \"/\"\nservice = \"web\"\n"
            ),
        )?;
        let proc = spawn(
            &workspace_bin("balancer")?,
            &["--config", toml.to_str().context("utf-8")?],
            &dir.path().join(format!("balancer{i}.log")),
        );
        lbs.push(Balancer {
            addr,
            metrics: format!("http://127.0.0.1:{admin}/metrics"),
            _proc: proc,
        });
    }
    let v1_image = image(&dir.path().join("v1"), "v1", false);
    let port = free_range(8);
    agent.cli_ok(&[
        "run",
        "--service",
        "web",
        "--version",
        v1,
        "--image",
        v1_image.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--replicas",
        "4",
        "--",
        "sh",
        "-c",
        HTTPD,
    ]);
    let s = Stack {
        dir,
        etcd,
        agent,
        _checker: checker,
        lbs,
    };
    // All four passing first: before the first mark the balancers are in panic mode and
    // report every serving instance up, and the first mark alone would then take all the
    // traffic (more than busybox httpd's listen backlog of 9 absorbs).
    let store = s.etcd.store().await?;
    eventually("4 passing health marks", Duration::from_secs(60), || {
        let store = store.clone();
        async move {
            let marks =
                catalog::Store::list(&store, &["/wharf/v1/services/web/health/".to_string()])
                    .await
                    .ok()?;
            let passing = marks
                .kvs
                .iter()
                .filter(|kv| String::from_utf8_lossy(&kv.value).contains("\"passing\""))
                .count();
            (passing == 4).then_some(())
        }
    })
    .await
    .with_context(|| s.logs())?;
    for lb in &s.lbs {
        let url = lb.metrics.clone();
        eventually("4 v1 replicas routable", Duration::from_secs(60), || {
            let url = url.clone();
            async move { (backends_up(&url).await == 4).then_some(()) }
        })
        .await
        .with_context(|| s.logs())?;
    }
    Ok(s)
}

/// GETs a page over a fresh connection; the body.
async fn http_get(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (auth, path) = rest.split_at(rest.find('/')?);
    let stream = tokio::net::TcpStream::connect(auth).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", auth)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

async fn backends_up(metrics: &str) -> usize {
    http_get(metrics)
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("balancer_backend_up{")
                && l.contains("service=\"web\"")
                && l.ends_with(" 1")
        })
        .count()
}
