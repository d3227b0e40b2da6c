//! Shared pieces of the balancer's end-to-end tests: real HTTP backends (hyper), the real
//! `balancer` binary in a guard that kills it on drop, an HTTP client and a load loop.
#![allow(dead_code)]

pub mod framing;
mod load;

// Not every test file loads the balancer; each one compiles this module on its own.
#[allow(unused_imports)]
pub use load::{Load, LoadStats, spread};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const WAIT: Duration = Duration::from_secs(20);

/// A proptest runner for a test that drives the real binary from a blocking thread (no
/// `proptest!` macro): `default_cases` cases unless `PROPTEST_CASES` says otherwise, and
/// nothing persisted (there is no source file to keep failures beside).
pub fn proptest_runner(default_cases: u32) -> proptest::test_runner::TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    })
}

/// An lb.toml with one HTTP listener (`@PORT@`, bodies up to 100 kB) routing everything
/// to one static instance at `addr`.
pub fn one_service_config(addr: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
max_body_bytes = 100000
  [[listener.route]]
  service = "web"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{addr}"
"#
    )
}

/// An lb.toml with one HTTP listener (`@PORT@`) routing everything to the static service
/// `name`: its table gets `service_lines` (each ending in a newline) and one endpoint per
/// address of `endpoints`.
pub fn service_config(name: &str, service_lines: &str, endpoints: &[SocketAddr]) -> String {
    let mut c = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "{name}"
[[service]]
name = "{name}"
{service_lines}"#
    );
    for a in endpoints {
        c.push_str(&format!("  [[service.endpoint]]\n  addr = \"{a}\"\n"));
    }
    c
}

/// A real HTTP/1.1 backend. Paths: `/slow/<ms>` answers after a delay, `/headers` echoes
/// the request head, `/mirror` answers `METHOD target\n` and the body it read, `/upgrade` switches to a byte echo, `/status/<code>` answers that code,
/// anything else answers the backend's name; a backend named `fail*` answers 500 to all. Every answer carries `x-backend`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// The targets of the `/mirror` requests read so far.
    pub mirrored: Arc<Mutex<Vec<String>>>,
    /// Connections currently open to this backend.
    pub open: Arc<AtomicU64>,
    /// Connections accepted since the start.
    pub accepted: Arc<AtomicU64>,
    kill: watch::Sender<bool>,
}

