//! Accepting PROXY protocol headers on an http listener: required from trusted sources
//! (the announced client reaches X-Forwarded-For), rejected from untrusted ones.

mod common;
mod l4kit;

use std::net::SocketAddr;

use anyhow::Result;
use balancer::proxy_protocol::{encode_v1, encode_v2};
use common::{Backend, Lb};
use l4kit::metric;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Sends `prefix` + a GET, returns everything the balancer answered before closing.
async fn exchange(port: u16, prefix: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut out = prefix.to_vec();
    out.extend_from_slice(GET);
    s.write_all(&out).await?;
    let mut back = Vec::new();
    // A rejected connection may be reset instead of closed: both end with no answer.
    let _ = tokio::time::timeout(l4kit::WAIT, s.read_to_end(&mut back)).await?;
    Ok(String::from_utf8_lossy(&back).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_from_trusted_sources_only() -> Result<()> {
    let backend = Backend::start("web").await?;
    let other = wharf_tests::free_port()?;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "front"
bind = "127.0.0.1:@PORT@"
  [listener.proxy_protocol]
  trusted = ["127.0.0.0/8"]
  [[listener.route]]
  service = "web"
[[listener]]
name = "other"
bind = "127.0.0.1:{other}"
  [listener.proxy_protocol]
  trusted = ["10.0.0.0/8"]
  [[listener.route]]
  service = "web"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
"#,
        backend.addr
    );
    let lb = Lb::start(&config).await?;
    let dst: SocketAddr = format!("127.0.0.1:{}", lb.port).parse()?;

    let v1 = exchange(lb.port, &encode_v1("203.0.113.7:5555".parse()?, dst)).await?;
    assert!(v1.starts_with("HTTP/1.1 200"), "{v1}");
    assert!(v1.contains("x-forwarded-for: 203.0.113.7\n"), "{v1}");
    let v2 = exchange(
        lb.port,
        &encode_v2("[2001:db8::9]:1234".parse()?, "[::1]:80".parse()?),
    )
    .await?;
    assert!(v2.contains("x-forwarded-for: 2001:db8::9\n"), "{v2}");
    // Trusted source without a header: refused.
    let none = exchange(lb.port, b"").await?;
    assert!(none.is_empty(), "{none}");

    // Untrusted source: a header is refused, plain HTTP works with the socket's address.
    let forged = exchange(other, &encode_v1("203.0.113.7:5555".parse()?, dst)).await?;
    assert!(forged.is_empty(), "{forged}");
    let plain = exchange(other, b"").await?;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(plain.contains("x-forwarded-for: 127.0.0.1\n"), "{plain}");

    let m = lb.metrics().await?;
    assert_eq!(
        metric(
            &m,
            "balancer_proxy_protocol_rejected_total",
            &["front", "missing"]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "balancer_proxy_protocol_rejected_total",
            &["other", "untrusted"]
        ),
        1.0
    );
    Ok(())
}
