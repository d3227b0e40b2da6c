//! `request_id_header` on a listener, through the real binary: a request without an id
//! gets one (32 hex digits) that the instance, the client and the access log all see; a
//! client's usable id is kept, an unusable one replaced (one line reaches the instance);
//! the balancer's own answers (502) carry it too; over HTTP/1.1 and h2c.

mod common;

use anyhow::{Context as _, Result};
use common::*;
use http_body_util::{BodyExt, Empty};

/// GET `url` with `id` (if any) over `client`: (status, the answer's id, what the
/// instance saw under x-request-id, one entry per line).
async fn get(
    client: &HttpClient,
    url: &str,
    id: Option<&str>,
) -> Result<(u16, Option<String>, Vec<String>)> {
    let mut req = hyper::Request::get(url);
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    let resp = tokio::time::timeout(WAIT, client.request(req.body(Empty::new())?)).await??;
    let status = resp.status().as_u16();
    let answered = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
    let seen = body
        .lines()
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .map(str::to_owned)
        .collect();
    Ok((status, answered, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_an_id_to_the_instance_the_client_and_the_log() -> Result<()> {
    let a = Backend::start("a").await?;
    let dead = wharf_tests::free_port()?;
    let lb = Lb::start(&format!(
        r#"
access_log = true
[admin]
bind = "127.0.0.1:@ADMIN@"
[upstream]
connect_timeout = "500ms"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
request_id_header = "X-Request-Id"
  [[listener.route]]
  path_prefix = "/dead"
  service = "dead"
  [[listener.route]]
  service = "web"
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
    for client in [client(), h2c_client()] {
        let url = lb.url("/headers");
        // None sent: one made, the same for the instance and the client.
        let (status, answered, seen) = get(&client, &url, None).await?;
        assert_eq!(status, 200);
        let id = answered.context("no id on the answer")?;
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(seen, std::slice::from_ref(&id));
        assert!(
            lb.log().contains(&format!("request_id={id}")),
            "not in the access log"
        );
        // A usable one is kept; an unusable one replaced (the instance sees one line).
        let (_, answered, seen) = get(&client, &url, Some("trace-42")).await?;
        assert_eq!(
            (answered.as_deref(), seen),
            (Some("trace-42"), vec!["trace-42".to_owned()])
        );
        let (_, answered, seen) = get(&client, &url, Some("has space")).await?;
        let made = answered.context("no id")?;
        assert_ne!(made, "has space");
        assert_eq!(seen, [made]);
        // The balancer's own answer carries it too.
        let (status, answered, _) = get(&client, &lb.url("/dead"), Some("trace-43")).await?;
        assert_eq!((status, answered.as_deref()), (502, Some("trace-43")));
    }
    Ok(())
}