impl Backend {
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let open_in = open.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let accepted_in = accepted.clone();
        let (kill, kill_rx) = watch::channel(false);
        let mirrored = Arc::new(Mutex::new(Vec::new()));
        let (n, h, m) = (name.to_owned(), hits.clone(), mirrored.clone());
        let mut accept_kill = kill_rx.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = accept_kill.wait_for(|k| *k) => return,
                };
                let (n, h, m) = (n.clone(), h.clone(), m.clone());
                let mut conn_kill = kill_rx.clone();
                let open = open_in.clone();
                open.fetch_add(1, Ordering::Relaxed);
                accepted_in.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, n.clone(), h.clone(), m.clone()));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    // Killed: the connection is dropped mid-flight, like a crashed process.
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_kill.wait_for(|k| *k) => {}
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Self {
            name: name.to_owned(),
            addr,
            hits,
            mirrored,
            open,
            accepted,
            kill,
        })
    }

    /// Stops accepting and drops every connection at once.
    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    req: Request<Incoming>,
    name: String,
    hits: Arc<AtomicU64>,
    mirrored: Arc<Mutex<Vec<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    // Backends named `fail*` answer 500 to everything.
    let mut resp = if name.starts_with("fail") {
        let mut r = Response::new(Full::new(Bytes::from(name.clone())));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        Response::new(Full::new(Bytes::from(name.clone())))
    } else if path == "/headers" {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        Response::new(Full::new(Bytes::from(text)))
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(Full::new(Bytes::from(name.clone())));
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        r
    } else if path == "/upgrade" {
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("upgrade", "echo".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r
    } else if path == "/mirror" {
        // What arrived, for a client to compare with what it sent: method, target, body.
        let head = format!("{} {}\n", req.method(), req.uri());
        mirrored.lock().unwrap().push(req.uri().to_string());
        match req.into_body().collect().await {
            Ok(b) => Response::new(Full::new([head.as_bytes(), &b.to_bytes()].concat().into())),
            Err(_) => {
                let mut r = Response::new(Full::new(Bytes::from("bad body")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        }
    } else if path == "/echo" {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        match body {
            Ok(b) => Response::new(Full::new(Bytes::from(format!("{}", b.len())))),
            Err(_) => {
                let mut r = Response::new(Full::new(Bytes::from("bad body")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        }
    } else {
        Response::new(Full::new(Bytes::from(name.clone())))
    };
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    Ok(resp)
}

/// The real `balancer` binary, killed (SIGKILL) and reaped when dropped.
pub struct Lb {
    child: Option<Child>,
    pub port: u16,
    pub admin: u16,
    pub dir: tempfile::TempDir,
}

impl Lb {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("lb.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("balancer.log")
    }

    /// Writes `config` (with `@PORT@` and `@ADMIN@` filled in) and starts the balancer.
    pub async fn start(config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wharf-lb-").tempdir()?;
        let port = wharf_tests::free_port()?;
        let admin = wharf_tests::free_port()?;
        let mut lb = Self {
            child: None,
            port,
            admin,
            dir,
        };
        lb.write_config(config)?;
        let log = std::fs::File::create(lb.log_path())?;
        let child = Command::new(env!("CARGO_BIN_EXE_balancer"))
            .arg("--config")
            .arg(lb.config_path())
            .args(["--threads", "1"])
            .env("RUST_LOG", "info,balancer=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        lb.child = Some(child);
        lb.wait_ready().await?;
        Ok(lb)
    }

    pub fn write_config(&self, config: &str) -> Result<()> {
        let text = config
            .replace("@PORT@", &self.port.to_string())
            .replace("@ADMIN@", &self.admin.to_string());
        std::fs::write(self.config_path(), text)?;
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for the process to exit; its status code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("not running")?;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st.code());
            }
            if Instant::now() > deadline {
                bail!("balancer did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.admin);
        let client = client();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("balancer exited with {st}:\n{}", self.log());
            }
            if let Ok((StatusCode::OK, _)) = get_with(&client, &url).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("balancer not ready:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub async fn metrics(&self) -> Result<String> {
        let (_, body) = get_with(
            &client(),
            &format!("http://127.0.0.1:{}/metrics", self.admin),
        )
        .await?;
        Ok(body)
    }

    /// Waits until `balancer_config_reloads_total{result}` reaches `at_least` (after a
    /// SIGHUP); the error carries the balancer's log.
    pub async fn reloads(&self, result: &str, at_least: f64) -> Result<()> {
        let series = format!("balancer_config_reloads_total{{result=\"{result}\"}}");
        wharf_tests::eventually(&format!("{series} >= {at_least}"), WAIT, || async {
            let m = self.metrics().await.ok()?;
            (sample(&m, &series)? >= at_least).then_some(())
        })
        .await
        .map_err(|e| e.context(self.log()))
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Runs `balancer --check` on `text` written to a file `lb.toml` (its `@ADMIN@` / `@PORT@`
/// placeholders filled with ports nobody binds: `--check` binds nothing), expects it to
/// refuse the file, and returns what it printed on stderr.
pub fn check_refuses(text: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, text.replace("@ADMIN@", "2").replace("@PORT@", "3"))?;
    let out = check(&path)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(!out.status.success(), "--check accepted the file: {err}");
    Ok(err)
}

/// `--check` refuses one route with the option lines `route_lines`: the error names
/// the route's line (5) and `key` (under `listener[0].route[0].`).
pub fn route_option_refused(route_lines: &str, key: &str) -> Result<()> {
    let err = check_refuses(&format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\n  [[listener.route]]\n  service = \"web\"\n{route_lines}\n[[service]]\nname = \"web\"\n  [[service.endpoint]]\n  addr = \"127.0.0.1:2\"\n"
    ))?;
    let key = format!("listener[0].route[0].{key}");
    anyhow::ensure!(err.contains("lb.toml:5") && err.contains(&key), "{err}");
    Ok(())
}

/// Runs `balancer --config <path> --check`.
pub fn check(path: &std::path::Path) -> std::io::Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_balancer"))
        .arg("--config")
        .arg(path)
        .arg("--check")
        .output()
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// One answer read off `r`: status line and headers (lower-case names), body skipped.
pub fn read_response(
    r: &mut std::io::BufReader<std::net::TcpStream>,
) -> Result<(u16, Vec<(String, String)>)> {
    use std::io::Read as _;
    let (status, headers) = read_head(r)?;
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((status, headers))
}

/// An answer's head read off `r`: status and headers (lower-case names).
pub fn read_head(
    r: &mut std::io::BufReader<std::net::TcpStream>,
) -> Result<(u16, Vec<(String, String)>)> {
    use std::io::BufRead as _;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line.split(' ').nth(1).unwrap_or("0").parse()?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l)?;
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok((status, headers))
}

/// Asks the balancer on `port` to upgrade `path` to the backends' `echo` protocol (their
/// `/upgrade`), then sends `payload` through the tunnel: the 101's head and what came
/// back (as many bytes as were sent). Blocking.
pub fn upgrade_echo(port: u16, path: &str, payload: &[u8]) -> Result<(String, Vec<u8>)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(WAIT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b)?;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)?;
    Ok((head, back))
}

/// A `GET path` with `Connection: close` sent to the listener on `port` after a PROXY v1
/// header announcing `client` (`ip:port`), as a front balancer would: everything the
/// balancer answered before closing.
pub async fn get_via_proxy_header(port: u16, client: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut s = tokio::net::TcpStream::connect(dst).await?;
    let mut out = balancer::proxy_protocol::encode_v1(client.parse()?, dst);
    out.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    s.write_all(&out).await?;
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .context("no answer in time")??;
    Ok(String::from_utf8_lossy(&back).into_owned())
}

/// An HTTP/2 client with prior knowledge (h2c), for the balancer's h2c listeners.
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn get_with(client: &HttpClient, url: &str) -> Result<(StatusCode, String)> {
    let resp = tokio::time::timeout(WAIT, client.get(url.parse()?))
        .await
        .context("request timed out")??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Every sample line of a Prometheus text exposition parses as `name{labels} number`.
pub fn check_prometheus_text(text: &str) -> Result<usize> {
    let mut samples = 0;
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("no value")?;
        value
            .parse::<f64>()
            .with_context(|| format!("bad value in {line:?}"))?;
        let name = series.split('{').next().unwrap_or("");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            bail!("bad metric name in {line:?}");
        }
        if series.contains('{') && !series.ends_with('}') {
            bail!("bad labels in {line:?}");
        }
        samples += 1;
    }
    Ok(samples)
}

/// Value of one sample, found by its full series text (`name{a="b"}`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}
