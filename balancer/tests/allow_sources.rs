//! `allow_sources`, through the real binary: on a route, requests from other clients get
//! 403 (over HTTP/1.1 and h2c; behind a trusted front balancer, the client its PROXY
//! header announces is the one checked); on a listener, connections from other clients are
//! closed at once and counted, and a SIGHUP changes the list for the next connections;
//! `--check` names a malformed entry and lists a route's networks.

mod common;
mod l4kit;

use std::net::SocketAddr;

use anyhow::Result;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn http_config(backend: &Backend) -> String {
    http_config_at(backend.addr)
}

fn http_config_at(backend: SocketAddr) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [listener.proxy_protocol]
  trusted = ["10.9.9.9"]
  [[listener.route]]
  path_prefix = "/internal/"
  service = "web"
  allow_sources = ["10.0.0.0/8", "192.0.2.0/24"]
  [[listener.route]]
  service = "web"
  allow_sources = ["127.0.0.1", "::1"]
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{backend}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_answers_403_to_clients_outside_its_networks() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&http_config(&a)).await?;
    for client in [&client(), &h2c_client()] {
        let (code, _) = get_with(client, &lb.url("/internal/x")).await?;
        assert_eq!(code.as_u16(), 403);
        let (code, body) = get_with(client, &lb.url("/x")).await?;
        assert_eq!((code.as_u16(), body.as_str()), (200, "a"));
    }
    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("path /internal/ -> service web [clients from 10.0.0.0/8, 192.0.2.0/24 only]"),
        "{out}"
    );
    Ok(())
}

/// Behind a front balancer whose PROXY headers are trusted, the announced client is the
/// one a route checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_a_trusted_proxy_header_announces_is_checked() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&http_config(&a).replace("10.9.9.9", "127.0.0.1")).await?;
    for (client, want) in [("192.0.2.7:4000", "200"), ("198.51.100.1:4000", "403")] {
        let back = get_via_proxy_header(lb.port, client, "/internal/x").await?;
        assert!(
            back.starts_with(&format!("HTTP/1.1 {want}")),
            "{client}: {back}"
        );
    }
    Ok(())
}

fn tcp_config(echo: SocketAddr, allow: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "db"
bind = "127.0.0.1:@PORT@"
protocol = "tcp"
service = "echo"
allow_sources = [{allow}]
[[service]]
name = "echo"
  [[service.endpoint]]
  addr = "{echo}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_closes_connections_from_outside_its_networks() -> Result<()> {
    let echo = l4kit::Echo::start("e1", false).await?;
    let lb = Lb::start(&tcp_config(echo.addr, r#""10.0.0.0/8""#)).await?;
    let addr: SocketAddr = format!("127.0.0.1:{}", lb.port).parse()?;
    // Closed before the instance is reached: no greeting, no echo.
    let mut s = TcpStream::connect(addr).await?;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut back)).await?;
    assert!(back.is_empty(), "{:?}", String::from_utf8_lossy(&back));
    assert_eq!(echo.accepted(), 0);
    let m = lb.metrics().await?;
    assert_eq!(
        l4kit::metric(&m, "balancer_listener_refused_total", &[r#"listener="db""#]),
        1.0
    );

    // A SIGHUP that lets loopback in applies to the next connection.
    lb.write_config(&tcp_config(echo.addr, r#""10.0.0.0/8", "127.0.0.0/8""#))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    let (name, back) = l4kit::echo_roundtrip(addr, b"ping").await?;
    assert_eq!((name.as_str(), &back[..]), ("e1", &b"ping"[..]));
    Ok(())
}

#[test]
fn check_names_a_malformed_network() -> Result<()> {
    let text = tcp_config("127.0.0.1:1".parse()?, r#""10.0.0.0/8", "10.0.0.0/33""#);
    let err = check_refuses(&text)?;
    assert!(
        err.contains("lb.toml:9") && err.contains("listener[0].allow_sources[1]"),
        "{err}"
    );
    // On a route: the entry's own line.
    let text = http_config_at("127.0.0.1:1".parse()?).replace("10.0.0.0/8", "example.com");
    let err = check_refuses(&text)?;
    assert!(
        err.contains("lb.toml:12") && err.contains("listener[0].route[0].allow_sources[0]"),
        "{err}"
    );
    Ok(())
}
