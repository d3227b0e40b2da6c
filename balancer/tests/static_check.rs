//! `[service.check]` on static services (no etcd), through the real binary: an endpoint
//! that answers its HTTP check with 500 leaves the table and gets no requests; one that
//! stops listening leaves it after `fall` failed TCP checks and comes back `rise` checks
//! after it listens again, with no failed request under load all along; when every
//! endpoint fails, all are routed (panic mode); `--check` refuses settings that cannot
//! work.

mod common;

use std::net::SocketAddr;

use anyhow::Result;
use common::*;
use wharf_tests::eventually;

fn config(endpoints: &[SocketAddr], check: &str) -> String {
    service_config(
        "web",
        &format!("algorithm = \"round_robin\"\n{check}"),
        endpoints,
    )
}

/// `balancer_backends{service="web",state}`, 0 when absent.
async fn backends(lb: &Lb, state: &str) -> f64 {
    let m = lb.metrics().await.unwrap_or_default();
    sample(
        &m,
        &format!(r#"balancer_backends{{service="web",state="{state}"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_http_check_gets_no_requests() -> Result<()> {
    let a = Backend::start("a").await?;
    // A backend named fail* answers 500 to everything, its check included.
    let f = Backend::start("fail-b").await?;
    let check = "  [service.check]\n  path = \"/health\"\n  interval = \"50ms\"\n  fall = 2\n";
    let lb = Lb::start(&config(&[a.addr, f.addr], check)).await?;
    eventually("fail-b out of the table", WAIT, || async {
        (backends(&lb, "critical").await == 1.0 && backends(&lb, "routable").await == 1.0)
            .then_some(())
    })
    .await?;
    // (The gauges are set while the table is rebuilt, just before it is published.)
    eventually("only a answers", WAIT, || async {
        let seen = spread(&lb.url("/"), 10, 2).await.ok()?;
        (seen.get("a") == Some(&10)).then_some(())
    })
    .await?;
    let seen = spread(&lb.url("/"), 100, 4).await?;
    assert_eq!(seen.get("a"), Some(&100), "{seen:?}");
    assert!(lb.log().contains("failed its check"), "{}", lb.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_stops_listening_leaves_and_comes_back() -> Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let check = "  [service.check]\n  interval = \"50ms\"\n  rise = 2\n  fall = 2\n";
    let lb = Lb::start(&config(&[a.addr, b.addr], check)).await?;
    let load = Load::start(lb.url("/"), 4);
    eventually("traffic on a and b", WAIT, || async {
        (load.stats.count("a") > 20 && load.stats.count("b") > 20).then_some(())
    })
    .await?;

    b.kill();
    let addr = b.addr;
    drop(b);
    eventually("b out of the table", WAIT, || async {
        (backends(&lb, "critical").await == 1.0).then_some(())
    })
    .await?;
    let on_b = load.stats.count("b");
    let on_a = load.stats.count("a");
    eventually("a serves alone", WAIT, || async {
        (load.stats.count("a") > on_a + 100).then_some(())
    })
    .await?;
    assert_eq!(load.stats.count("b"), on_b);

    // Listening again on the same address: back after `rise` passing checks.
    let b2 = eventually("b listens again", WAIT, || async {
        Backend::start_on("b", addr).await.ok()
    })
    .await?;
    eventually("b back in the table", WAIT, || async {
        (backends(&lb, "routable").await == 2.0).then_some(())
    })
    .await?;
    let on_b = load.stats.count("b");
    eventually("b serves again", WAIT, || async {
        (load.stats.count("b") > on_b + 20).then_some(())
    })
    .await?;
    let stats = load.stop().await;
    assert_eq!(
        stats.failed.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "failures: {:?}",
        &stats.errors.lock().unwrap()[..]
    );
    assert!(b2.hits.load(std::sync::atomic::Ordering::Relaxed) > 0);
    Ok(())
}

/// Every endpoint failing: they are all routed rather than none (panic mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_failing_are_all_routed() -> Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let check = "  [service.check]\n  path = \"/status/503\"\n  interval = \"50ms\"\n  fall = 1\n";
    let lb = Lb::start(&config(&[a.addr, b.addr], check)).await?;
    eventually("both critical", WAIT, || async {
        (backends(&lb, "critical").await == 2.0).then_some(())
    })
    .await?;
    // Round robin over both, once the table with both is published.
    eventually("a and b answer alike", WAIT, || async {
        let seen = spread(&lb.url("/"), 40, 2).await.ok()?;
        (seen.get("a") == Some(&20) && seen.get("b") == Some(&20)).then_some(())
    })
    .await?;
    Ok(())
}

#[test]
fn check_refuses_settings_that_cannot_work() -> Result<()> {
    let text = config(&["127.0.0.1:1".parse()?], "  [service.check]\n  fall = 0\n");
    let err = check_refuses(&text)?;
    assert!(err.contains("service[0].check.fall"), "{err}");
    Ok(())
}
