//! The Watcher's guarantees, each against a real etcd server.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use catalog::store::Store;
use catalog::watch::WatchConfig;
use catalog::{CatalogView, Diff, EtcdStore, Key, Keyspace, Update, Watcher};
use wharf_tests::{EtcdCluster, EtcdServer, eventually};

const WAIT: Duration = Duration::from_secs(20);

fn instance_json(svc: &str, id: &str, port: u16) -> Vec<u8> {
    serde_json::json!({
        "id": id, "service": svc, "version": "v1", "node": "n1",
        "addr": "127.0.0.1", "port": port,
    })
    .to_string()
    .into_bytes()
}

fn watcher_on(store: EtcdStore) -> Watcher {
    wharf_tests::init_tracing();
    let ks = Keyspace::default();
    let mut config = WatchConfig::new(vec![ks.services(), ks.nodes()]);
    config.backoff_max = Duration::from_millis(500);
    config.progress_interval = Duration::from_millis(300);
    Watcher::spawn(store, ks, config)
}

async fn next(w: &mut Watcher) -> Result<Update> {
    tokio::time::timeout(WAIT, w.next())
        .await
        .context("no watcher update in time")?
        .context("watcher stopped")
}

/// Folds updates into `view` until `done` holds.
async fn fold_until(
    w: &mut Watcher,
    view: &mut CatalogView,
    mut done: impl FnMut(&CatalogView) -> bool,
) -> Result<Vec<Update>> {
    let mut seen = Vec::new();
    while !done(view) {
        let u = next(w).await?;
        view.apply(u.clone());
        seen.push(u);
    }
    Ok(seen)
}

async fn current_view(store: &EtcdStore) -> Result<CatalogView> {
    let mut w = watcher_on(store.clone());
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    Ok(view)
}

