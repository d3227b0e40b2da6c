//! The mark writer's guard against a real etcd: a verdict about a registration that has
//! been replaced is dropped by etcd itself, whatever the supervisor believed when it sent it.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use catalog::store::Store;
use catalog::{CheckerId, Health, HealthStatus, LeaseKeeper};
use common::*;
use healthcheck::metrics::Metrics;
use healthcheck::writer::{LeaseInfo, WriteDone, WriteKind, WriteRequest, WriteResult, Writer};
use tokio::sync::{mpsc, watch};
use wharf_tests::EtcdServer;

fn mark(observed: i64) -> WriteKind {
    WriteKind::Mark(Health {
        status: HealthStatus::Passing,
        since: 1,
        checker: CheckerId::new("hc-1").unwrap(),
        consecutive: 2,
        output: "status 200".into(),
        observed_mod_rev: observed,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_writes_drop_verdicts_about_old_registrations() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let lease = LeaseKeeper::grant(store.clone(), Duration::from_secs(5)).await?;
    let (_lease_tx, lease_rx) = watch::channel(Some(LeaseInfo {
        id: lease.id(),
        generation: 1,
    }));
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<WriteDone>();
    let writer = Writer {
        store: store.clone(),
        keyspace: ks(),
        metrics: Metrics::new(),
        concurrency: 4,
    };
    let task = tokio::spawn(writer.run(req_rx, done_tx, lease_rx));
    let item = ("web".parse()?, "n1-web-0-80".parse()?);
    let mut ticket = 0;
    let mut write = |guard: i64, kind: WriteKind| {
        ticket += 1;
        req_tx
            .send(WriteRequest {
                item: ("web".parse().unwrap(), "n1-web-0-80".parse().unwrap()),
                ticket,
                guard,
                kind,
            })
            .map_err(|_| anyhow::anyhow!("writer stopped"))
    };
    let mut answer = async || -> Result<WriteResult> {
        let d = tokio::time::timeout(WAIT, done_rx.recv())
            .await?
            .context("writer stopped")?;
        ensure!(d.item == item);
        Ok(d.result)
    };

    let old = put_instance(&store, "web", "n1-web-0-80", 8080).await?;
    store.delete(&instance_key("web", "n1-web-0-80")).await?;
    let new = put_instance(&store, "web", "n1-web-0-80", 8080).await?;

    write(old, mark(old))?;
    ensure!(
        answer().await? == WriteResult::Stale,
        "a verdict about the old registration was applied"
    );
    ensure!(
        health(&store, "web", "n1-web-0-80").await.is_none(),
        "mark written despite the guard"
    );

    write(new, mark(new))?;
    ensure!(matches!(
        answer().await?,
        WriteResult::Applied {
            lease_generation: 1
        }
    ));
    let (h, kv) = health(&store, "web", "n1-web-0-80")
        .await
        .context("no mark")?;
    ensure!(
        h.observed_mod_rev == new && kv.lease == lease.id(),
        "{h:?} {kv:?}"
    );

    // Clean-up of a vanished instance's mark (guard 0) only while the instance is absent.
    write(0, WriteKind::Unmark)?;
    ensure!(
        answer().await? == WriteResult::Stale,
        "mark of a live instance removed"
    );
    store.delete(&instance_key("web", "n1-web-0-80")).await?;
    write(0, WriteKind::Unmark)?;
    ensure!(matches!(answer().await?, WriteResult::Applied { .. }));
    ensure!(
        health(&store, "web", "n1-web-0-80").await.is_none(),
        "mark still there"
    );
    task.abort();
    Ok(())
}
