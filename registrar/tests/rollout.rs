//! `registrar rollout` end to end under load: real etcd, the real registrar agent running
//! busybox httpd containers, the real healthcheck, two real balancers, and an in-test load
//! generator at constant concurrency through both balancers for the whole run.
//!
//! The tests share a 2-core machine with everything else, so they run one at a time.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use common::ChildGuard;
use common::agent::TestAgent;
use common::busybox_rootfs;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt;
use wharf_tests::{EtcdServer, eventually, free_port, workspace_bin};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONCURRENCY: usize = 16;
const HTTPD: &str = "exec httpd -f -p $PORT -h /www";

/// A busybox image whose `/` answers `version` and whose `/cgi-bin/v` answers `version`
/// too, or a 500 on about one request in ten when `bad`.
fn image(dir: &Path, version: &str, bad: bool) -> PathBuf {
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

struct Balancer {
    addr: SocketAddr,
    metrics: String,
    _proc: ChildGuard,
}

/// Fields drop in order: clients of etcd first, the directory holding every state last.
struct Stack {
    lbs: Vec<Balancer>,
    _checker: ChildGuard,
    agent: TestAgent,
    etcd: EtcdServer,
    dir: tempfile::TempDir,
}

impl Stack {
    /// The logs of every process, for a failing assertion.
    fn logs(&self) -> String {
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
async fn stack(v1: &str) -> Result<Stack> {
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

/// Marks which phase a request belongs to: 0 = none, 1..=100 = a canary step's percent,
/// `AFTER` = the rollout command has exited.
const AFTER: u32 = 1000;

#[derive(Default)]
struct Stats {
    total: u64,
    /// (balancer, marker) → (v1 answers, v2 answers)
    by_marker: BTreeMap<(usize, u32), (u64, u64)>,
    failures: Vec<String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    marker: Arc<AtomicU32>,
    stats: Arc<Mutex<Stats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `CONCURRENCY` keep-alive clients, half on each balancer, GETting `path` back to back.
    fn start(lbs: &[SocketAddr], path: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let marker = Arc::new(AtomicU32::new(0));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let tasks = (0..CONCURRENCY)
            .map(|i| {
                let (lb, addr) = (i % lbs.len(), lbs[i % lbs.len()]);
                let (stop, marker, stats) = (stop.clone(), marker.clone(), stats.clone());
                tokio::spawn(async move { client(lb, addr, path, stop, marker, stats).await })
            })
            .collect();
        Self {
            stop,
            marker,
            stats,
            tasks,
        }
    }

    async fn finish(self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        Arc::try_unwrap(self.stats)
            .ok()
            .expect("clients are done")
            .into_inner()
            .unwrap()
    }

    fn total(&self) -> u64 {
        self.stats.lock().unwrap().total
    }
}

async fn client(
    lb: usize,
    addr: SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
    marker: Arc<AtomicU32>,
    stats: Arc<Mutex<Stats>>,
) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    let t0 = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let s = match sender.as_mut() {
            Some(s) => s,
            None => {
                let conn = match tokio::net::TcpStream::connect(addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        stats
                            .lock()
                            .unwrap()
                            .failures
                            .push(format!("[lb{lb}] connect: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                match hyper::client::conn::http1::handshake(TokioIo::new(conn)).await {
                    Ok((s, c)) => {
                        tokio::spawn(c);
                        sender.insert(s)
                    }
                    Err(e) => {
                        stats
                            .lock()
                            .unwrap()
                            .failures
                            .push(format!("[lb{lb}] handshake: {e}"));
                        continue;
                    }
                }
            }
        };
        if s.ready().await.is_err() {
            // The balancer closed an idle keep-alive connection: not a failed request.
            sender = None;
            continue;
        }
        let before = marker.load(Ordering::SeqCst);
        let req = http::Request::get(path)
            .header("host", "web")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let result = match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(b) => Ok((
                        status,
                        String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                    )),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
            Err(e) => Err(format!("request: {e}")),
        };
        let after = marker.load(Ordering::SeqCst);
        let at = format!("[lb{lb} marker {before}->{after} at {:?}]", t0.elapsed());
        let mut st = stats.lock().unwrap();
        st.total += 1;
        match result {
            Ok((200, body)) if body == "v1" || body == "v2" => {
                if before == after {
                    let e = st.by_marker.entry((lb, after)).or_default();
                    if body == "v1" {
                        e.0 += 1;
                    } else {
                        e.1 += 1;
                    }
                }
            }
            Ok((status, body)) => st.failures.push(format!("{at} {status} {body:?}")),
            Err(e) => {
                st.failures.push(format!("{at} {e}"));
                sender = None;
            }
        }
    }
}

/// Runs `registrar rollout` with `--json`, moving the load's marker at each step event.
async fn rollout(
    s: &Stack,
    args: &[&str],
    marker: &AtomicU32,
) -> Result<(i32, Vec<serde_json::Value>)> {
    rollout_until(s, args, marker, None).await
}

/// Like `rollout`, but SIGKILLs the command at the first event named `kill_at` (exit -1).
async fn rollout_until(
    s: &Stack,
    args: &[&str],
    marker: &AtomicU32,
    kill_at: Option<&str>,
) -> Result<(i32, Vec<serde_json::Value>)> {
    let mut child = tokio::process::Command::new(common::BIN)
        .arg("rollout")
        .args(args)
        .arg("--json")
        .env("WHARF_STATE_DIR", &s.agent.state)
        .env("WHARF_ETCD", &s.agent.endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut events = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(180), lines.next_line())
        .await
        .context("rollout made no progress for 3 minutes")??
    {
        eprintln!("rollout: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        match v["event"].as_str() {
            Some("step") => {
                marker.store(v["percent"].as_u64().unwrap_or(0) as u32, Ordering::SeqCst)
            }
            Some("window") | Some("rollback") | Some("draining") => {
                marker.store(0, Ordering::SeqCst)
            }
            _ => {}
        }
        let kill = kill_at.is_some() && v["event"].as_str() == kill_at;
        events.push(v);
        if kill {
            child.kill().await?;
            return Ok((-1, events));
        }
    }
    let code = child.wait().await?.code().unwrap_or(-1);
    marker.store(AFTER, Ordering::SeqCst);
    Ok((code, events))
}

fn containers(s: &Stack) -> Vec<serde_json::Value> {
    serde_json::from_str(&s.agent.cli_ok(&["ps", "--json"])).unwrap()
}

async fn split(s: &Stack) -> serde_json::Value {
    let store = s.etcd.store().await.unwrap();
    let key = catalog::Keyspace::default().config(&"web".parse().unwrap());
    let kv = catalog::Store::get(&store, &key).await.unwrap().unwrap();
    let c: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    c.get("split").cloned().unwrap_or(serde_json::json!({}))
}

/// Keeps the load on after the rollout until at least `n` requests were sent in all.
async fn keep_loading(load: &Load, n: u64) -> Result<()> {
    eventually("enough requests", Duration::from_secs(120), || async move {
        (load.total() >= n).then_some(())
    })
    .await
}

fn assert_clean(s: &Stack, stats: &Stats) {
    assert!(
        stats.failures.is_empty(),
        "{} of {} requests failed, first ones: {:?}\n{}",
        stats.failures.len(),
        stats.total,
        &stats.failures[..stats.failures.len().min(10)],
        s.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replacement_under_load_fails_no_request() -> Result<()> {
    let _one = SERIAL.lock().await;
    let s = stack("v1").await?;
    let v2 = image(&s.dir.path().join("v2"), "v2", false);
    let lbs: Vec<SocketAddr> = s.lbs.iter().map(|b| b.addr).collect();
    let load = Load::start(&lbs, "/");
    keep_loading(&load, 500).await?;
    let metrics: Vec<String> = s
        .lbs
        .iter()
        .flat_map(|b| ["--metrics".to_string(), b.metrics.clone()])
        .collect();
    let mut args = vec![
        "web",
        "--image",
        v2.to_str().unwrap(),
        "--version",
        "v2",
        "--step-wait",
        "1s",
        // p99 of a replica that just started, on a 2-core machine shared with the load
        // generator, easily differs by 1.5× from the old ones'; the gate itself is
        // unit-tested (rollout::gate), this test is about not failing requests.
        "--max-p99-ratio",
        "3",
    ];
    args.extend(metrics.iter().map(String::as_str));
    let (code, events) = rollout(&s, &args, &load.marker).await?;
    assert_eq!(code, 0, "rollout failed: {events:?}");
    // One surge replica at a time: start, ready, then one old replica drained.
    let order: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event"].as_str())
        .filter(|e| ["started", "draining"].contains(e))
        .collect();
    assert_eq!(order, ["started", "draining"].repeat(4), "{events:?}");
    keep_loading(&load, load.total() + 2000).await?;
    keep_loading(&load, 20_000).await?;
    let stats = load.finish().await;
    assert_clean(&s, &stats);
    assert!(stats.total >= 20_000, "only {} requests", stats.total);
    let after: (u64, u64) = (0..2)
        .map(|lb| {
            stats
                .by_marker
                .get(&(lb, AFTER))
                .copied()
                .unwrap_or_default()
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(after.0, 0, "v1 answered after the rollout");
    assert!(after.1 >= 2000, "{after:?}");
    // Old replicas drained and removed, 4 new ones serving, split cleared.
    let ps = containers(&s);
    let versions: Vec<(&str, &str)> = ps
        .iter()
        .map(|c| (c["version"].as_str().unwrap(), c["state"].as_str().unwrap()))
        .collect();
    assert_eq!(versions, vec![("v2", "serving"); 4], "{ps:?}");
    assert_eq!(split(&s).await, serde_json::json!({}));
    assert!(s.agent.log_text().contains("draining"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_steps_follow_the_split_on_both_balancers_and_fail_no_request() -> Result<()> {
    let _one = SERIAL.lock().await;
    let s = stack("v1").await?;
    let v2 = image(&s.dir.path().join("v2"), "v2", false);
    let lbs: Vec<SocketAddr> = s.lbs.iter().map(|b| b.addr).collect();
    let load = Load::start(&lbs, "/");
    keep_loading(&load, 500).await?;
    let metrics: Vec<String> = s
        .lbs
        .iter()
        .flat_map(|b| ["--metrics".to_string(), b.metrics.clone()])
        .collect();
    let mut args = vec![
        "web",
        "--image",
        v2.to_str().unwrap(),
        "--version",
        "v2",
        "--steps",
        "10,50,100",
        "--step-wait",
        "4s",
        "--max-surge",
        "2",
        "--max-p99-ratio",
        "5",
    ];
    args.extend(metrics.iter().map(String::as_str));
    let (code, events) = rollout(&s, &args, &load.marker).await?;
    assert_eq!(code, 0, "rollout failed: {events:?}");
    keep_loading(&load, load.total() + 2000).await?;
    keep_loading(&load, 20_000).await?;
    let stats = load.finish().await;
    assert_clean(&s, &stats);
    assert!(stats.total >= 20_000, "only {} requests", stats.total);
    // Each balancer follows each step within ±3 %.
    for lb in 0..2 {
        for pct in [10u32, 50, 100] {
            let (a, b) = stats.by_marker.get(&(lb, pct)).copied().unwrap_or_default();
            assert!(
                a + b >= 300,
                "balancer {lb} step {pct}: only {} answers",
                a + b
            );
            let share = b as f64 * 100.0 / (a + b) as f64;
            assert!(
                (share - pct as f64).abs() <= 3.0,
                "balancer {lb} step {pct} %: v2 answered {share:.1} % ({a} v1, {b} v2)"
            );
        }
        let (a, b) = stats
            .by_marker
            .get(&(lb, AFTER))
            .copied()
            .unwrap_or_default();
        assert_eq!(a, 0, "balancer {lb}: v1 answered after the rollout");
        assert!(b > 0);
    }
    let ps = containers(&s);
    assert!(ps.iter().all(|c| c["version"] == "v2"), "{ps:?}");
    assert_eq!(ps.len(), 4);
    assert_eq!(split(&s).await, serde_json::json!({}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_is_rolled_back_at_the_first_step() -> Result<()> {
    let _one = SERIAL.lock().await;
    let s = stack("v1").await?;
    let bad = image(&s.dir.path().join("v2"), "v2", true);
    let lbs: Vec<SocketAddr> = s.lbs.iter().map(|b| b.addr).collect();
    // The CGI path: v1 always answers, the bad v2 fails one request in ten.
    let load = Load::start(&lbs, "/cgi-bin/v");
    keep_loading(&load, 200).await?;
    let metrics: Vec<String> = s
        .lbs
        .iter()
        .flat_map(|b| ["--metrics".to_string(), b.metrics.clone()])
        .collect();
    let mut args = vec![
        "web",
        "--image",
        bad.to_str().unwrap(),
        "--version",
        "v2",
        "--steps",
        "20,50,100",
        "--step-wait",
        "10s",
        "--max-surge",
        "4",
        "--max-error-rate",
        "1%",
        "--max-p99-ratio",
        "5",
    ];
    args.extend(metrics.iter().map(String::as_str));
    let (code, events) = rollout(&s, &args, &load.marker).await?;
    assert_eq!(code, 1, "a bad canary must fail the command: {events:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .filter_map(|e| e["percent"].as_u64())
        .collect();
    assert_eq!(steps, [20], "aborted at the first step");
    let rb = events
        .iter()
        .find(|e| e["event"] == "rollback")
        .context("no rollback event")?;
    assert!(
        rb["reason"].as_str().unwrap_or("").contains("error rate"),
        "{rb}"
    );
    assert!(events.iter().any(|e| e["event"] == "rolled_back"));
    // After the rollback: v1 only, v2 replicas gone, split back to what it was (none).
    keep_loading(&load, load.total() + 500).await?;
    let stats = load.finish().await;
    let (a, b) = (0..2)
        .map(|lb| {
            stats
                .by_marker
                .get(&(lb, AFTER))
                .copied()
                .unwrap_or_default()
        })
        .fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1));
    assert_eq!(b, 0, "v2 answered after the rollback");
    assert!(a >= 500);
    // The only failures are the bad canary's own 500s during its step.
    assert!(
        stats.failures.iter().all(|f| f.contains("500 \"boom\"")),
        "{:?}\n{}",
        stats.failures,
        s.logs()
    );
    let ps = containers(&s);
    assert!(
        ps.iter()
            .all(|c| c["version"] == "v1" && c["state"] == "serving"),
        "{ps:?}"
    );
    assert_eq!(ps.len(), 4);
    assert_eq!(split(&s).await, serde_json::json!({}));
    let store = s.etcd.store().await?;
    let listing =
        catalog::Store::list(&store, &["/wharf/v1/services/web/instances/".to_string()]).await?;
    assert_eq!(listing.kvs.len(), 4, "v2 registrations left behind");
    let state: serde_json::Value = serde_json::from_slice(
        &catalog::Store::get(&store, "/wharf/v1/services/web/rollout")
            .await?
            .context("no rollout state")?
            .value,
    )?;
    assert_eq!(state["phase"], "rolled_back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rollout_is_aborted_or_resumed_from_its_state_in_etcd() -> Result<()> {
    let _one = SERIAL.lock().await;
    let s = stack("v1").await?;
    let v2 = image(&s.dir.path().join("v2"), "v2", false);
    let v2 = v2.to_str().unwrap();
    let lbs: Vec<SocketAddr> = s.lbs.iter().map(|b| b.addr).collect();
    let load = Load::start(&lbs, "/");
    keep_loading(&load, 500).await?;

    // A rolling replacement killed right after its first old replica stopped.
    let (code, _) = rollout_until(
        &s,
        &["web", "--image", v2, "--version", "v2"],
        &load.marker,
        Some("stopped"),
    )
    .await?;
    assert_eq!(code, -1);
    // The state in etcd keeps anyone else off the service meanwhile.
    let o = s
        .agent
        .cli(&["rollout", "web", "--image", v2, "--version", "v3"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("in progress"));
    // --abort from "another shell": the stopped v1 replica runs again, v2 is gone.
    let (code, events) = rollout(&s, &["web", "--abort"], &load.marker).await?;
    assert_eq!(code, 0, "{events:?}");
    assert!(
        events.iter().any(
            |e| e["event"] == "restarted" && e["containers"] == serde_json::json!(["web-v1-0"])
        ),
        "{events:?}"
    );
    let ps = containers(&s);
    assert_eq!(ps.len(), 4, "{ps:?}");
    assert!(
        ps.iter()
            .all(|c| c["version"] == "v1" && c["state"] == "serving"),
        "{ps:?}"
    );

    // A canary killed during its first step; --resume redoes that step and finishes.
    let metrics: Vec<String> = s
        .lbs
        .iter()
        .flat_map(|b| ["--metrics".to_string(), b.metrics.clone()])
        .collect();
    let mut args = vec![
        "web",
        "--image",
        v2,
        "--version",
        "v2",
        "--steps",
        "50,100",
        "--step-wait",
        "2s",
        "--max-surge",
        "4",
        "--max-p99-ratio",
        "5",
    ];
    args.extend(metrics.iter().map(String::as_str));
    let (code, _) = rollout_until(&s, &args, &load.marker, Some("step")).await?;
    assert_eq!(code, -1);
    let (code, events) = rollout(&s, &["web", "--resume"], &load.marker).await?;
    assert_eq!(code, 0, "{events:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .filter_map(|e| e["percent"].as_u64())
        .collect();
    assert_eq!(steps, [50, 100]);
    let ps = containers(&s);
    assert_eq!(ps.len(), 4, "{ps:?}");
    assert!(
        ps.iter()
            .all(|c| c["version"] == "v2" && c["state"] == "serving"),
        "{ps:?}"
    );
    assert_eq!(split(&s).await, serde_json::json!({}));
    keep_loading(&load, load.total() + 500).await?;
    let stats = load.finish().await;
    assert_clean(&s, &stats);
    Ok(())
}
