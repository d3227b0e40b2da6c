//! `retry_on` on a route, through the real binary: an idempotent request answered with a
//! listed status by one instance goes to another (no 500 reaches the client while a good
//! instance is left), counted as a `status` retry; a POST with a body is not sent again;
//! a route without it passes the 500 on; with no other instance left the answer itself is
//! passed on (not a 502).

mod common;

use anyhow::Result;
use common::*;
use http_body_util::{BodyExt, Full};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_answers_are_retried_on_another_instance() -> Result<()> {
    let (a, bad) = (Backend::start("a").await?, Backend::start("fail1").await?);
    let lonely = Backend::start("fail2").await?;
    let lb = Lb::start(&format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[upstream]
retry_budget_percent = 100  # round robin sends every first try to the failing instance
[upstream.outlier]
consecutive_failures = 0  # and it stays in the rotation
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/plain"
  service = "web"
  [[listener.route]]
  path_prefix = "/lonely"
  service = "lonely"
  retry_on = [500, 503]
  [[listener.route]]
  service = "web"
  retry_on = [500, 503]
[[service]]
name = "web"
algorithm = "round_robin"
  [[service.endpoint]]
  addr = "{}"
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "lonely"
  [[service.endpoint]]
  addr = "{}"
"#,
        a.addr, bad.addr, lonely.addr
    ))
    .await?;
    let c = client();
    // The GETs that reach the failing instance are retried on `a`.
    for i in 0..20 {
        let got = get_with(&c, &lb.url("/")).await?;
        assert_eq!(
            got,
            (http::StatusCode::OK, "a".into()),
            "GET {i}: {}",
            lb.log()
        );
    }
    let m = lb.metrics().await?;
    let retried = sample(
        &m,
        r#"balancer_retries_total{reason="status",service="web"}"#,
    );
    assert!(retried.is_some_and(|n| n >= 10.0), "{m}");
    // Without `retry_on`, the 500s reach the client.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(get_with(&c, &lb.url("/plain")).await?.0.as_u16());
    }
    assert!(codes.contains(&500), "{codes:?}");
    // A POST with a body is not sent again.
    let post: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut codes = Vec::new();
    for _ in 0..4 {
        let req = hyper::Request::post(lb.url("/echo"))
            .body(Full::new(bytes::Bytes::from_static(b"data")))?;
        let resp = tokio::time::timeout(WAIT, post.request(req)).await??;
        codes.push(resp.status().as_u16());
        resp.into_body().collect().await?;
    }
    assert!(codes.contains(&500), "{codes:?}");
    // No other instance: the answer itself is passed on.
    let (code, body) = get_with(&c, &lb.url("/lonely")).await?;
    assert_eq!((code.as_u16(), body.as_str()), (500, "fail2"));
    Ok(())
}

#[test]
fn only_error_statuses_can_be_listed() -> Result<()> {
    common::route_option_refused("  retry_on = [302]", "retry_on")
}
