//! Sticky sessions (`sticky_cookie` on a route), through the real binary: the first answer
//! sets a cookie, requests carrying it stay on that instance (HTTP/1.1 and h2c) and get no
//! new cookie; an unknown value is answered as usual with a cookie; when the instance dies
//! the client moves to another one without a failed request and learns its cookie; a
//! route without the option sets nothing.

mod common;

use anyhow::{Context as _, Result};
use common::*;
use http_body_util::{BodyExt, Empty};

fn config(backends: &[&Backend], plain_port: u16) -> String {
    let eps: String = backends
        .iter()
        .map(|b| format!("  [[service.endpoint]]\n  addr = \"{}\"\n", b.addr))
        .collect();
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[upstream]
connect_timeout = "500ms"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
  sticky_cookie = "srv"
  sticky_max_age = "1h"
[[listener]]
name = "plain"
bind = "127.0.0.1:{plain_port}"
  [[listener.route]]
  service = "web"
[[service]]
name = "web"
algorithm = "round_robin"
{eps}"#
    )
}

/// One GET with `cookie` (if any): the backend that answered and the `srv` cookie set.
async fn get(
    client: &HttpClient,
    url: &str,
    cookie: Option<&str>,
) -> Result<(String, Option<String>)> {
    let mut req = hyper::Request::get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", format!("theme=dark; {c}"));
    }
    let resp = tokio::time::timeout(WAIT, client.request(req.body(Empty::new())?)).await??;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let set = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("srv="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((String::from_utf8_lossy(&body).into_owned(), set))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stays_on_its_instance_until_it_is_gone() -> Result<()> {
    let backends = [
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    ];
    let plain_port = wharf_tests::free_port()?;
    let lb = Lb::start(&config(&backends.iter().collect::<Vec<_>>(), plain_port)).await?;
    let url = lb.url("/");
    let h1 = client();
    let h2 = h2c_client();

    let (first, cookie) = get(&h1, &url, None).await?;
    let cookie = cookie.context("no sticky cookie on the first answer")?;
    let resp = tokio::time::timeout(WAIT, h1.get(url.parse()?)).await??;
    let set = resp.headers()["set-cookie"].to_str()?.to_owned();
    assert!(
        set.starts_with("srv=") && set.contains("; HttpOnly; SameSite=Lax; Max-Age=3600"),
        "{set}"
    );
    for client in [&h1, &h2] {
        for _ in 0..20 {
            // Round robin would have moved on; the cookie keeps the instance.
            assert_eq!(
                get(client, &url, Some(&cookie)).await?,
                (first.clone(), None)
            );
        }
    }
    // A value naming no instance: answered as usual, with a cookie.
    let (_, set) = get(&h1, &url, Some("srv=0123456789abcdef")).await?;
    assert!(set.is_some());
    // Without the option: no cookie, and round robin reaches every backend.
    let plain = format!("http://127.0.0.1:{plain_port}/");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (who, set) = get(&h1, &plain, Some(&cookie)).await?;
        assert_eq!(set, None);
        seen.insert(who);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("-> service web [sticky by cookie srv]:"),
        "{out}"
    );

    // The instance dies: the client moves (no failed request) and learns the new one.
    let dead = backends.iter().find(|b| b.name == first).context("first")?;
    dead.kill();
    let (moved, set) = get(&h1, &url, Some(&cookie)).await?;
    assert_ne!(moved, first);
    let new_cookie = set.context("no cookie after the move")?;
    assert_ne!(new_cookie, cookie);
    for _ in 0..10 {
        assert_eq!(
            get(&h1, &url, Some(&new_cookie)).await?,
            (moved.clone(), None)
        );
    }
    Ok(())
}

#[test]
fn a_max_age_without_a_cookie_is_refused() -> Result<()> {
    common::route_option_refused("  sticky_max_age = \"1h\"", "sticky_max_age")
}

#[test]
fn a_bad_cookie_name_is_named_with_its_line() -> Result<()> {
    common::route_option_refused("  sticky_cookie = \"srv id\"", "sticky_cookie")
}
