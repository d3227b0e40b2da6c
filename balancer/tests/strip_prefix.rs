//! `strip_prefix = true` on a route, through the real binary: the instance gets the path
//! without the route's prefix (query kept, over HTTP/1.1 and h2c, upgrades included) and
//! the prefix in `X-Forwarded-Prefix` in place of the client's; a route without it
//! forwards the path as it came.

mod common;

use std::io::{Read, Write};

use anyhow::Result;
use common::*;

fn config(backend: &Backend) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/api/"
  service = "web"
  strip_prefix = true
  [[listener.route]]
  path_prefix = "/raw/"
  service = "web"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
"#,
        backend.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripped_prefix_leaves_the_path_and_is_forwarded_in_a_header() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&config(&a)).await?;
    let h2 = h2c_client();
    for client in [&client(), &h2] {
        // The backend's /mirror answers with the request line it received.
        let (code, body) = get_with(client, &lb.url("/api/mirror?x=1&y=/api/")).await?;
        assert_eq!(
            (code.as_u16(), body.as_str()),
            (200, "GET /mirror?x=1&y=/api/\n")
        );
        // A route without the option: the path as it came (the backend's catch-all).
        let (code, body) = get_with(client, &lb.url("/raw/mirror")).await?;
        assert_eq!((code.as_u16(), body.as_str()), (200, "a"));
    }

    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("path /api/ -> service web [prefix stripped]:"),
        "{out}"
    );
    assert!(out.contains("path /raw/ -> service web:"), "{out}");

    // X-Forwarded-Prefix: the route's prefix, the client's own dropped.
    let port = lb.port;
    let head = tokio::task::spawn_blocking(move || -> Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        s.write_all(
            b"GET /api/headers HTTP/1.1\r\nHost: x\r\nX-Forwarded-Prefix: /forged\r\nConnection: close\r\n\r\n",
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .await??;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("x-forwarded-prefix: /api\n"), "{head}");
    assert!(!head.contains("/forged"), "{head}");

    // An upgrade through the stripping route reaches the backend's /upgrade.
    let (_, tunnel) =
        tokio::task::spawn_blocking(move || upgrade_echo(port, "/api/upgrade", b"ping")).await??;
    assert_eq!(tunnel, b"ping");
    Ok(())
}
