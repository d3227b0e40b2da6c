//! A service's `max_requests`, through the real binary: an instance never has more
//! requests in flight than its limit, however many clients send at once; a burst above
//! the fleet's capacity waits in the queue and is served, none failing; a request that
//! finds no slot within `queue_timeout` gets 503 and is counted; `--check` refuses 0.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use wharf_tests::eventually;

/// An instance that answers `/sleep/<ms>` after that long and records how many requests
/// it had in flight at most.
struct Counting {
    addr: SocketAddr,
    now: Arc<AtomicU64>,
    max: Arc<AtomicU64>,
}

impl Counting {
    async fn start() -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (now, max) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (n, m) = (now.clone(), max.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (n, m) = (n.clone(), m.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (n, m) = (n.clone(), m.clone());
                        async move {
                            let cur = n.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(cur, Ordering::SeqCst);
                            let ms: u64 = (req.uri().path().strip_prefix("/sleep/"))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            n.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, now, max })
    }
}

fn config(addrs: &[SocketAddr], limits: &str) -> String {
    service_config("web", &format!("{limits}\n"), addrs)
}

/// `n` GETs of `path` at once; their statuses.
async fn burst(lb: &Lb, path: &str, n: usize) -> Result<Vec<u16>> {
    let client = client();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), lb.url(path));
            tokio::spawn(async move { get_with(&client, &url).await.map(|(c, _)| c.as_u16()) })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await??);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_never_take_more_than_their_limit_and_a_burst_waits() -> Result<()> {
    let (a, b) = (Counting::start().await?, Counting::start().await?);
    let lb = Lb::start(&config(
        &[a.addr, b.addr],
        "max_requests = 2\nqueue_timeout = \"10s\"",
    ))
    .await?;
    // Each request takes 1 s: all 12 arrive while the first 4 are in flight, even on a
    // loaded machine.
    let codes = burst(&lb, "/sleep/1000", 12).await?;
    assert_eq!(codes, vec![200; 12]);
    assert_eq!(a.max.load(Ordering::SeqCst), 2);
    assert_eq!(b.max.load(Ordering::SeqCst), 2);
    let m = lb.metrics().await?;
    let queued = sample(&m, r#"balancer_queued_requests_total{service="web"}"#).unwrap_or(0.0);
    assert!(queued >= 8.0, "{queued} requests queued of 12 on 4 slots");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slot_within_the_queue_timeout_is_a_503() -> Result<()> {
    let a = Counting::start().await?;
    let lb = Lb::start(&config(
        &[a.addr],
        "max_requests = 1\nqueue_timeout = \"100ms\"",
    ))
    .await?;
    let client = client();
    let slow = {
        let (client, url) = (client.clone(), lb.url("/sleep/3000"));
        tokio::spawn(async move { get_with(&client, &url).await })
    };
    eventually("the slow request in flight", WAIT, || async {
        (a.now.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await?;
    let (code, body) = get_with(&client, &lb.url("/sleep/0")).await?;
    assert_eq!(
        (code.as_u16(), body.as_str()),
        (503, "every instance is at its max_requests\n")
    );
    let m = lb.metrics().await?;
    assert_eq!(
        sample(&m, r#"balancer_queue_timeouts_total{service="web"}"#),
        Some(1.0)
    );
    let (code, _) = slow.await??;
    assert_eq!(code.as_u16(), 200);
    assert_eq!(a.max.load(Ordering::SeqCst), 1);
    Ok(())
}

#[test]
fn check_refuses_a_limit_of_zero() -> Result<()> {
    let text = config(&["127.0.0.1:1".parse()?], "max_requests = 0");
    let err = check_refuses(&text)?;
    assert!(err.contains("service[0].max_requests"), "{err}");
    Ok(())
}