fn key(svc: &str, id: &str) -> String {
    Keyspace::default().instance(&svc.parse().unwrap(), &id.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_is_a_reset_with_every_key() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    for i in 0..3 {
        let id = format!("n1-web-{i}-80");
        store
            .put(&key("web", &id), instance_json("web", &id, 8000 + i), None)
            .await?;
    }
    store
        .put(
            "/wharf/v1/services/web/config",
            br#"{"split":{"v1":100}}"#.to_vec(),
            None,
        )
        .await?;
    let mut w = watcher_on(store);
    let first = next(&mut w).await?;
    let [Diff::Reset(snapshot)] = first.diffs.as_slice() else {
        bail!("first update is not a lone Reset: {first:?}");
    };
    assert_eq!(snapshot.entries.len(), 4);
    let mut view = CatalogView::default();
    view.apply(first.clone());
    let web = &view.services[&"web".parse()?];
    assert_eq!(web.instances.len(), 3);
    assert!(web.config.is_some());
    assert_eq!(w.stats().resets(), 1);
    assert!(w.stats().since_sync().is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rapid_puts_arrive_in_order() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let mut w = watcher_on(store.clone());
    next(&mut w).await?; // the (empty) initial Reset
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..1000u16 {
                let id = format!("n1-web-{i}-80");
                store
                    .put(&key("web", &id), instance_json("web", &id, i), None)
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut ports = Vec::new();
    let mut last_rev = 0;
    while ports.len() < 1000 {
        let u = next(&mut w).await?;
        assert!(
            u.revision > last_rev,
            "revisions must increase: {last_rev} then {u:?}"
        );
        last_rev = u.revision;
        for d in u.diffs {
            match d {
                Diff::Put(e) => match e.value {
                    catalog::Value::Instance(i) => ports.push(i.port),
                    other => bail!("unexpected value {other:?}"),
                },
                other => bail!("unexpected diff {other:?}"),
            }
        }
    }
    writer.await??;
    assert_eq!(
        ports,
        (0..1000).collect::<Vec<u16>>(),
        "every put, once, in order"
    );
    assert_eq!(w.stats().resets(), 1);
    assert_eq!(w.stats().events(), 1000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_etcd_restart_without_loss_or_relist() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let mut w = watcher_on(store.clone());
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);

    let put = |n: u16| {
        let store = store.clone();
        async move {
            let id = format!("n1-web-{n}-80");
            store
                .put(&key("web", &id), instance_json("web", &id, n), None)
                .await
        }
    };
    for n in 0..20 {
        put(n).await?;
    }
    let count = |v: &CatalogView| v.instances().count();
    fold_until(&mut w, &mut view, |v| count(v) == 20).await?;

    // Crash etcd twice while keys keep changing in between.
    for round in 0..2u16 {
        etcd.kill();
        // While etcd is down the watcher must not report anything (certainly not "empty").
        let quiet = tokio::time::timeout(Duration::from_millis(800), w.next()).await;
        assert!(
            quiet.is_err(),
            "watcher emitted while etcd was down: {quiet:?}"
        );
        etcd.restart()?;
        let base = 20 + round * 20;
        for n in base..base + 20 {
            // The client reconnects lazily; retry a put that raced the restart.
            eventually(
                "put after restart",
                WAIT,
                || async move { put(n).await.ok() },
            )
            .await?;
        }
        fold_until(&mut w, &mut view, |v| count(v) == base as usize + 20).await?;
    }
    // Deletes travel the same way.
    store.delete(&key("web", "n1-web-0-80")).await?;
    fold_until(&mut w, &mut view, |v| count(v) == 59).await?;

    assert_eq!(w.stats().resets(), 1, "resumed, never relisted");
    assert!(w.stats().reconnects() >= 2, "the stream was re-opened");
    assert_eq!(
        view,
        current_view(&store).await?,
        "nothing lost, nothing extra"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_relists_with_the_right_state() -> Result<()> {
    let mut cluster = EtcdCluster::start(3)?;
    // The watcher talks to member 0 only; the writer to member 1.
    let watch_store = cluster.members[0].store().await?;
    let writer = cluster.members[1].store().await?;
    for n in 0..10u16 {
        let id = format!("n1-web-{n}-80");
        writer
            .put(&key("web", &id), instance_json("web", &id, n), None)
            .await?;
    }
    let mut w = watcher_on(watch_store);
    let mut view = CatalogView::default();
    fold_until(&mut w, &mut view, |v| v.instances().count() == 10).await?;

    cluster.members[0].stop();
    for n in 0..5u16 {
        writer
            .delete(&key("web", &format!("n1-web-{n}-80")))
            .await?;
    }
    for n in 10..13u16 {
        let id = format!("n1-web-{n}-80");
        writer
            .put(&key("web", &id), instance_json("web", &id, n), None)
            .await?;
    }
    let rev = cluster.members[1].compact().await?;
    cluster.members[0].start_again()?;
    cluster.members[0].wait_healthy(WAIT)?;

    let u = loop {
        let u = next(&mut w).await?;
        if matches!(u.diffs.first(), Some(Diff::Reset(_))) {
            break u;
        }
    };
    assert!(u.revision >= rev);
    view.apply(u);
    assert_eq!(w.stats().resets(), 2);
    let ids: Vec<String> = view.instances().map(|r| r.value.id.to_string()).collect();
    let want: Vec<String> = (5..13).map(|n| format!("n1-web-{n}-80")).collect();
    let mut ids_sorted = ids.clone();
    ids_sorted.sort();
    let mut want_sorted = want;
    want_sorted.sort();
    assert_eq!(ids_sorted, want_sorted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_skipped_and_counted() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    store
        .put(
            &key("web", "n1-web-0-80"),
            instance_json("web", "n1-web-0-80", 1),
            None,
        )
        .await?;
    store
        .put(&key("web", "n1-web-1-80"), b"{not json".to_vec(), None)
        .await?;
    store
        .put("/wharf/v1/services/Bad_Name/config", b"{}".to_vec(), None)
        .await?;
    // A value whose identity disagrees with its key.
    store
        .put(
            &key("web", "n1-web-2-80"),
            instance_json("web", "n1-web-9-80", 2),
            None,
        )
        .await?;
    let mut w = watcher_on(store.clone());
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    assert_eq!(view.instances().count(), 1, "the good key is not hidden");
    assert_eq!(w.stats().malformed(), 3);

    // A good key turning into garbage is dropped, not kept at its last good value...
    store
        .put(&key("web", "n1-web-0-80"), b"[]".to_vec(), None)
        .await?;
    let u = next(&mut w).await?;
    assert!(
        matches!(u.diffs.as_slice(), [Diff::Delete(Key::Instance(..))]),
        "{u:?}"
    );
    view.apply(u);
    assert_eq!(w.stats().malformed(), 4);
    // ...and the stream goes on.
    store
        .put(
            &key("web", "n1-web-3-80"),
            instance_json("web", "n1-web-3-80", 3),
            None,
        )
        .await?;
    fold_until(&mut w, &mut view, |v| v.instances().count() == 1).await?;
    assert_eq!(view.instances().next().unwrap().value.port, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_an_absent_etcd_and_never_reports_empty() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    store
        .put(
            &key("web", "n1-web-0-80"),
            instance_json("web", "n1-web-0-80", 1),
            None,
        )
        .await?;
    etcd.kill();

    let mut w = watcher_on(store);
    let quiet = tokio::time::timeout(Duration::from_millis(1500), w.next()).await;
    assert!(quiet.is_err(), "emitted without etcd: {quiet:?}");
    assert!(w.stats().since_sync().is_none(), "never in sync yet");

    etcd.restart()?;
    let u = next(&mut w).await?;
    let mut view = CatalogView::default();
    view.apply(u);
    assert_eq!(view.instances().count(), 1);
    assert!(w.stats().since_sync().unwrap() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_grows_while_etcd_is_down() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let mut w = watcher_on(store);
    next(&mut w).await?;
    let stats = w.stats();
    // Progress answers keep the watcher fresh.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(stats.since_sync().unwrap() < Duration::from_millis(1000));
    etcd.kill();
    eventually("staleness above 1.5 s", WAIT, || {
        let s = stats.clone();
        async move { (s.since_sync()? > Duration::from_millis(1500)).then_some(()) }
    })
    .await?;
    etcd.restart()?;
    eventually("fresh again", WAIT, || {
        let s = stats.clone();
        async move { (s.since_sync()? < Duration::from_millis(700)).then_some(()) }
    })
    .await?;
    drop(w);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_a_catalog_larger_than_one_page_and_one_grpc_message() -> Result<()> {
    use catalog::store::Op;
    // 12,000 instances of ~500 bytes: more than two list pages and, at ~6 MB, more than
    // gRPC's default 4 MiB message limit if it were fetched in one response.
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let padding = "x".repeat(300);
    for chunk in (0..12_000u32).collect::<Vec<_>>().chunks(128) {
        let ops = chunk
            .iter()
            .map(|n| {
                let id = format!("n1-c{n}-80");
                let mut v: serde_json::Value =
                    serde_json::from_slice(&instance_json("web", &id, 80))?;
                v["attrs"] = serde_json::json!({ "pad": padding });
                Ok(Op::Put {
                    key: key("web", &id),
                    value: v.to_string().into_bytes(),
                    lease: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        store.txn(vec![], ops).await?;
    }
    let mut w = watcher_on(store);
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    assert_eq!(view.instances().count(), 12_000);
    assert_eq!(w.stats().malformed(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_behind_the_same_endpoint_forces_a_relist() -> Result<()> {
    let mut old = EtcdServer::start()?;
    let store = old.store().await?;
    for n in 0..30u16 {
        let id = format!("n1-web-{n}-80");
        store
            .put(&key("web", &id), instance_json("web", &id, n), None)
            .await?;
    }
    let mut w = watcher_on(store.clone());
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    assert_eq!(view.instances().count(), 30);

    // Replace the cluster: same address, new data (a new cluster id, revisions start over).
    let port = old.client_port();
    old.kill();
    let new = EtcdServer::start_on(Some(port))?;
    let fresh = new.store().await?;
    fresh
        .put(
            &key("api", "n2-api-0-80"),
            instance_json("api", "n2-api-0-80", 1),
            None,
        )
        .await?;

    let u = loop {
        let u = next(&mut w).await?;
        if matches!(u.diffs.first(), Some(Diff::Reset(_))) {
            break u;
        }
        view.apply(u);
    };
    view.apply(u);
    // The new key may come with the relist or right after it.
    fold_until(&mut w, &mut view, |v| {
        v.services.contains_key(&"api".parse().unwrap())
    })
    .await?;
    let ids: Vec<String> = view.instances().map(|r| r.value.id.to_string()).collect();
    assert_eq!(
        ids,
        vec!["n2-api-0-80"],
        "nothing of the old cluster survives"
    );
    assert_eq!(w.stats().resets(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_auth() -> Result<()> {
    use catalog::EtcdConfig;
    let etcd = EtcdServer::start()?;
    let mut admin = etcd.store().await?.client();
    admin.user_add("root", "s3cret", None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.auth_enable().await?;

    let mut config = EtcdConfig::new([etcd.endpoint()]);
    config.username = Some("root".into());
    config.password = Some("s3cret".into());
    assert!(
        !format!("{config:?}").contains("s3cret"),
        "password never printed"
    );
    let store = EtcdStore::connect(&config).await?;
    store
        .put(
            &key("web", "n1-web-0-80"),
            instance_json("web", "n1-web-0-80", 1),
            None,
        )
        .await?;
    let mut w = watcher_on(store);
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    assert_eq!(view.instances().count(), 1);

    // Without credentials the same cluster refuses.
    let anonymous = etcd.store().await?;
    assert!(anonymous.get("/wharf/v1/nodes/x").await.is_err());
    config.password = Some("wrong".into());
    assert!(EtcdStore::connect(&config).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() -> Result<()> {
    use catalog::EtcdConfig;
    use catalog::store::TlsFiles;
    use wharf_tests::{ServerTls, TestPki};
    let pki = TestPki::generate()?;
    let etcd = EtcdServer::start_tls(ServerTls {
        cert: pki.path("server.crt"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.crt")),
    })?;
    assert!(etcd.endpoint().starts_with("https://"));
    let mut config = EtcdConfig::new([etcd.endpoint()]);
    config.tls = Some(TlsFiles {
        ca: pki.path("ca.crt"),
        cert: Some(pki.path("client.crt")),
        key: Some(pki.path("client.key")),
        domain: None,
    });
    let store = EtcdStore::connect(&config).await?;
    store
        .put(
            &key("web", "n1-web-0-80"),
            instance_json("web", "n1-web-0-80", 1),
            None,
        )
        .await?;
    let mut w = watcher_on(store);
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    assert_eq!(view.instances().count(), 1);

    // Without a client certificate the server refuses the handshake.
    config.tls.as_mut().unwrap().cert = None;
    config.tls.as_mut().unwrap().key = None;
    let no_cert = EtcdStore::connect(&config).await?;
    assert!(no_cert.get("/wharf/v1/nodes/x").await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_backup_moves_revisions_back_and_forces_a_relist() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let put = |n: u16| {
        let store = store.clone();
        async move {
            let id = format!("n1-web-{n}-80");
            store
                .put(&key("web", &id), instance_json("web", &id, n), None)
                .await
        }
    };
    for n in 0..5 {
        put(n).await?;
    }
    let backup = tempfile::NamedTempFile::new()?;
    etcd.snapshot(backup.path())?;
    for n in 5..25 {
        put(n).await?;
    }
    let mut w = watcher_on(store.clone());
    let mut view = CatalogView::default();
    view.apply(next(&mut w).await?);
    assert_eq!(view.instances().count(), 25);

    // Same cluster id, older revision: the 20 newer keys no longer exist.
    etcd.restore(backup.path())?;
    let u = loop {
        let u = next(&mut w).await?;
        if matches!(u.diffs.first(), Some(Diff::Reset(_))) {
            break u;
        }
    };
    view.apply(u);
    assert_eq!(
        view.instances().count(),
        5,
        "state of the backup, nothing newer"
    );
    assert_eq!(w.stats().resets(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watcher_stops_even_while_etcd_is_down() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let mut w = watcher_on(etcd.store().await?);
    next(&mut w).await?;
    etcd.kill();
    // Let it fail a few reconnects, then drop it: its task must end, not retry forever.
    eventually("a failed reconnect", WAIT, || {
        let s = w.stats();
        async move { (s.reconnects() >= 1).then_some(()) }
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(5), w.shutdown())
        .await
        .context("watcher task still running after its consumer left")?;
    Ok(())
}
