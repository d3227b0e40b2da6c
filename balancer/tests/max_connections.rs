//! `max_connections` on a listener, through the real binary: at the limit a new connection
//! waits in the listen backlog (not refused) and is served once an open one closes; the
//! pause is counted; a SIGHUP that lifts the limit lets a waiting connection in.

mod common;
mod l4kit;

use std::io::{BufReader, Write};
use std::net::TcpStream;

use anyhow::Result;
use common::*;

/// A keep-alive connection that sent one GET; its reader.
fn send_get(port: u16) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(WAIT))?;
    let mut w = s.try_clone()?;
    w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    Ok((w, BufReader::new(s)))
}

async fn metric_reaches(lb: &Lb, series: &str, at_least: f64) -> Result<()> {
    wharf_tests::eventually(&format!("{series} >= {at_least}"), WAIT, || async {
        let m = lb.metrics().await.ok()?;
        (sample(&m, series)? >= at_least).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_new_connections_wait_until_one_closes() -> Result<()> {
    let a = Backend::start("a").await?;
    let config = |limit: &str| {
        format!(
            "[admin]\nbind = \"127.0.0.1:@ADMIN@\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:@PORT@\"\n{limit}\n  [[listener.route]]\n  service = \"web\"\n[[service]]\nname = \"web\"\n  [[service.endpoint]]\n  addr = \"{}\"\n",
            a.addr
        )
    };
    let lb = Lb::start(&config("max_connections = 2")).await?;
    let port = lb.port;
    let full = r#"balancer_listener_full_total{listener="web"}"#;

    // Two connections served and left open: the listener is full.
    let (one, mut one_r) = send_get(port)?;
    assert_eq!(read_response(&mut one_r)?.0, 200);
    let (_two, mut two_r) = send_get(port)?;
    assert_eq!(read_response(&mut two_r)?.0, 200);
    // A third connects (the kernel's backlog) and sends its request; it is not accepted.
    let (_three, three_r) = send_get(port)?;
    metric_reaches(&lb, full, 1.0).await?;
    let m = lb.metrics().await?;
    assert_eq!(
        sample(&m, r#"balancer_active_connections{listener="web"}"#),
        Some(2.0),
        "{m}"
    );
    // The first closes: the third is accepted and answered.
    drop((one, one_r));
    let mut three_r = three_r;
    let answered = tokio::task::spawn_blocking(move || read_response(&mut three_r).map(|r| r.0));
    assert_eq!(answered.await??, 200);

    // Full again with a fourth waiting; a SIGHUP that lifts the limit lets it in.
    let (_four, mut four_r) = send_get(port)?;
    metric_reaches(&lb, full, 2.0).await?;
    lb.write_config(&config(""))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    let answered = tokio::task::spawn_blocking(move || read_response(&mut four_r).map(|r| r.0));
    assert_eq!(answered.await??, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_waits_at_its_limit_too() -> Result<()> {
    let echo = l4kit::Echo::start("echo", false).await?;
    let lb = Lb::start(&format!(
        "[admin]\nbind = \"127.0.0.1:@ADMIN@\"\n[[listener]]\nname = \"raw\"\nbind = \"127.0.0.1:@PORT@\"\nprotocol = \"tcp\"\nservice = \"echo\"\nmax_connections = 1\n[[service]]\nname = \"echo\"\n  [[service.endpoint]]\n  addr = \"{}\"\n",
        echo.addr
    ))
    .await?;
    let addr = ("127.0.0.1", lb.port);
    let mut first = tokio::net::TcpStream::connect(addr).await?;
    assert_eq!(l4kit::greeting(&mut first).await?, "echo");
    // The second waits in the backlog: the limit is met, and the echo server saw one.
    let mut second = tokio::net::TcpStream::connect(addr).await?;
    metric_reaches(&lb, r#"balancer_listener_full_total{listener="raw"}"#, 1.0).await?;
    assert_eq!(echo.accepted(), 1);
    drop(first);
    assert_eq!(l4kit::greeting(&mut second).await?, "echo");
    Ok(())
}

#[test]
fn zero_is_refused() -> Result<()> {
    let err = common::check_refuses(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\nmax_connections = 0\n",
    )?;
    assert!(err.contains("listener[0].max_connections"), "{err}");
    Ok(())
}
