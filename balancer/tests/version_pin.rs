//! Requests that name their version (`version_header` / `version_cookie` on a route),
//! through the real binary: a version with no share of the split (a dark launch) is
//! reached by the header or the cookie over HTTP/1.1 and HTTP/2, an unknown version is
//! left to the split, and a route without the option ignores both.

mod common;

use anyhow::Result;
use common::*;
use http_body_util::{BodyExt, Empty};

/// The service `web`: `a` is v1 (the whole split), `b` is v2 (deployed, no share). The
/// listener `web` lets requests pin a version; `public`, on `public_port`, does not.
fn config(a: &Backend, b: &Backend, public_port: u16) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
  version_header = "X-Version"
  version_cookie = "version"
[[listener]]
name = "public"
bind = "127.0.0.1:{public_port}"
  [[listener.route]]
  service = "web"
[[service]]
name = "web"
split = {{ v1 = 100 }}
  [[service.endpoint]]
  addr = "{a}"
  version = "v1"
  [[service.endpoint]]
  addr = "{b}"
  version = "v2"
"#,
        a = a.addr,
        b = b.addr,
    )
}

/// Which backend answered each of `n` GETs to `url` sent with `headers`, over `client`.
async fn answers(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let mut req = hyper::Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(WAIT, client.request(req.body(Empty::new())?)).await??;
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes();
        *seen
            .entry(String::from_utf8_lossy(&body).into_owned())
            .or_insert(0) += 1;
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_its_version_reaches_it_even_without_a_share() -> Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let public_port = wharf_tests::free_port()?;
    let lb = Lb::start(&config(&a, &b, public_port)).await?;
    let public = format!("http://127.0.0.1:{public_port}/");
    let h1 = client();
    let h2 = h2c_client();
    let only = |name: &str, n: usize| std::collections::BTreeMap::from([(name.to_owned(), n)]);

    // The split alone: v2 gets nothing.
    assert_eq!(answers(&h1, &lb.url("/"), &[], 50).await?, only("a", 50));
    for client in [&h1, &h2] {
        // The header, in any case, and the cookie among others: v2.
        let pinned = answers(client, &lb.url("/"), &[("x-VERSION", "v2")], 50).await?;
        assert_eq!(pinned, only("b", 50));
        let pinned = answers(client, &lb.url("/"), &[("cookie", "id=7; version=v2")], 50).await?;
        assert_eq!(pinned, only("b", 50));
        // The header wins over the cookie.
        let both = [("cookie", "version=v2"), ("x-version", "v1")];
        assert_eq!(
            answers(client, &lb.url("/"), &both, 50).await?,
            only("a", 50)
        );
        // A version the service does not have: the split decides.
        let unknown = answers(client, &lb.url("/"), &[("x-version", "v9")], 50).await?;
        assert_eq!(unknown, only("a", 50));
        // A route without the option ignores both.
        let ignored = [("x-version", "v2"), ("cookie", "version=v2")];
        assert_eq!(answers(client, &public, &ignored, 50).await?, only("a", 50));
    }
    // `--check` shows the version without a share, and how it can be reached.
    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{out}");
    assert!(
        out.contains("path / -> service web [version named by header x-version, cookie version]:"),
        "{out}"
    );
    let dark = format!("{} version v2 weight 100 (no split share: ", b.addr);
    assert!(
        out.contains(&format!(
            "{dark}only requests naming it (header x-version, cookie version))"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{dark}no requests on this route)")),
        "{out}"
    );
    // Pinned requests count under their version.
    let m = lb.metrics().await?;
    let v2 = sample(
        &m,
        r#"balancer_requests_total{code="2xx",listener="web",service="web",version="v2"}"#,
    );
    assert_eq!(v2, Some(200.0), "{m}");
    Ok(())
}

#[test]
fn a_bad_version_header_name_is_named_with_its_line() -> Result<()> {
    common::route_option_refused("  version_header = \"X Version\"", "version_header")
}
