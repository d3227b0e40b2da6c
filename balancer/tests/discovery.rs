//! The real balancer binary fed by a real etcd: hot swaps under load, draining, health
//! gating, and surviving an etcd outage.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use catalog::Store;
use catalog::{EtcdStore, Keyspace};
use common::*;
use wharf_tests::{EtcdServer, eventually};

fn lb_config(etcd: &EtcdServer) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"

[discovery.etcd]
endpoints = ["{}"]
dial_timeout = "1s"
request_timeout = "2s"

[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
"#,
        etcd.endpoint()
    )
}

struct Catalog {
    store: EtcdStore,
    ks: Keyspace,
}

impl Catalog {
    async fn new(etcd: &EtcdServer) -> Result<Self> {
        let c = Self::without_checker(etcd).await?;
        c.add_checker().await?;
        Ok(c)
    }

    async fn without_checker(etcd: &EtcdServer) -> Result<Self> {
        Ok(Self {
            store: etcd.store().await?,
            ks: Keyspace::default(),
        })
    }

    async fn add_checker(&self) -> Result<()> {
        let c = self;
        // A live checker: instances without a mark are pending, not in panic mode.
        c.store
            .put(
                &c.ks.checker(&"c1".parse()?),
                br#"{"version":"test","started":0}"#.to_vec(),
                None,
            )
            .await?;
        Ok(())
    }

    /// Registers an instance; returns the revision of the write.
    async fn register(&self, id: &str, b: &Backend, state: &str) -> Result<i64> {
        let v = serde_json::json!({
            "id": id, "service": "web", "version": "v1", "node": "n1",
            "addr": "127.0.0.1", "port": b.addr.port(), "state": state,
        });
        Ok(self
            .store
            .put(
                &self.ks.instance(&"web".parse()?, &id.parse()?),
                v.to_string().into_bytes(),
                None,
            )
            .await?)
    }

    async fn health(&self, id: &str, status: &str, rev: i64) -> Result<()> {
        let v = serde_json::json!({
            "status": status, "since": 0, "checker": "c1", "observed_mod_rev": rev,
        });
        self.store
            .put(
                &self.ks.health(&"web".parse()?, &id.parse()?),
                v.to_string().into_bytes(),
                None,
            )
            .await?;
        Ok(())
    }

