//! `redirect_https = true` on a listener, through the real binary: GET/HEAD get 301 and
//! other methods 308 to the same host and target over HTTPS (the configured port written
//! when not 443), over HTTP/1.1 (the connection kept; closed after an unread body) and h2c; a
//! host that is not a name gets 400; `--check` refuses a redirecting listener with routes.

mod common;

use std::io::{BufReader, Read, Write};

use anyhow::Result;
use common::*;

fn location(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(n, _)| n == "location")
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_sent_to_https() -> Result<()> {
    let alt = wharf_tests::free_port()?;
    let lb = Lb::start(&format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
redirect_https = true
[[listener]]
name = "alt"
bind = "127.0.0.1:{alt}"
redirect_https = true
redirect_https_port = 8443
"#
    ))
    .await?;
    let port = lb.port;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        // One keep-alive connection, answered in turn.
        w.write_all(b"GET /a/b?c=1 HTTP/1.1\r\nHost: example.test:8080\r\n\r\n")?;
        let (status, h) = read_response(&mut r)?;
        assert_eq!(
            (status, location(&h)),
            (301, Some("https://example.test/a/b?c=1"))
        );
        w.write_all(b"HEAD / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")?;
        let (status, h) = read_response(&mut r)?;
        assert_eq!((status, location(&h)), (301, Some("https://[::1]/")));
        // A host that could not be put in a Location.
        w.write_all(b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n")?;
        assert_eq!(read_response(&mut r)?.0, 400);

        // Other methods: 308. The body is not read, so the connection closes after.
        let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        w.write_all(
            b"POST /form HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello",
        )?;
        let (status, h) = read_response(&mut r)?;
        assert_eq!(
            (status, location(&h)),
            (308, Some("https://example.test/form"))
        );
        assert!(h.contains(&("connection".into(), "close".into())), "{h:?}");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)?;
        assert!(rest.is_empty(), "{rest:?}");
        Ok(())
    })
    .await??;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let s = std::net::TcpStream::connect(("127.0.0.1", alt))?;
        s.set_read_timeout(Some(WAIT))?;
        let mut w = s.try_clone()?;
        w.write_all(b"GET /x HTTP/1.1\r\nHost: example.test\r\n\r\n")?;
        let (status, h) = read_response(&mut BufReader::new(s))?;
        assert_eq!(
            (status, location(&h)),
            (301, Some("https://example.test:8443/x"))
        );
        Ok(())
    })
    .await??;

    // h2c: the authority is the host.
    let h2 = h2c_client();
    let resp = tokio::time::timeout(WAIT, h2.get(lb.url("/h2?x").parse()?)).await??;
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "https://127.0.0.1/h2?x");

    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("listener alt: every request redirected to https (port 8443)"),
        "{out}"
    );

    let m = lb.metrics().await?;
    assert!(
        m.lines().any(
            |l| l.starts_with("balancer_requests_total{code=\"3xx\",listener=\"web\"")
                && l.ends_with(" 4")
        ),
        "{m}"
    );
    Ok(())
}

#[test]
fn a_redirecting_listener_with_routes_is_refused() -> Result<()> {
    let err = common::check_refuses(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\nredirect_https = true\n  [[listener.route]]\n  service = \"web\"\n[[service]]\nname = \"web\"\n  [[service.endpoint]]\n  addr = \"127.0.0.1:2\"\n",
    )?;
    assert!(
        err.contains("lb.toml:2") && err.contains("listener[0].redirect_https"),
        "{err}"
    );
    Ok(())
}
