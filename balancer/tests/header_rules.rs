//! A route's header rules (`[listener.route.request_headers]` and `response_headers`,
//! `set` and `remove`), through the real binary over HTTP/1.1 and h2c: the instance gets
//! the set lines in place of the client's (a rewritten `Host` included, the original in
//! `X-Forwarded-Host`) and none of the removed ones; the client gets the answer with the
//! response rules applied, and so do the balancer's own answers on the route (a 502);
//! `--check` refuses a rule on a header the balancer writes.

mod common;

use anyhow::Result;
use common::*;
use http_body_util::{BodyExt, Empty};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_set_and_remove_lines_both_ways() -> Result<()> {
    let a = Backend::start("a").await?;
    let dead = wharf_tests::free_port()?;
    let lb = Lb::start(&format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[upstream]
connect_timeout = "500ms"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/dead"
  service = "dead"
  [listener.route.response_headers]
  set = {{ "Strict-Transport-Security" = "max-age=63072000" }}
  [[listener.route]]
  service = "web"
  [listener.route.request_headers]
  set = {{ "X-Env" = "prod", "Host" = "internal.test" }}
  remove = ["X-Debug"]
  [listener.route.response_headers]
  set = {{ "Strict-Transport-Security" = "max-age=63072000" }}
  remove = ["X-Backend"]
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "dead"
  [[service.endpoint]]
  addr = "127.0.0.1:{dead}"
"#,
        a.addr
    ))
    .await?;
    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("-> service web [request header rules, response header rules]:"),
        "{out}"
    );
    for client in [client(), h2c_client()] {
        // The balancer's own answer on a route with rules carries them too.
        let resp = tokio::time::timeout(WAIT, client.get(lb.url("/dead").parse()?)).await??;
        assert_eq!(resp.status(), 502);
        assert_eq!(
            resp.headers()["strict-transport-security"],
            "max-age=63072000"
        );
        let req = hyper::Request::get(lb.url("/headers"))
            .header("host", "public.test")
            .header("x-debug", "1")
            .header("x-env", "forged")
            .body(Empty::new())?;
        let resp = tokio::time::timeout(WAIT, client.request(req)).await??;
        assert_eq!(resp.status(), 200);
        let h = resp.headers().clone();
        assert_eq!(h["strict-transport-security"], "max-age=63072000");
        assert!(h.get("x-backend").is_none(), "{h:?}");
        let seen = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
        let lines: Vec<&str> = seen.lines().collect();
        for want in [
            "x-env: prod",
            "host: internal.test",
            "x-forwarded-host: public.test",
        ] {
            assert!(lines.contains(&want), "{want:?} missing from\n{seen}");
        }
        for gone in ["x-debug", "forged"] {
            assert!(
                !seen.contains(gone),
                "{gone:?} reached the instance:\n{seen}"
            );
        }
        let hosts = lines.iter().filter(|l| l.starts_with("host: ")).count();
        assert_eq!(hosts, 1, "{seen}");
    }
    Ok(())
}

#[test]
fn a_rule_on_a_header_the_balancer_writes_is_refused() -> Result<()> {
    common::route_option_refused(
        "  [listener.route.response_headers]\n  set = { \"Content-Length\" = \"0\" }",
        "response_headers.set",
    )
}