    /// Registers and marks passing.
    async fn add(&self, id: &str, b: &Backend) -> Result<()> {
        let rev = self.register(id, b, "serving").await?;
        self.health(id, "passing", rev).await
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.store
            .delete(&self.ks.instance(&"web".parse()?, &id.parse()?))
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routable_instances_get_traffic_pending_and_critical_do_not() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(&etcd).await?;
    let bs = [
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
        Backend::start("pending").await?,
        Backend::start("critical").await?,
    ];
    for b in &bs[..3] {
        cat.add(&format!("n1-{}-80", b.name), b).await?;
    }
    cat.register("n1-pending-80", &bs[3], "serving").await?;
    let rev = cat.register("n1-critical-80", &bs[4], "serving").await?;
    cat.health("n1-critical-80", "critical", rev).await?;

    let lb = Lb::start(&lb_config(&etcd)).await?;
    let counts = spread(&lb.url("/"), 600, 8).await?;
    for name in ["a", "b", "c"] {
        assert!(
            counts.get(name).copied().unwrap_or(0) > 100,
            "{name}: {counts:?}"
        );
    }
    assert_eq!(counts.len(), 3, "pending/critical got traffic: {counts:?}");
    let m = lb.metrics().await?;
    assert_eq!(
        sample(&m, r#"balancer_backends{service="web",state="routable"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&m, r#"balancer_backends{service="web",state="pending"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"balancer_backends{service="web",state="critical"}"#),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_drain_remove_under_load_fail_nothing_and_apply_within_100ms() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(&etcd).await?;
    let (a, b, c) = (
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    );
    cat.add("n1-a-80", &a).await?;
    cat.add("n1-b-80", &b).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;
    let load = Load::start(lb.url("/slow/1"), 8);
    eventually("traffic on a and b", WAIT, || async {
        (load.stats.count("a") > 20 && load.stats.count("b") > 20).then_some(())
    })
    .await?;

    // Add: the new instance answers within 100 ms of the write.
    let t_add = Instant::now();
    cat.add("n1-c-80", &c).await?;
    let seen = eventually("c gets traffic", WAIT, || async {
        load.stats.first_seen.lock().unwrap().get("c").copied()
    })
    .await?;
    let add_latency = seen.saturating_duration_since(t_add);
    eprintln!("put -> first answer from the new instance: {add_latency:?}");
    assert!(
        add_latency < Duration::from_millis(100),
        "add took {add_latency:?}"
    );

    // Drain: no request starts on b after the write (in flight ones take ~1 ms).
    let t_drain = Instant::now();
    cat.register("n1-b-80", &b, "draining").await?;
    let hits_b = b.hits.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last_b = load.stats.last_seen.lock().unwrap()["b"];
    assert!(
        last_b.saturating_duration_since(t_drain) < Duration::from_millis(100),
        "b still served {:?} after draining",
        last_b.saturating_duration_since(t_drain)
    );
    assert!(b.hits.load(Ordering::Relaxed) <= hits_b + 8);
    // Its idle pooled connections were closed.
    eventually("b's pooled connections closed", WAIT, || async {
        (b.open.load(Ordering::Relaxed) == 0).then_some(())
    })
    .await?;

    // Remove: same for a deleted key.
    let t_rm = Instant::now();
    cat.remove("n1-a-80").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last_a = load.stats.last_seen.lock().unwrap()["a"];
    assert!(last_a.saturating_duration_since(t_rm) < Duration::from_millis(100));
    let before = load.stats.count("c");
    eventually("c serves alone", WAIT, || async {
        (load.stats.count("c") > before + 100).then_some(())
    })
    .await?;

    let stats = load.stop().await;
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "failures: {:?}",
        &stats.errors.lock().unwrap()[..]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_on_a_draining_instance_completes() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(&etcd).await?;
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    cat.add("n1-b-80", &b).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;
    let client = client();
    let url = lb.url("/slow/1500");
    let long = tokio::spawn({
        let client = client.clone();
        async move { get_with(&client, &url).await }
    });
    eventually("long request reached b", WAIT, || async {
        (b.hits.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await?;
    cat.add("n1-a-80", &a).await?;
    cat.register("n1-b-80", &b, "draining").await?;
    eventually("new requests go to a", WAIT, || async {
        (get_with(&client, &lb.url("/")).await.ok()?.1 == "a").then_some(())
    })
    .await?;
    let (code, body) = long.await??;
    assert_eq!((code.as_u16(), body.as_str()), (200, "b"));
    // Its keep-alive connection is not pooled again: b ends up with no connection.
    eventually(
        "no connection left to the drained instance",
        WAIT,
        || async { (b.open.load(Ordering::Relaxed) == 0).then_some(()) },
    )
    .await?;
    let m = lb.metrics().await?;
    assert_eq!(
        sample(&m, r#"balancer_backends{service="web",state="draining"}"#),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_going_away_under_load_changes_nothing() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let cat = Catalog::new(&etcd).await?;
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    cat.add("n1-a-80", &a).await?;
    cat.add("n1-b-80", &b).await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;
    let load = Load::start(lb.url("/"), 4);
    eventually("load running", WAIT, || async {
        (load.stats.ok.load(Ordering::Relaxed) > 200).then_some(())
    })
    .await?;
    etcd.kill();
    eventually("staleness visible", WAIT, || async {
        let m = lb.metrics().await.ok()?;
        (sample(&m, "balancer_discovery_staleness_seconds")? > 2.0).then_some(())
    })
    .await?;
    let stats = load.stop().await;
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "{:?}",
        &stats.errors.lock().unwrap()[..]
    );
    assert!(stats.count("a") > 100 && stats.count("b") > 100);
    // Still serving both after the outage has lasted a while.
    let counts = spread(&lb.url("/"), 200, 4).await?;
    assert_eq!(counts.len(), 2, "{counts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flag_does_a_dry_run_against_live_etcd() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(&etcd).await?;
    let a = Backend::start("a").await?;
    cat.add("n1-a-80", &a).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lb.toml");
    std::fs::write(
        &path,
        lb_config(&etcd)
            .replace("@ADMIN@", "1")
            .replace("@PORT@", "2"),
    )?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_balancer"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("-> service web: 1 routable"), "{stdout}");
    assert!(stdout.contains(&format!("n1-a-80 {}", a.addr)), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_routes_unchecked_instances_until_a_checker_speaks() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::without_checker(&etcd).await?;
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let rev_a = cat.register("n1-a-80", &a, "serving").await?;
    cat.register("n1-b-80", &b, "serving").await?;
    let lb = Lb::start(&lb_config(&etcd)).await?;
    // No checker alive: both unmarked instances serve rather than none.
    let counts = spread(&lb.url("/"), 200, 4).await?;
    assert_eq!(counts.len(), 2, "{counts:?}");
    // A checker appears and passes only a: b is pending.
    cat.add_checker().await?;
    cat.health("n1-a-80", "passing", rev_a).await?;
    eventually("only a serves", WAIT, || async {
        let c = spread(&lb.url("/"), 50, 2).await.ok()?;
        (c.len() == 1 && c.contains_key("a")).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_etcd_services_coexist() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let cat = Catalog::new(&etcd).await?;
    let (dynamic, fixed) = (
        Backend::start("dynamic").await?,
        Backend::start("fixed").await?,
    );
    cat.add("n1-dynamic-80", &dynamic).await?;
    let text = lb_config(&etcd).replace(
        "  [[listener.route]]\n  service = \"web\"",
        &format!(
            "  [[listener.route]]\n  path_prefix = \"/fixed\"\n  service = \"fixed\"\n  \
             [[listener.route]]\n  service = \"web\"\n\
             [[service]]\nname = \"fixed\"\n  [[service.endpoint]]\n  addr = \"{}\"\n",
            fixed.addr
        ),
    );
    let lb = Lb::start(&text).await?;
    let client = client();
    assert_eq!(get_with(&client, &lb.url("/fixed/x")).await?.1, "fixed");
    assert_eq!(get_with(&client, &lb.url("/other")).await?.1, "dynamic");
    Ok(())
}
