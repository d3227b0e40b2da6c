//! `healthcheck --status` (the real binary) over a real etcd in which an in-process checker
//! marked one instance passing and one critical: one aligned row per instance with its
//! verdict and output, and the live checker.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use catalog::HealthStatus;
use common::*;
use wharf_tests::EtcdServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_every_instance_and_the_live_checkers() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let up = Backend::start(200).await?;
    let down = Backend::start(503).await?;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/healthz", "interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1}),
    )
    .await?;
    put_instance(&store, "web", "n1-up-80", up.port()).await?;
    put_instance(&store, "web", "n1-down-80", down.port()).await?;
    let checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(5))).await?;
    wait_mark(&store, "web", "n1-up-80", "up passing", |h| {
        h.status == HealthStatus::Passing
    })
    .await?;
    wait_mark(&store, "web", "n1-down-80", "down critical", |h| {
        h.status == HealthStatus::Critical
    })
    .await?;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_healthcheck"))
        .args(["--etcd", &etcd.endpoint(), "--status"])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}: {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines[0].starts_with("SERVICE  INSTANCE "), "{text}");
    // Aligned: every row's HEALTH column starts where the header's does.
    let col = lines[0].find("HEALTH").unwrap_or(0);
    let row = |id: &str| lines.iter().find(|l| l.contains(id)).copied().unwrap_or("");
    ensure!(row("n1-up-80")[col..].starts_with("passing"), "{text}");
    ensure!(row("n1-down-80")[col..].starts_with("critical"), "{text}");
    ensure!(row("n1-down-80").contains("503"), "output shown: {text}");
    ensure!(
        text.contains("2 instance(s): 1 passing, 1 critical, 0 pending"),
        "{text}"
    );
    ensure!(text.contains("live checkers (1): hc-1"), "{text}");
    checker.stop().await;
    Ok(())
}
