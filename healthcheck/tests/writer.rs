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

/// A start-up or a fleet-wide flip queues thousands of writes: they go to etcd in batches
/// (one commit for up to `MAX_BATCH` instances), yet each keeps its own guard, so one stale
/// verdict in a batch drops only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_writes_keep_one_guard_per_instance() -> Result<()> {
    const N: usize = 250;
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let lease = LeaseKeeper::grant(store.clone(), Duration::from_secs(5)).await?;
    let (_lease_tx, lease_rx) = watch::channel(Some(LeaseInfo {
        id: lease.id(),
        generation: 1,
    }));
    let mut guards = Vec::new();
    for i in 0..N {
        guards.push(put_instance(&store, "web", &format!("n1-web-{i}-80"), 8080).await?);
    }
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<WriteDone>();
    // Every wish is queued before the writer starts, as after a start-up's first probes.
    for (i, guard) in guards.iter().enumerate() {
        // Every third verdict is about an older registration: its guard must fail.
        let guard = if i % 3 == 0 { guard - 1 } else { *guard };
        req_tx.send(WriteRequest {
            item: ("web".parse()?, format!("n1-web-{i}-80").parse()?),
            ticket: i as u64,
            guard,
            kind: mark(guard),
        })?;
    }
    let before = store.revision().await?;
    let writer = Writer {
        store: store.clone(),
        keyspace: ks(),
        metrics: Metrics::new(),
        concurrency: 2,
    };
    let task = tokio::spawn(writer.run(req_rx, done_tx, lease_rx));
    let mut results = vec![None; N];
    for _ in 0..N {
        let d = tokio::time::timeout(WAIT, done_rx.recv())
            .await?
            .context("writer stopped")?;
        let i = d.ticket as usize;
        ensure!(results[i].is_none(), "two answers for write {i}");
        results[i] = Some(d.result);
    }
    task.abort();
    for (i, result) in results.iter().enumerate() {
        let id = format!("n1-web-{i}-80");
        let mark = health(&store, "web", &id).await;
        if i % 3 == 0 {
            ensure!(
                *result == Some(WriteResult::Stale) && mark.is_none(),
                "stale write {i}: {result:?}, mark {mark:?}"
            );
        } else {
            ensure!(
                matches!(
                    result,
                    Some(WriteResult::Applied {
                        lease_generation: 1
                    })
                ),
                "write {i}: {result:?}"
            );
            let (h, kv) = mark.with_context(|| format!("no mark for {id}"))?;
            ensure!(h.observed_mod_rev == guards[i] && kv.lease == lease.id());
        }
    }
    // Batched: a handful of commits for 250 writes, not one each.
    let commits = store.revision().await? - before;
    ensure!(
        commits <= (N / catalog::store::MAX_BATCH + 1) as i64 * 2,
        "{commits} etcd revisions for {N} writes: not batched"
    );
    Ok(())
}
