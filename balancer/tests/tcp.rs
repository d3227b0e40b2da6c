//! `protocol = "tcp"` listeners through the real binary: echo with half-close, weights,
//! connect retries, idle timeout, draining on SIGTERM, metrics, PROXY headers to upstreams.

mod common;
mod l4kit;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::Lb;
use l4kit::{Echo, echo_roundtrip, greeting, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(lb: &Lb) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], lb.port))
}

/// An lb.toml with one tcp listener `echo` (`@PORT@`) to one static instance at `backend`;
/// `top` goes before `[admin]`, `listener` into the `[[listener]]` table.
fn echo_config(backend: SocketAddr, top: &str, listener: &str) -> String {
    format!(
        r#"
{top}
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "echo"
bind = "127.0.0.1:@PORT@"
protocol = "tcp"
service = "echo"
{listener}
[[service]]
name = "echo"
  [[service.endpoint]]
  addr = "{backend}"
"#
    )
}

/// Waits until the balancer closes the silent connection `s` (EOF); how long that took.
async fn idle_close(s: &mut TcpStream) -> Result<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(l4kit::WAIT, s.read(&mut buf)).await??;
    anyhow::ensure!(n == 0, "expected EOF from the idle timeout, got {n} bytes");
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_weights_retries_and_metrics() -> Result<()> {
    let a = Echo::start("a", false).await?;
    let b = Echo::start("b", false).await?;
    let dead = wharf_tests::free_port()?;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[upstream]
retries = 2
[upstream.outlier]
consecutive_failures = 0
[[listener]]
name = "echo"
bind = "127.0.0.1:@PORT@"
protocol = "tcp"
service = "echo"
[[service]]
name = "echo"
algorithm = "round_robin"
  [[service.endpoint]]
  addr = "{}"
  weight = 1
  [[service.endpoint]]
  addr = "{}"
  weight = 3
  [[service.endpoint]]
  addr = "127.0.0.1:{dead}"
  weight = 1
"#,
        a.addr, b.addr
    );
    let lb = Lb::start(&config).await?;

    // A large payload, half-closed by the client: everything comes back, then EOF.
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (_, back) = echo_roundtrip(addr(&lb), &payload).await?;
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");

    // Weights 1:3 (round robin is exact); the dead instance's turns are retried elsewhere
    // and no connection fails.
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..50 {
        let (name, back) = echo_roundtrip(addr(&lb), b"ping").await?;
        assert_eq!(back, b"ping");
        *counts.entry(name).or_default() += 1;
    }
    let (ca, cb) = (counts["a"], counts["b"]);
    assert_eq!(ca + cb, 50, "{counts:?}");
    // Of 5 rounds of (a, b, b, b, dead), dead's turn lands on a or b: a gets 10-20.
    assert!((10..=20).contains(&ca), "{counts:?}");
    assert!(cb >= 30, "{counts:?}");

    let m = lb.metrics().await?;
    assert_eq!(
        metric(&m, "balancer_tcp_connections_total", &["result=\"ok\""]),
        51.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "balancer_upstream_connect_errors_total",
            &["service=\"echo\""]
        ) >= 9.0
    );
    assert!(
        metric(&m, "balancer_tcp_bytes_total", &["direction=\"in\""])
            >= payload.len() as f64 + 200.0
    );
    assert!(
        metric(&m, "balancer_tcp_bytes_total", &["direction=\"out\""])
            >= payload.len() as f64 + 200.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_timeout_and_draining() -> Result<()> {
    let a = Echo::start("a", false).await?;
    let config = echo_config(
        a.addr,
        r#"shutdown_timeout = "20s""#,
        "idle_timeout = \"700ms\"\ndrain_timeout = \"1500ms\"",
    );
    let mut lb = Lb::start(&config).await?;

    // Idle: closed by the balancer after ~700 ms of silence, not before.
    let mut idle = TcpStream::connect(addr(&lb)).await?;
    assert_eq!(greeting(&mut idle).await?, "a");
    let waited = idle_close(&mut idle).await?;
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let m = lb.metrics().await?;
    assert_eq!(
        metric(&m, "balancer_tcp_closed_total", &["idle_timeout"]),
        1.0
    );

    // Draining: a connection kept busy (traffic every 100 ms) goes on after SIGTERM, new
    // connections are refused, and at the drain deadline it is closed and the process exits.
    let mut busy = TcpStream::connect(addr(&lb)).await?;
    assert_eq!(greeting(&mut busy).await?, "a");
    lb.signal(nix::sys::signal::Signal::SIGTERM);
    let sigterm = Instant::now();
    wharf_tests::eventually("new connections refused", l4kit::WAIT, || async {
        TcpStream::connect(addr(&lb)).await.is_err().then_some(())
    })
    .await?;
    let mut echoed_after_sigterm = 0;
    let closed = loop {
        let msg = b"tick";
        if busy.write_all(msg).await.is_err() {
            break sigterm.elapsed();
        }
        let mut got = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(5), busy.read_exact(&mut got)).await {
            Ok(Ok(_)) => {
                assert_eq!(&got, msg);
                echoed_after_sigterm += 1;
            }
            _ => break sigterm.elapsed(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        echoed_after_sigterm >= 5,
        "{echoed_after_sigterm}\n{}",
        lb.log()
    );
    assert!(closed >= Duration::from_millis(1300), "{closed:?}");
    assert!(closed < Duration::from_secs(6), "{closed:?}");
    let code = lb.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(code, Some(0));
    assert!(sigterm.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// SIGHUP changes a kept tcp listener's streaming settings for new connections only: a
/// connection from before keeps its idle timeout, a new one gets the new one. With
/// `bulk_batching` on, a bulk echo still comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_streaming_settings_for_new_connections() -> Result<()> {
    let a = Echo::start("a", false).await?;
    let config = |idle: &str, batching: bool| {
        let listener = format!("idle_timeout = \"{idle}\"\nbulk_batching = {batching}");
        echo_config(a.addr, "", &listener)
    };
    let lb = Lb::start(&config("60s", false)).await?;
    let mut kept = TcpStream::connect(addr(&lb)).await?;
    assert_eq!(greeting(&mut kept).await?, "a");

    lb.write_config(&config("700ms", true))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;

    let mut fresh = TcpStream::connect(addr(&lb)).await?;
    assert_eq!(greeting(&mut fresh).await?, "a");
    let waited = idle_close(&mut fresh).await?;
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
    // Idle for longer than the new timeout, the old connection is still there.
    kept.write_all(b"tick").await?;
    let mut got = [0u8; 4];
    tokio::time::timeout(l4kit::WAIT, kept.read_exact(&mut got)).await??;
    assert_eq!(&got, b"tick");

    let payload: Vec<u8> = (0..6_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let (_, back) = echo_roundtrip(addr(&lb), &payload).await?;
    assert!(back == payload, "echoed bytes differ");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_and_v2_headers_reach_the_backend() -> Result<()> {
    let v1 = Echo::start("v1", true).await?;
    let v2 = Echo::start("v2", true).await?;
    let p2 = wharf_tests::free_port()?;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "one"
bind = "127.0.0.1:@PORT@"
protocol = "tcp"
service = "one"
[[listener]]
name = "two"
bind = "127.0.0.1:{p2}"
protocol = "tcp"
service = "two"
[[service]]
name = "one"
proxy_protocol = "v1"
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "two"
proxy_protocol = "v2"
  [[service.endpoint]]
  addr = "{}"
"#,
        v1.addr, v2.addr
    );
    let lb = Lb::start(&config).await?;
    for (target, echo, prefix) in [
        (addr(&lb), &v1, &b"PROXY TCP4 127.0.0.1 127.0.0.1 "[..]),
        (
            SocketAddr::from(([127, 0, 0, 1], p2)),
            &v2,
            &b"\r\n\r\n\0\r\nQUIT\n\x21\x11"[..],
        ),
    ] {
        let mut s = TcpStream::connect(target).await?;
        let me = s.local_addr()?;
        assert_eq!(greeting(&mut s).await?, echo.name);
        s.write_all(b"after the header").await?;
        let mut got = [0u8; 16];
        s.read_exact(&mut got).await?;
        assert_eq!(&got, b"after the header");
        assert_eq!(echo.proxied.lock().unwrap().as_slice(), &[Some(me)]);
        let head = echo.heads.lock().unwrap()[0].clone();
        assert!(
            head.starts_with(&prefix[..prefix.len().min(head.len())]),
            "{head:?}"
        );
    }
    Ok(())
}
