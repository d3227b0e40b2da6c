//! A route's `rate_limit`, through the real binary: a client gets its burst, then 429 with
//! `Retry-After`, while other routes and other clients (told apart by the address a
//! trusted PROXY header announces) are untouched; a SIGHUP that leaves the limit alone
//! keeps the clients' buckets, one that changes it starts afresh; refusals are counted;
//! `--check` lists the limit and refuses a rate of 0.

mod common;

use anyhow::Result;
use common::*;

/// One token every 5 s, `burst` at once: a test never waits long enough for a refill.
fn config(backend: &Backend, burst: u32, front: u16) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/limited/"
  service = "web"
  rate_limit = {{ per_second = 0.2, burst = {burst} }}
  [[listener.route]]
  service = "web"
[[listener]]
name = "front"
bind = "127.0.0.1:{front}"
  [listener.proxy_protocol]
  trusted = ["127.0.0.1"]
  [[listener.route]]
  service = "web"
  rate_limit = {{ per_second = 0.2, burst = 1 }}
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
"#,
        backend.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_its_burst_then_429() -> Result<()> {
    let a = Backend::start("a").await?;
    let front = wharf_tests::free_port()?;
    let lb = Lb::start(&config(&a, 3, front)).await?;
    let client = client();
    for i in 0..3 {
        let (code, body) = get_with(&client, &lb.url("/limited/x")).await?;
        assert_eq!((code.as_u16(), body.as_str()), (200, "a"), "request {i}");
    }
    let resp = tokio::time::timeout(WAIT, client.get(lb.url("/limited/x").parse()?)).await??;
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "5");
    // Another route of the listener is not limited.
    for _ in 0..5 {
        let (code, _) = get_with(&client, &lb.url("/other")).await?;
        assert_eq!(code.as_u16(), 200);
    }
    // Behind a trusted front balancer, each announced client has its own bucket.
    let first = get_via_proxy_header(front, "192.0.2.1:1000", "/").await?;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let again = get_via_proxy_header(front, "192.0.2.1:1001", "/").await?;
    assert!(again.starts_with("HTTP/1.1 429"), "{again}");
    let other = get_via_proxy_header(front, "192.0.2.2:1000", "/").await?;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");

    let m = lb.metrics().await?;
    assert_eq!(
        sample(
            &m,
            r#"balancer_rate_limited_total{listener="web",service="web"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"balancer_rate_limited_total{listener="front",service="web"}"#
        ),
        Some(1.0)
    );
    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("path /limited/ -> service web [0.2/s per client, burst 3]"),
        "{out}"
    );

    // A SIGHUP that leaves the limit alone keeps the empty bucket...
    // (The listener's line only: the service has the same name.)
    let other_change =
        config(&a, 3, front).replacen("name = \"web\"\n", "name = \"web\"\nmax_headers = 99\n", 1);
    lb.write_config(&other_change)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    let (code, _) = get_with(&client, &lb.url("/limited/x")).await?;
    assert_eq!(code.as_u16(), 429, "a reload handed out a new burst");
    // ...one that changes it starts afresh.
    lb.write_config(&config(&a, 4, front))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 2.0).await?;
    let (code, _) = get_with(&client, &lb.url("/limited/x")).await?;
    assert_eq!(code.as_u16(), 200);
    Ok(())
}

#[test]
fn check_refuses_a_rate_of_zero() -> Result<()> {
    route_option_refused("  rate_limit = { per_second = 0 }", "rate_limit.per_second")
}
