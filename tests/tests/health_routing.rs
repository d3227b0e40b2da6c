//! Across parts: the real `healthcheck` and `balancer` binaries over a real etcd. A backend
//! whose health check starts failing stops receiving traffic within
//! `fall × interval + timeout`, and no client request fails meanwhile.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use catalog::Keyspace;
use catalog::store::Store;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wharf_tests::{EtcdServer, eventually, free_port, workspace_bin};

const INTERVAL: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_millis(200);
const FALL: u32 = 2;

/// An HTTP backend answering its name on `/` and 200 or 500 on `/healthz`.
struct Backend {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
}

impl Backend {
    async fn start(name: &'static str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let ok = h.load(Ordering::SeqCst);
                        async move {
                            let (status, body) = match req.uri().path() {
                                "/healthz" if ok => (StatusCode::OK, "ok"),
                                "/healthz" => (StatusCode::INTERNAL_SERVER_ERROR, "sick"),
                                _ => (StatusCode::OK, name),
                            };
                            let mut resp = Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, healthy })
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log)?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc(child))
}

/// One `GET /` on a fresh connection: (status, body).
async fn get(addr: SocketAddr) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

fn instance(id: &str, addr: SocketAddr) -> Vec<u8> {
    serde_json::json!({
        "id": id, "service": "web", "version": "v1", "node": "n1",
        "addr": addr.ip().to_string(), "port": addr.port(),
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_stops_getting_traffic_within_fall_times_interval_plus_timeout()
-> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let ks = Keyspace::default();
    let web = "web".parse()?;
    let config = serde_json::json!({"check": {
        "path": "/healthz", "interval": "300ms", "timeout": "200ms", "rise": 1, "fall": FALL,
    }});
    store
        .put(&ks.config(&web), config.to_string().into_bytes(), None)
        .await?;
    let (a, b) = (Backend::start("A").await?, Backend::start("B").await?);
    for (id, be) in [("n1-a-80", &a), ("n1-b-80", &b)] {
        store
            .put(
                &ks.instance(&web, &id.parse()?),
                instance(id, be.addr),
                None,
            )
            .await?;
    }

    let dir = tempfile::tempdir()?;
    let endpoint = etcd.endpoint();
    let hc_admin = format!("127.0.0.1:{}", free_port()?);
    let _checker = spawn(
        &workspace_bin("healthcheck")?,
        &[
            "--etcd",
            &endpoint,
            "--id",
            "e2e",
            "--admin",
            &hc_admin,
            "--lease-ttl",
            "5s",
        ],
        &dir.path().join("healthcheck.log"),
    )?;
    let lb: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let lb_toml = dir.path().join("lb.toml");
    std::fs::write(
        &lb_toml,
        format!(
            "[admin]\nbind = \"127.0.0.1:{}\"\n[discovery.etcd]\nendpoints = [\"{endpoint}\"]\n\
             [[listener]]\nname = \"web\"\nbind = \"{lb}\"\nprotocol = \"http\"\n\
             [[listener.route]]\npath_prefix = \"/\"\nservice = \"web\"\n",
            free_port()?
        ),
    )?;
    let _balancer = spawn(
        &workspace_bin("balancer")?,
        &["--config", lb_toml.to_str().context("utf-8 path")?],
        &dir.path().join("balancer.log"),
    )?;

    // Both instances become passing and routable.
    eventually(
        "traffic to A and B",
        Duration::from_secs(30),
        || async move {
            let mut seen = (false, false);
            for _ in 0..20 {
                match get(lb).await.ok()? {
                    (200, body) if body == "A" => seen.0 = true,
                    (200, body) if body == "B" => seen.1 = true,
                    _ => {}
                }
            }
            (seen.0 && seen.1).then_some(())
        },
    )
    .await?;

    // B's check starts failing while it would still answer `/` fine.
    b.healthy.store(false, Ordering::SeqCst);
    let flipped = Instant::now();
    let mut last_b = flipped;
    let bound = INTERVAL * FALL + TIMEOUT;
    // Keep sending until well past the bound; every answer must be a 200.
    while flipped.elapsed() < bound * 3 {
        let (status, body) = get(lb).await?;
        if status != 200 {
            bail!("request failed with {status} after the flip");
        }
        if body == "B" {
            last_b = Instant::now();
        }
    }
    let evicted_after = last_b.duration_since(flipped);
    // Allowances beyond the bound: the checker's ±10 % interval jitter, and the
    // etcd write plus watch delivery to the balancer (milliseconds on loopback).
    let allowed = bound + INTERVAL * FALL / 10 + Duration::from_millis(150);
    assert!(
        evicted_after <= allowed,
        "B still got traffic {evicted_after:?} after its check failed (allowed {allowed:?})"
    );
    // And it is really out: the mark says critical.
    let mark = store
        .get(&ks.health(&web, &"n1-b-80".parse()?))
        .await?
        .context("no health mark for B")?;
    let mark: serde_json::Value = serde_json::from_slice(&mark.value)?;
    assert_eq!(mark["status"], "critical");
    Ok(())
}
