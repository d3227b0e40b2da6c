//! End to end: the real `render` binary drives a real HAProxy (master-worker mode, reloaded
//! through its master CLI socket by `render haproxy-reload`, the master passing its listening
//! sockets to the new worker) on loopback, while the test sends requests without pause. Traffic follows registrations in
//! etcd and not one request fails while backends are added and removed.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wharf_tests::EtcdServer;

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/templates");

/// A real HAProxy master process; SIGTERM (the master stops its workers), then SIGKILL, when
/// dropped.
struct Haproxy {
    child: Option<Child>,
}

impl Haproxy {
    fn start(
        config: &std::path::Path,
        pidfile: &std::path::Path,
        master_socket: &std::path::Path,
        log: &std::path::Path,
    ) -> Result<Self> {
        let child = Command::new("haproxy")
            .arg("-W")
            .arg("-db")
            .arg("-f")
            .arg(config)
            .arg("-p")
            .arg(pidfile)
            .arg("-S")
            .arg(master_socket)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?)
            .spawn()
            .context("starting haproxy")?;
        Ok(Self { child: Some(child) })
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP backend answering its name; stops when the returned handle is aborted or the
/// runtime ends.
async fn backend(name: &'static str) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((port, task))
}

#[test]
fn haproxy_reload_without_a_master_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_render"))
        .args(["haproxy-reload", "--timeout", "1s", "--master-socket"])
        .arg(dir.path().join("none.sock"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure(!out.status.success() && err.contains("none.sock"), || {
        err.to_string()
    })
}

#[derive(Default)]
struct Load {
    ok: BTreeMap<String, u64>,
    /// Backend names of the latest answers, newest last.
    recent: Vec<String>,
    failures: Vec<String>,
    /// Keep-alive races retried once (HAProxy < 2.7 closes idle connections on reload).
    retries: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_drives_haproxy_and_no_request_fails_on_backend_changes() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(etcd.store().await?);
    cat.checker("c1").await?;
    let (port_a, _a) = backend("A").await?;
    let (port_b, _b) = backend("B").await?;
    cat.up("web", "a", "v1", port_a).await?;

    let setup = Setup::new(&etcd.endpoint(), &format!("template_dir = \"{SHIPPED}\""))?;
    let run = setup.path("run");
    std::fs::create_dir_all(&run)?;
    let pidfile = run.join("haproxy.pid");
    let master_socket = run.join("master.sock");
    let front = wharf_tests::free_port()?;
    setup.resource(
        "haproxy",
        &format!(
            "[template]\nsrc = \"haproxy.cfg.tera\"\ndest = \"{dest}\"\nservices = [\"web\"]\n\
             check_cmd = \"haproxy -c -q -f {{{{src}}}}\"\n\
             reload_cmd = \"[ ! -S {sock} ] || {render} haproxy-reload --master-socket {sock}\"\n\
             command_timeout = \"10s\"\n\
             [template.vars]\nbind = \"127.0.0.1:{front}\"\nstats_socket = \"{run}/admin.sock\"\n\
             default_service = \"web\"\n",
            dest = setup.out("haproxy.cfg").display(),
            sock = master_socket.display(),
            render = env!("CARGO_BIN_EXE_render"),
            run = run.display(),
        ),
    )?;
    let render = setup.spawn()?;
    until("first haproxy.cfg", || {
        setup
            .read_out("haproxy.cfg")
            .filter(|s| s.contains(&format!("server a 127.0.0.1:{port_a}")))
    })
    .await?;
    let mut haproxy = Haproxy::start(
        &setup.out("haproxy.cfg"),
        &pidfile,
        &master_socket,
        &run.join("haproxy.log"),
    )?;
    let master = until("haproxy pid file", || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    })
    .await?;

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("http://127.0.0.1:{front}/").parse()?;
    // One GET; `close` asks for a fresh connection per request. An error says whether it is
    // the keep-alive race (the server closed an idle connection as the request went out, no
    // response byte sent), which RFC 9112 §9.3.1 lets a client retry for idempotent requests.
    let get = {
        let client = client.clone();
        let url = url.clone();
        move |close: bool| {
            let client = client.clone();
            let mut req = hyper::Request::get(url.clone()).header("host", "web");
            if close {
                req = req.header("connection", "close");
            }
            let req = req.body(Empty::<Bytes>::new());
            async move {
                let resp = match client
                    .request(req.map_err(|e| (e.to_string(), false))?)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let race = std::error::Error::source(&e)
                            .and_then(|s| s.downcast_ref::<hyper::Error>())
                            .is_some_and(|h| h.is_incomplete_message());
                        return Err((format!("{e:#}"), race));
                    }
                };
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| (e.to_string(), false))?
                    .to_bytes();
                if status != 200 {
                    return Err((format!("status {status}: {body:?}"), false));
                }
                Ok::<_, (String, bool)>(String::from_utf8_lossy(&body).into_owned())
            }
        }
    };
    wharf_tests::eventually("haproxy serving A", WAIT, || {
        let get = get.clone();
        async move { get(false).await.ok().filter(|b| b == "A") }
    })
    .await?;

    // Continuous load: two clients, each sending the next request as soon as the last ends.
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    // Client 0 keeps connections alive (retrying only the keep-alive race, like browsers do);
    // client 1 opens a connection per request and never retries.
    for close in [false, true] {
        let (get, load, stop) = (get.clone(), load.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut r = get(close).await;
                if let Err((_, true)) = &r {
                    load.lock().unwrap().retries += 1;
                    r = get(close).await;
                }
                let mut l = load.lock().unwrap();
                match r {
                    Ok(name) => {
                        *l.ok.entry(name.clone()).or_default() += 1;
                        l.recent.push(name);
                        if l.recent.len() > 100 {
                            l.recent.remove(0);
                        }
                    }
                    Err((e, _)) => l.failures.push(format!("{e} (fresh connection: {close})")),
                }
            }
        }));
    }
    let recent = |load: &Arc<Mutex<Load>>| load.lock().unwrap().recent.clone();

    // Add B: traffic reaches it.
    cat.up("web", "b", "v1", port_b).await?;
    let dump = |e: anyhow::Error| {
        e.context(format!(
            "render log:\n{}\nhaproxy log:\n{}",
            render.log(),
            std::fs::read_to_string(run.join("haproxy.err")).unwrap_or_default()
        ))
    };
    wharf_tests::eventually("traffic reaches B", WAIT, || {
        let r = recent(&load);
        async move { r.iter().any(|n| n == "B").then_some(()) }
    })
    .await
    .map_err(dump)?;
    // Remove A: traffic leaves it entirely.
    cat.remove("web", "a").await?;
    wharf_tests::eventually("traffic only on B", WAIT, || {
        let r = recent(&load);
        async move { (r.len() == 100 && r.iter().all(|n| n == "B")).then_some(()) }
    })
    .await?;
    // And back: A again, B drained by health.
    cat.up("web", "a", "v1", port_a).await?;
    cat.health("web", "b", "critical").await?;
    wharf_tests::eventually("traffic only on A", WAIT, || {
        let r = recent(&load);
        async move { (r.len() == 100 && r.iter().all(|n| n == "A")).then_some(()) }
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }

    let (ok, failures, retries) = {
        let l = load.lock().unwrap();
        (l.ok.clone(), l.failures.clone(), l.retries)
    };
    let total: u64 = ok.values().sum();
    ensure(failures.is_empty(), || {
        format!(
            "{} of {} requests failed: {:?}",
            failures.len(),
            total + failures.len() as u64,
            &failures[..failures.len().min(5)]
        )
    })?;
    ensure(total >= 300, || format!("only {total} requests"))?;
    ensure(
        ok.get("A").is_some_and(|n| *n > 0) && ok.get("B").is_some_and(|n| *n > 0),
        || format!("{ok:?}"),
    )?;
    // Reloaded in place (same master), once per change.
    ensure(haproxy.alive(), || "haproxy master exited".into())?;
    ensure(
        std::fs::read_to_string(&pidfile)?.trim() == master.to_string(),
        || "haproxy master changed".into(),
    )?;
    let reloads = render
        .metric("wharf_render_reloads_total{resource=\"haproxy\"}")
        .await?;
    ensure(reloads >= 3.0, || format!("{reloads} reloads"))?;
    eprintln!(
        "requests: {:?}, keep-alive races retried: {}, reloads: {reloads}",
        ok, retries
    );
    Ok(())
}
