//! Observability across parts: the real balancer, healthcheck and registrar agent over a
//! real etcd, their `/metrics` checked by `promtool check metrics`, scraped by a real
//! Prometheus configured from `grafana/prometheus.yml`, and every metric the Grafana
//! dashboard (`grafana/wharf.json`) uses found in their output — with every dashboard
//! expression accepted by that Prometheus.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wharf_tests::{EtcdServer, eventually, free_port, workspace_bin};

const WAIT: Duration = Duration::from_secs(60);

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

fn run(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One GET on a fresh connection: (status, body).
async fn get(addr: &str, path_and_query: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `promtool check metrics` on one exposition: no problems reported.
fn promtool_check(name: &str, text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus) not installed")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics on {name}'s /metrics: {}\n{report}",
        out.status
    );
    Ok(())
}

/// Metric families (`# TYPE name kind`) in an exposition.
fn families(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// Every wharf metric name (balancer_*, healthcheck_*, registrar_*) in a PromQL expression.
fn wharf_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts_word = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if starts_word && b[i].is_ascii_lowercase() {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            let word = &expr[i..j];
            // A label name inside {…} or by (…) never starts with a part's prefix.
            if ["balancer_", "healthcheck_", "registrar_"]
                .iter()
                .any(|p| word.starts_with(p))
            {
                out.push(word.to_owned());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

async fn prom_query(prom: &str, q: &str) -> Result<Value> {
    let (status, body) = get(prom, &format!("/api/v1/query?query={}", url_encode(q))).await?;
    let v: Value = serde_json::from_str(&body).with_context(|| format!("{status}: {body}"))?;
    ensure!(v["status"] == "success", "query {q}: {status} {body}");
    Ok(v["data"]["result"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_part_and_the_dashboard_uses_real_metrics() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::Builder::new().prefix("wharf-prom-").tempdir()?;
    let be = backend().await?;
    let (lb_admin, hc_admin, reg_admin) = (
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
    );
    let lb_addr = format!("127.0.0.1:{}", free_port()?);

    // registrar agent (no containers needed: an external process is registered).
    let registrar = workspace_bin("registrar")?;
    let state = dir.path().join("registrar-state");
    let state_s = state.to_str().context("utf-8")?;
    let _agent = spawn(
        &registrar,
        &[
            "agent",
            "--etcd",
            &endpoint,
            "--node",
            "n1",
            "--state-dir",
            state_s,
            "--admin",
            &reg_admin,
            "--lease-ttl",
            "5s",
        ],
        &dir.path().join("registrar.log"),
    )?;
    eventually("agent socket", WAIT, || async {
        state.join("agent.sock").exists().then_some(())
    })
    .await?;
    run(
        &registrar,
        &[
            "register",
            "--state-dir",
            state_s,
            "--service",
            "web",
            "--addr",
            &be.to_string(),
        ],
    )?;
    run(
        &registrar,
        &[
            "service",
            "set",
            "web",
            "--etcd",
            &endpoint,
            "--check-path",
            "/healthz",
            "--interval",
            "1s",
        ],
    )?;
    let _checker = spawn(
        &workspace_bin("healthcheck")?,
        &[
            "--etcd",
            &endpoint,
            "--id",
            "prom",
            "--admin",
            &hc_admin,
            "--lease-ttl",
            "5s",
        ],
        &dir.path().join("healthcheck.log"),
    )?;
    let lb_toml = dir.path().join("lb.toml");
    std::fs::write(
        &lb_toml,
        format!(
            "[admin]\nbind = \"{lb_admin}\"\n[discovery.etcd]\nendpoints = [\"{endpoint}\"]\n\
             [[listener]]\nname = \"web\"\nbind = \"{lb_addr}\"\n\
             [[listener.route]]\nservice = \"web\"\n"
        ),
    )?;
    let _balancer = spawn(
        &workspace_bin("balancer")?,
        &["--config", lb_toml.to_str().context("utf-8")?],
        &dir.path().join("balancer.log"),
    )?;

    // The registered process becomes passing and routable; some traffic through it.
    let lb = lb_addr.clone();
    eventually("web routable through the balancer", WAIT, || async {
        matches!(get(&lb, "/").await, Ok((200, _))).then_some(())
    })
    .await?;
    // Routable may mean panic mode (its only instance pending): wait for the real verdict.
    let hc = hc_admin.clone();
    eventually("the checker marked web passing", WAIT, || async {
        let (_, text) = get(&hc, "/metrics").await.ok()?;
        text.contains(r#"healthcheck_transitions_total{service="web",to="passing"} 1"#)
            .then_some(())
    })
    .await?;
    for _ in 0..20 {
        let (status, _) = get(&lb_addr, "/").await?;
        ensure!(status == 200);
    }

    // promtool on every part's /metrics.
    let mut all = BTreeSet::new();
    for (name, addr) in [
        ("balancer", &lb_admin),
        ("healthcheck", &hc_admin),
        ("registrar", &reg_admin),
    ] {
        let (status, text) = get(addr, "/metrics").await?;
        ensure!(status == 200, "{name} /metrics: {status}");
        promtool_check(name, &text)?;
        let f = families(&text);
        ensure!(
            f.iter().any(|(n, _)| n.starts_with(name)),
            "{name} exposes no {name}_* family:\n{text}"
        );
        all.extend(f);
    }

    // A real Prometheus with the example config, targets moved to this test's ports.
    let example = std::fs::read_to_string(repo_root().join("grafana/prometheus.yml"))?;
    let config = example
        .replace("15s", "1s")
        .replace("127.0.0.1:9100", &lb_admin)
        .replace("127.0.0.1:9101", &hc_admin)
        .replace("127.0.0.1:9103", &reg_admin);
    let prom_yml = dir.path().join("prometheus.yml");
    std::fs::write(&prom_yml, &config)?;
    run(
        Path::new("promtool"),
        &["check", "config", prom_yml.to_str().context("utf-8")?],
    )?;
    let prom = format!("127.0.0.1:{}", free_port()?);
    let _prometheus = spawn(
        Path::new("prometheus"),
        &[
            &format!("--config.file={}", prom_yml.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            &format!("--web.listen-address={prom}"),
        ],
        &dir.path().join("prometheus.log"),
    )
    .or_else(|_| bail!("prometheus (Debian package prometheus) not installed"))?;
    let p = prom.clone();
    eventually("all three wharf jobs up in Prometheus", WAIT, || async {
        let r = prom_query(&p, r#"up{job=~"wharf-.*"} == 1"#).await.ok()?;
        (r.as_array()?.len() == 3).then_some(())
    })
    .await
    .with_context(|| {
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    })?;
    for (q, what) in [
        (
            r#"balancer_requests_total{job="wharf-balancer",service="web",code="2xx"} > 0"#,
            "balancer answers",
        ),
        (
            r#"healthcheck_probes_total{job="wharf-healthcheck",service="web",result="pass"} > 0"#,
            "passing probes",
        ),
        (
            r#"registrar_registrations_total{job="wharf-registrar"} > 0"#,
            "registrations",
        ),
        (
            r#"balancer_backend_up{service="web"} == 1"#,
            "routable instance",
        ),
    ] {
        let p = prom.clone();
        eventually(what, WAIT, || async {
            let r = prom_query(&p, q).await.ok()?;
            (!r.as_array()?.is_empty()).then_some(())
        })
        .await?;
    }

    // The dashboard: every wharf metric it names exists, and every expression is valid
    // PromQL for this Prometheus.
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("grafana/wharf.json"),
    )?)?;
    let mut es = Vec::new();
    exprs(&dash, &mut es);
    ensure!(es.len() >= 20, "dashboard has {} expressions", es.len());
    let mut used = BTreeSet::new();
    for e in &es {
        used.extend(wharf_names(e));
        let q = e
            .replace("$__rate_interval", "1m")
            .replace("$service", ".*");
        prom_query(&prom, &q)
            .await
            .with_context(|| format!("dashboard expression rejected: {e}"))?;
    }
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| all.contains(&(b.to_string(), "histogram".to_owned())));
            let n = base.unwrap_or(name);
            !all.iter().any(|(f, _)| f == n)
        })
        .collect();
    ensure!(
        missing.is_empty(),
        "dashboard uses metrics no part exposes: {missing:?}\nexposed: {all:?}"
    );
    // And the dashboard covers each part.
    for part in ["balancer_", "healthcheck_", "registrar_"] {
        ensure!(used.iter().any(|n| n.starts_with(part)), "no {part}* panel");
    }
    eprintln!(
        "{} dashboard expressions, {} wharf metrics, all exposed and valid",
        es.len(),
        used.len()
    );
    Ok(())
}
