//! Several `healthcheck` binaries sharing one catalog: rendezvous sharding, crash takeover
//! within the lease TTL, and a clean hand-over on SIGTERM. Also `--check`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use catalog::model::now_millis;
use catalog::{CheckerId, EtcdStore, HealthStatus};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wharf_tests::{EtcdServer, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_healthcheck");
const TTL: Duration = Duration::from_secs(2);
const INSTANCES: usize = 30;

/// A `healthcheck` process, killed and reaped when dropped.
struct Proc {
    id: String,
    child: Option<Child>,
}

impl Proc {
    fn start(endpoint: &str, id: &str) -> Result<Self> {
        let child = Command::new(BIN)
            .args([
                "--etcd",
                endpoint,
                "--id",
                id,
                "--admin",
                "127.0.0.1:0",
                "--lease-ttl",
            ])
            .arg(format!("{}s", TTL.as_secs()))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting healthcheck")?;
        Ok(Self {
            id: id.to_owned(),
            child: Some(child),
        })
    }

    fn signal(&mut self, signal: Signal) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        kill(Pid::from_raw(child.id() as i32), signal)?;
        Ok(child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ids() -> Vec<String> {
    (0..INSTANCES).map(|i| format!("n1-web-{i}-80")).collect()
}

fn owner(id: &str, live: &[&str]) -> String {
    let live: Vec<CheckerId> = live.iter().map(|c| c.parse().unwrap()).collect();
    healthcheck::shard::owner(&format!("web/{id}"), &live)
        .unwrap()
        .to_string()
}

/// Waits until every instance is passing with the mark written by its rendezvous owner.
async fn converged(store: &EtcdStore, live: &[&str]) -> Result<()> {
    eventually("every mark written by its owner", WAIT, || async {
        for id in ids() {
            let (h, _) = health(store, "web", &id).await?;
            if h.status != HealthStatus::Passing || h.checker.as_str() != owner(&id, live) {
                return None;
            }
        }
        Some(())
    })
    .await
}

/// Which checkers probed each instance after `since_ms`.
fn probers(backend: &Backend, since_ms: u64) -> BTreeMap<String, BTreeSet<String>> {
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in backend.log().into_iter().filter(|s| s.at_ms > since_ms) {
        map.entry(s.instance).or_default().insert(s.checker);
    }
    map
}

async fn setup() -> Result<(EtcdServer, EtcdStore, Backend)> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/healthz", "interval": "150ms", "rise": 1, "fall": 2}),
    )
    .await?;
    for id in ids() {
        put_instance(&store, "web", &id, backend.port()).await?;
    }
    Ok((etcd, store, backend))
}

/// Waits until each instance was probed at least `n` times after `since_ms`.
async fn probed_after(backend: &Backend, since_ms: u64, n: usize) -> Result<()> {
    eventually("every instance probed again", WAIT, || async {
        let log = backend.log();
        ids()
            .iter()
            .all(|id| {
                log.iter()
                    .filter(|s| &s.instance == id && s.at_ms > since_ms)
                    .count()
                    >= n
            })
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_checkers_share_without_overlap_and_take_over_a_crashed_one() -> Result<()> {
    let (etcd, store, backend) = setup().await?;
    let mut procs = Vec::new();
    for id in ["hc-a", "hc-b", "hc-c"] {
        procs.push(Proc::start(&etcd.endpoint(), id)?);
    }
    let all = ["hc-a", "hc-b", "hc-c"];
    converged(&store, &all).await?;

    // Steady state: each instance probed by exactly its owner, and every checker has work.
    let t0 = now_millis() + 200;
    probed_after(&backend, t0, 3).await?;
    let seen = probers(&backend, t0);
    for id in ids() {
        let by = &seen[&id];
        ensure!(
            by.len() == 1 && by.contains(&owner(&id, &all)),
            "{id} probed by {by:?}"
        );
    }
    let busy: BTreeSet<String> = seen.values().flatten().cloned().collect();
    ensure!(busy.len() == 3, "only {busy:?} did any work");

    // Crash hc-b: its instances must be probed by the others within the lease TTL.
    let victim = procs.remove(1);
    let mut victim = victim;
    let orphans: Vec<String> = ids()
        .into_iter()
        .filter(|id| owner(id, &all) == victim.id)
        .collect();
    ensure!(!orphans.is_empty(), "hc-b owned nothing");
    let killed_at = Instant::now();
    let killed_ms = now_millis();
    victim.signal(Signal::SIGKILL)?;
    eventually(
        "the crashed checker's instances probed by the others",
        WAIT,
        || async {
            let seen = probers(&backend, killed_ms);
            orphans
                .iter()
                .all(|id| {
                    seen.get(id)
                        .is_some_and(|by| by.iter().any(|c| c != "hc-b"))
                })
                .then_some(())
        },
    )
    .await?;
    let took = killed_at.elapsed();
    eprintln!("takeover of {} instances took {took:?}", orphans.len());
    // TTL, plus etcd's expiry sweep (every 500 ms), one probe interval, watch and scheduling.
    ensure!(
        took <= TTL + Duration::from_millis(1500),
        "takeover took {took:?} with a {TTL:?} lease"
    );

    let alive = ["hc-a", "hc-c"];
    converged(&store, &alive).await?;
    let t1 = now_millis() + 200;
    probed_after(&backend, t1, 3).await?;
    for (id, by) in probers(&backend, t1) {
        ensure!(
            by.len() == 1 && by.contains(&owner(&id, &alive)),
            "{id} probed by {by:?} after takeover"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_without_dropping_a_mark() -> Result<()> {
    let (etcd, store, backend) = setup().await?;
    let mut a = Proc::start(&etcd.endpoint(), "hc-a")?;
    let _b = Proc::start(&etcd.endpoint(), "hc-b")?;
    converged(&store, &["hc-a", "hc-b"]).await?;
    let status = a.signal(Signal::SIGTERM)?;
    ensure!(
        status.success(),
        "healthcheck exited with {status} on SIGTERM"
    );
    // hc-b takes over; at no point does an instance lose its passing mark.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut all_b = true;
        for id in ids() {
            let (h, _) = health(&store, "web", &id)
                .await
                .with_context(|| format!("{id} lost its mark during the hand-over"))?;
            ensure!(
                h.status == HealthStatus::Passing,
                "{id} not passing during the hand-over"
            );
            all_b &= h.checker.as_str() == "hc-b";
        }
        if all_b {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "hc-b did not take every mark over"
        );
    }
    let t = now_millis() + 200;
    probed_after(&backend, t, 2).await?;
    ensure!(
        probers(&backend, t).values().flatten().all(|c| c == "hc-b"),
        "the stopped checker still probes"
    );
    Ok(())
}

#[test]
fn check_flag_validates_the_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "id = \"hc-1\"\nlease_ttl = \"10s\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n",
    )?;
    let out = Command::new(BIN)
        .arg("--check")
        .arg("--config")
        .arg(&good)
        .output()?;
    ensure!(
        out.status.success(),
        "good config rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "id = \"hc-1\"\nlease_tll = \"10s\"\n")?;
    let out = Command::new(BIN)
        .arg("--check")
        .arg("--config")
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "bad config accepted");
    ensure!(
        err.contains("bad.toml") && err.contains("line 2") && err.contains("lease_tll"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["--check", "--id", "Not_A_Label"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("id"), "{err}");
    Ok(())
}
