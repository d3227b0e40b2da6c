//! `response_timeout` on a route, through the real binary: an answer slower than the
//! route's timeout is a 504 there, while the same request on a route without it (the
//! listener's 5 s) is answered.

mod common;

use std::io::{Read, Write};

use anyhow::Result;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_overrides_the_listeners() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
response_timeout = "5s"
  [[listener.route]]
  host = "hasty.test"
  service = "web"
  response_timeout = "200ms"
  [[listener.route]]
  service = "web"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
"#,
        a.addr
    ))
    .await?;
    let port = lb.port;
    let status = move |host: &'static str| -> Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        write!(
            s,
            "GET /slow/1000 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.lines().next().unwrap_or_default().to_owned())
    };
    let (hasty, patient) = tokio::task::spawn_blocking(move || -> Result<(String, String)> {
        Ok((status("hasty.test")?, status("other.test")?))
    })
    .await??;
    assert_eq!(hasty, "HTTP/1.1 504 Gateway Timeout");
    assert_eq!(patient, "HTTP/1.1 200 OK");
    Ok(())
}
