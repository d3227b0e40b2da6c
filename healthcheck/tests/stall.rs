//! A starved checker must not blame healthy backends: the real `healthcheck` binary is
//! stopped (SIGSTOP) again and again, each time for longer than `fall × interval`, while
//! every mark written to etcd is recorded. No healthy instance may ever be marked critical,
//! and a backend that really fails afterwards must still be caught.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use catalog::{Diff, Health, HealthStatus, Key, Keyspace, Value, WatchConfig, Watcher};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wharf_tests::{EtcdServer, eventually, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_healthcheck");

/// The checker process; resumed, killed and reaped when dropped, even if the test fails.
struct Proc(Child);

impl Proc {
    fn signal(&self, signal: Signal) -> Result<()> {
        Ok(kill(Pid::from_raw(self.0.id() as i32), signal)?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_checker_marks_no_healthy_instance_critical() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let interval = Duration::from_millis(200);
    let fall = 2;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/", "interval": "200ms", "timeout": "150ms", "rise": 1, "fall": fall}),
    )
    .await?;
    let mut backends = BTreeMap::new();
    for i in 0..4 {
        let b = Backend::start(200).await?;
        let id = format!("n1-web-{i}-80");
        put_instance(&store, "web", &id, b.port()).await?;
        backends.insert(id, b);
    }
    let failing = "n1-web-3-80";

    // Every mark written during the whole run, in order.
    let marks: Arc<Mutex<Vec<(String, Health)>>> = Arc::default();
    let ks = Keyspace::default();
    let mut watcher = Watcher::spawn(
        store.clone(),
        ks.clone(),
        WatchConfig::new(vec![ks.services()]),
    );
    let recorder = tokio::spawn({
        let marks = marks.clone();
        async move {
            while let Some(update) = watcher.next().await {
                for diff in update.diffs {
                    if let Diff::Put(e) = diff
                        && let (Key::Health(_, id), Value::Health(h)) = (e.key, e.value)
                    {
                        marks.lock().unwrap().push((id.to_string(), h));
                    }
                }
            }
        }
    });

    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let log = tempfile::NamedTempFile::new()?;
    let checker = Proc(
        Command::new(BIN)
            .args(["--etcd", &etcd.endpoint(), "--id", "hc-stall", "--admin"])
            .arg(admin.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .spawn()
            .context("starting healthcheck")?,
    );
    for id in backends.keys() {
        wait_mark(&store, "web", id, "passing mark", |h| {
            h.status == HealthStatus::Passing
        })
        .await?;
    }

    // Starve the checker: stopped 600 ms (> fall × interval = 400 ms), then it runs for a
    // moment, again and again. Answers are held while it is stopped, as when the stop lands
    // between its connect and its request (what a starved checker at thousands of probes a
    // second hits all the time): every probe times out by the checker's clock, during a
    // stall. Counted, two such timeouts in a row would mark an instance critical.
    let stops = 6;
    for b in backends.values() {
        b.hold(true);
    }
    for _ in 0..stops {
        checker.signal(Signal::SIGSTOP)?;
        tokio::time::sleep(interval * fall * 3 / 2).await;
        checker.signal(Signal::SIGCONT)?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for b in backends.values() {
        b.hold(false);
    }

    let metrics = eventually("stalls seen and timeouts discarded", WAIT, || async {
        let m = scrape(admin).await.ok()?;
        let stalls = sample(&m, "healthcheck_stalls_total")?;
        let discarded = sample(&m, "healthcheck_probes_discarded_total")?;
        (stalls >= stops as f64 && discarded >= backends.len() as f64).then_some(m)
    })
    .await?;
    ensure!(
        sample(&metrics, "healthcheck_event_loop_lag_seconds_count").unwrap_or(0.0) > 0.0,
        "loop lag not exported"
    );
    // Every healthy backend answers the checker again once it runs normally.
    for (id, b) in &backends {
        let since = catalog::model::now_millis();
        eventually("a probe answered after the stalls", WAIT, || async {
            b.probes_of(id)
                .iter()
                .any(|s| s.at_ms > since && s.status == 200)
                .then_some(())
        })
        .await?;
    }

    // A backend that really fails (its answers now take longer than the timeout) is still
    // marked critical: timeouts of a checker that is not starved count.
    let failing_from = catalog::model::now_millis();
    backends[failing].set_delay(Duration::from_secs(1));
    wait_mark(
        &store,
        "web",
        failing,
        "the failing backend marked critical",
        |h| h.status == HealthStatus::Critical,
    )
    .await?;
    recorder.abort();

    let marks = marks.lock().unwrap().clone();
    let criticals: Vec<&(String, Health)> = marks
        .iter()
        .filter(|(_, h)| h.status == HealthStatus::Critical)
        .collect();
    ensure!(
        criticals.iter().all(|(id, h)| id == failing
            && h.since >= failing_from
            && h.output.contains("timed out")),
        "a healthy instance was marked critical: {criticals:?}"
    );
    for id in backends.keys().filter(|id| *id != failing) {
        let (h, _) = health(&store, "web", id).await.context("mark gone")?;
        ensure!(h.status == HealthStatus::Passing, "{id}: {h:?}");
    }
    let text = std::fs::read_to_string(log.path())?;
    ensure!(
        text.contains("the checker was starved"),
        "no stall warning logged:\n{text}"
    );
    drop(checker);
    Ok(())
}
