//! Retries after resets: an instance that takes connections and resets them at once (a
//! crashing process, a listener closing under load) costs a GET a retry elsewhere, never
//! an error.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use common::*;
use tokio::net::TcpListener;

/// Accepts connections and resets each at once (`SO_LINGER` 0, then close), without
/// reading. The balancer's new connection is established in the listen backlog before
/// this accepts it, so the reset lands either before the request head is written (the
/// write fails) or after (the read fails): both happen within a few hundred requests.
struct Resetter {
    addr: SocketAddr,
    resets: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Resetter {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let resets = Arc::new(AtomicU64::new(0));
        let counted = resets.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self { addr, resets, task })
    }
}

impl Drop for Resetter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_sent_to_an_instance_that_resets_new_connections_are_retried_elsewhere() -> Result<()>
{
    let good = Backend::start("good").await?;
    let resetter = Resetter::start().await?;
    // Ejection off and a budget of one retry per request: every request that meets the
    // resetter must be retried on the good instance.
    let lb = Lb::start(&format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"

[upstream]
retry_budget_percent = 100
[upstream.outlier]
consecutive_failures = 0

[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/"
  service = "web"

[[service]]
name = "web"
algorithm = "round_robin"
  [[service.endpoint]]
  addr = "{}"
  [[service.endpoint]]
  addr = "{}"
"#,
        good.addr, resetter.addr
    ))
    .await?;

    let load = Load::start(lb.url("/"), 4);
    wharf_tests::eventually("the resetter met 300 connections", WAIT, || async {
        (resetter.resets.load(Ordering::Relaxed) >= 300).then_some(())
    })
    .await?;
    let stats = load.stop().await;
    let errors = stats.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} failures, the first ones: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    // Both kinds of reset (see `Resetter`) were met, or the test says nothing about one;
    // the balancer's debug log names each.
    let log = lb.log();
    for kind in [
        "new connection reset before the request head",
        "connection closed before a response",
    ] {
        assert!(log.contains(kind), "never met: {kind}");
    }
    assert!(stats.count("good") > 0);
    let m = lb.metrics().await?;
    let retried = sample(
        &m,
        r#"balancer_retries_total{reason="reset",service="web"}"#,
    )
    .unwrap_or(0.0);
    let resets = resetter.resets.load(Ordering::Relaxed) as f64;
    assert!(
        retried > 0.0 && retried <= resets,
        "{retried} reset retries for {resets} resets"
    );
    Ok(())
}
