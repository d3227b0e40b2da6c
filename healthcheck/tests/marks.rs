//! Health marks against a real etcd and real HTTP backends, with the checker running
//! in-process (the library's `run`).

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use catalog::store::Store;
use catalog::{HealthStatus, Keyspace, Update, WatchConfig, Watcher};
use common::*;
use wharf_tests::{EtcdServer, eventually};

fn passing(h: &catalog::Health) -> bool {
    h.status == HealthStatus::Passing
}
fn critical(h: &catalog::Health) -> bool {
    h.status == HealthStatus::Critical
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flips_after_exactly_fall_then_rise_probes() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(&store, "web", serde_json::json!({"path": "/healthz", "interval": "250ms", "timeout": "1s", "rise": 2, "fall": 3})).await?;
    let id = "n1-web-0-80";
    let rev = put_instance(&store, "web", id, backend.port()).await?;
    let checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;

    let (up, kv) = wait_mark(&store, "web", id, "passing mark", passing).await?;
    let served = |from: u64, to: u64, status: u16| {
        backend
            .probes_of(id)
            .iter()
            .filter(|s| s.status == status && s.at_ms > from && s.at_ms <= to)
            .count()
    };
    ensure!(
        served(0, up.since, 200) == 2,
        "passing after {} probes, want rise=2",
        served(0, up.since, 200)
    );
    ensure!(
        up.consecutive == 2 && up.checker.as_str() == "hc-1" && up.observed_mod_rev == rev,
        "{up:?}"
    );
    // The mark hangs off the checker's lease, the one of its presence key.
    let presence = store
        .get(&Keyspace::default().checker(&"hc-1".parse()?))
        .await?
        .unwrap();
    ensure!(
        kv.lease != 0 && kv.lease == presence.lease,
        "mark lease {} vs checker lease {}",
        kv.lease,
        presence.lease
    );

    backend.set_status(500);
    let (down, _) = wait_mark(&store, "web", id, "critical mark", critical).await?;
    ensure!(
        served(up.since, down.since, 500) == 3,
        "critical after {} failures, want fall=3",
        served(up.since, down.since, 500)
    );
    ensure!(
        down.consecutive == 3 && down.output.contains("status 500"),
        "{down:?}"
    );

    backend.set_status(200);
    let (again, _) = wait_mark(&store, "web", id, "passing again", passing).await?;
    ensure!(
        served(down.since, again.since, 200) == 2,
        "passing again after {} passes",
        served(down.since, again.since, 200)
    );

    let m = checker.metrics().await?;
    ensure!(
        sample(
            &m,
            "healthcheck_transitions_total{service=\"web\",to=\"critical\"}"
        ) == Some(1.0),
        "{m}"
    );
    ensure!(
        sample(&m, "healthcheck_instances{state=\"passing\"}") == Some(1.0),
        "{m}"
    );
    ensure!(
        sample(
            &m,
            "healthcheck_probes_total{result=\"fail\",service=\"web\"}"
        ) >= Some(3.0),
        "{m}"
    );
    ensure!(
        m.contains("healthcheck_probe_duration_seconds_bucket{service=\"web\""),
        "{m}"
    );
    ensure!(m.contains("healthcheck_watch_staleness_seconds"), "{m}");
    checker.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_is_never_passing_before_rise_passes_in_a_row() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    backend.script(&[200, 200, 500, 200, 200, 200]);
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/", "interval": "250ms", "rise": 3, "fall": 3}),
    )
    .await?;
    let id = "n1-web-0-81";
    put_instance(&store, "web", id, backend.port()).await?;
    let _checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;

    let (up, kv) = wait_mark(&store, "web", id, "passing mark", passing).await?;
    // The mark is stamped when the supervisor handles the verdict; on a loaded machine the
    // next probe may already have been answered by then, so look at the first six only.
    let probes = backend.probes_of(id);
    let before: Vec<u16> = probes
        .iter()
        .filter(|s| s.at_ms <= up.since)
        .map(|s| s.status)
        .collect();
    ensure!(
        before.len() >= 6 && before[..6] == [200, 200, 500, 200, 200, 200],
        "passing after {before:?}"
    );
    ensure!(
        probes.len() >= 6 && probes[5].at_ms <= up.since,
        "passing before the sixth probe was answered: {probes:?}, {up:?}"
    );
    ensure!(up.consecutive == 3, "{up:?}");
    // No critical (or earlier passing) mark came before. Normally the mark was written
    // once; a loaded machine may write the passing verdict again (a write retried after a
    // timeout, a lease granted again), which is fine: then every version of the key must be
    // passing, the first one written after the sixth probe.
    if kv.create_revision != kv.mod_revision {
        let history = mark_history(&store, "web", id, kv.mod_revision).await?;
        ensure!(
            history.iter().all(passing)
                && history
                    .first()
                    .is_some_and(|first| first.since >= probes[5].at_ms),
            "a mark came before the sixth probe's passing one: {history:?}, {probes:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_count_as_failures() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(&store, "web", serde_json::json!({"path": "/", "interval": "150ms", "timeout": "100ms", "rise": 1, "fall": 2})).await?;
    let id = "n1-web-0-82";
    put_instance(&store, "web", id, backend.port()).await?;
    let checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;
    wait_mark(&store, "web", id, "passing mark", passing).await?;
    // Still 200, but too late.
    backend.set_delay(Duration::from_millis(400));
    let (down, _) = wait_mark(&store, "web", id, "critical mark", critical).await?;
    ensure!(down.output.contains("timed out"), "{down:?}");
    ensure!(down.consecutive == 2, "{down:?}");
    let m = checker.metrics().await?;
    ensure!(
        sample(
            &m,
            "healthcheck_probes_total{result=\"timeout\",service=\"web\"}"
        ) >= Some(2.0),
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_services_get_a_connect_check() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accept = tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    put_check(
        &store,
        "db",
        serde_json::json!({"path": "/ignored", "interval": "100ms", "rise": 1, "fall": 2}),
    )
    .await?;
    let id = "n1-db-0-5432";
    put_instance_json(
        &store,
        "db",
        id,
        serde_json::json!({
            "id": id, "service": "db", "version": "v1", "node": "n1",
            "addr": "127.0.0.1", "port": port, "protocol": "tcp",
        }),
    )
    .await?;
    let _checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;
    let (up, _) = wait_mark(&store, "db", id, "passing mark", passing).await?;
    ensure!(
        up.output.contains("TCP connect") && up.output.contains("connected"),
        "{up:?}"
    );
    accept.abort();
    let _ = accept.await; // the listener is dropped: connections are refused
    let (down, _) = wait_mark(&store, "db", id, "critical mark", critical).await?;
    ensure!(down.output.contains("refused"), "{down:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregistration_during_a_probe_does_not_inherit_the_old_verdict() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(&store, "web", serde_json::json!({"path": "/", "interval": "150ms", "timeout": "3s", "rise": 2, "fall": 2})).await?;
    let id = "n1-web-0-83";
    put_instance(&store, "web", id, backend.port()).await?;
    let _checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;
    wait_mark(&store, "web", id, "passing mark", passing).await?;

    // Record every mark written from now on.
    let ks = Keyspace::default();
    let mut watcher = Watcher::spawn(
        store.clone(),
        ks.clone(),
        WatchConfig::new(vec![ks.services()]),
    );
    let first: Update = tokio::time::timeout(WAIT, watcher.next()).await?.unwrap();
    drop(first);
    // A probe is in flight, its answer (200) already decided...
    backend.set_delay(Duration::from_millis(800));
    eventually("a probe in flight", WAIT, || async {
        (backend.in_flight() > 0).then_some(())
    })
    .await?;
    // ...when the id is registered anew and the new tenant fails.
    store.delete(&instance_key("web", id)).await?;
    backend.set_status(500);
    backend.set_delay(Duration::ZERO);
    let rev = put_instance(&store, "web", id, backend.port()).await?;

    let (down, _) = wait_mark(
        &store,
        "web",
        id,
        "critical mark of the new registration",
        |h| critical(h) && h.observed_mod_rev == rev,
    )
    .await?;
    ensure!(down.consecutive == 2, "{down:?}");
    // No passing mark was ever written about the new registration.
    let mut marks = Vec::new();
    while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(300), watcher.next()).await {
        for d in u.diffs {
            if let catalog::Diff::Put(e) = d
                && let catalog::Value::Health(h) = e.value
            {
                marks.push(h);
            }
        }
    }
    ensure!(
        marks
            .iter()
            .any(|h| critical(h) && h.observed_mod_rev == rev),
        "watch missed the marks: {marks:?}"
    );
    ensure!(
        !marks
            .iter()
            .any(|h| passing(h) && h.observed_mod_rev >= rev),
        "the new registration inherited a passing verdict: {marks:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_instance_stops_being_probed_and_loses_its_mark() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/", "interval": "100ms", "rise": 1}),
    )
    .await?;
    let (gone, stays) = ("n1-web-0-84", "n1-web-0-85");
    put_instance(&store, "web", gone, backend.port()).await?;
    put_instance(&store, "web", stays, backend.port()).await?;
    let _checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;
    wait_mark(&store, "web", gone, "passing mark", passing).await?;
    wait_mark(&store, "web", stays, "passing mark", passing).await?;

    store.delete(&instance_key("web", gone)).await?;
    let deleted_at = catalog::model::now_millis();
    // The other instance keeps being probed: the checker is alive and busy.
    let base = backend.probes_of(stays).len();
    eventually("10 more probes of the remaining instance", WAIT, || async {
        (backend.probes_of(stays).len() >= base + 10).then_some(())
    })
    .await?;
    let late: Vec<_> = backend
        .probes_of(gone)
        .into_iter()
        .filter(|s| s.at_ms > deleted_at + 50)
        .collect();
    ensure!(late.is_empty(), "probes after removal: {late:?}");
    eventually(
        "the mark of the removed instance is deleted",
        WAIT,
        || async { health(&store, "web", gone).await.is_none().then_some(()) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_is_granted_again_and_marks_rewritten() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/", "interval": "100ms"}),
    )
    .await?;
    let id = "n1-web-0-86";
    put_instance(&store, "web", id, backend.port()).await?;
    let checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(3))).await?;
    let (_, kv) = wait_mark(&store, "web", id, "passing mark", passing).await?;
    let old = kv.lease;
    store.lease_revoke(old).await?;
    let (_, again) = eventually("mark rewritten under a new lease", WAIT, || async {
        health(&store, "web", id)
            .await
            .filter(|(h, k)| passing(h) && k.lease != 0 && k.lease != old)
    })
    .await?;
    let presence = store
        .get(&Keyspace::default().checker(&"hc-1".parse()?))
        .await?;
    ensure!(
        presence.is_some_and(|p| p.lease == again.lease),
        "presence key not under the new lease"
    );
    let m = checker.metrics().await?;
    ensure!(
        sample(&m, "healthcheck_lease_losses_total") == Some(1.0),
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_probing_while_etcd_is_down_and_writes_when_it_is_back() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(200).await?;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/", "interval": "100ms", "fall": 2}),
    )
    .await?;
    let id = "n1-web-0-87";
    put_instance(&store, "web", id, backend.port()).await?;
    let _checker = Checker::start(store.clone(), settings("hc-1", Duration::from_secs(5))).await?;
    wait_mark(&store, "web", id, "passing mark", passing).await?;

    etcd.kill();
    backend.set_status(500);
    eventually("failing probes while etcd is down", WAIT, || async {
        (backend
            .probes_of(id)
            .iter()
            .filter(|s| s.status == 500)
            .count()
            >= 4)
            .then_some(())
    })
    .await?;
    etcd.restart()?;
    wait_mark(
        &store,
        "web",
        id,
        "critical mark after etcd is back",
        critical,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_critical_instances_are_deregistered() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let backend = Backend::start(500).await?;
    put_check(
        &store,
        "web",
        serde_json::json!({"path": "/", "interval": "100ms", "fall": 2, "deregister_after": "1s"}),
    )
    .await?;
    let (dead, alive) = ("n1-web-0-88", "n1-web-0-89");
    let ok = Backend::start(200).await?;
    put_instance(&store, "web", dead, backend.port()).await?;
    put_instance(&store, "web", alive, ok.port()).await?;
    let mut s = settings("hc-1", Duration::from_secs(3));
    s.min_deregister_after = Duration::from_millis(500);
    let _checker = Checker::start(store.clone(), s).await?;
    let (down, _) = wait_mark(&store, "web", dead, "critical mark", critical).await?;
    eventually("deregistration", WAIT, || async {
        store
            .get(&instance_key("web", dead))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    let gone_at = catalog::model::now_millis();
    ensure!(
        gone_at >= down.since + 1000,
        "deregistered {} ms after turning critical",
        gone_at - down.since
    );
    eventually("its mark is gone too", WAIT, || async {
        health(&store, "web", dead).await.is_none().then_some(())
    })
    .await?;
    ensure!(
        store.get(&instance_key("web", alive)).await?.is_some(),
        "a passing instance was removed"
    );
    Ok(())
}
