//! The real balancer binary with static services (no etcd): proxying, weights, split,
//! resilience, malformed input, upgrades, reloads, shutdown and metrics.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use common::*;
use nix::sys::signal::Signal;

fn endpoints(backends: &[(&Backend, u32, &str)]) -> String {
    backends
        .iter()
        .map(|(b, w, v)| {
            format!(
                "  [[service.endpoint]]\n  addr = \"{}\"\n  weight = {w}\n  version = \"{v}\"\n",
                b.addr
            )
        })
        .collect()
}

fn config(service_extra: &str, eps: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"

[upstream]
connect_timeout = "500ms"

[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
max_body_bytes = 1000
  [[listener.route]]
  path_prefix = "/"
  service = "web"

[[service]]
name = "web"
{service_extra}
{eps}
"#
    )
}

fn share(counts: &std::collections::HashMap<String, u64>, name: &str, n: usize) -> f64 {
    counts.get(name).copied().unwrap_or(0) as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_1_2_7_hold_within_3_percent() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    );
    let lb = Lb::start(&config(
        "",
        &endpoints(&[(&a, 1, "v1"), (&b, 2, "v1"), (&c, 7, "v1")]),
    ))
    .await?;
    let n = 20_000;
    let counts = spread(&lb.url("/"), n, 16).await?;
    for (name, want) in [("a", 0.1), ("b", 0.2), ("c", 0.7)] {
        let got = share(&counts, name, n);
        assert!(
            (got - want).abs() <= 0.03,
            "{name}: {got} vs {want} ({counts:?})"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_split_90_10_holds_within_2_percent() -> Result<()> {
    let (a, b, c) = (
        Backend::start("old1").await?,
        Backend::start("old2").await?,
        Backend::start("new").await?,
    );
    let lb = Lb::start(&config(
        "split = { v1 = 90, v2 = 10 }\nalgorithm = \"round_robin\"",
        &endpoints(&[(&a, 100, "v1"), (&b, 100, "v1"), (&c, 100, "v2")]),
    ))
    .await?;
    let n = 20_000;
    let counts = spread(&lb.url("/"), n, 16).await?;
    let new = share(&counts, "new", n);
    assert!((new - 0.10).abs() <= 0.02, "v2 share {new} ({counts:?})");
    let metrics = lb.metrics().await?;
    let v2 = sample(
        &metrics,
        r#"balancer_requests_total{code="2xx",listener="web",service="web",version="v2"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(v2 as u64, counts["new"], "per-version metric counts v2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_load_fails_no_get() -> Result<()> {
    let (a, b, c) = (
        Backend::start("a").await?,
        Backend::start("b").await?,
        Backend::start("c").await?,
    );
    let lb = Lb::start(&config(
        "",
        &endpoints(&[(&a, 1, "v1"), (&b, 1, "v1"), (&c, 1, "v1")]),
    ))
    .await?;
    let load = Load::start(lb.url("/slow/5"), 12);
    wharf_tests::eventually("traffic on b", WAIT, || async {
        (load.stats.count("b") > 50).then_some(())
    })
    .await?;
    b.kill();
    let at_kill = load.stats.ok.load(Ordering::Relaxed);
    wharf_tests::eventually("load continues after the kill", WAIT, || async {
        (load.stats.ok.load(Ordering::Relaxed) > at_kill + 1000).then_some(())
    })
    .await?;
    let stats = load.stop().await;
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "failures: {:?}",
        &stats.errors.lock().unwrap()[..]
    );
    let m = lb.metrics().await?;
    assert!(m.contains("balancer_upstream_connect_errors_total{service=\"web\"}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_502_503_504_and_headers_are_rewritten() -> Result<()> {
    let a = Backend::start("a").await?;
    let dead = wharf_tests::free_port()?;
    let text = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[upstream]
response_timeout = "300ms"
retries = 1
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/dead"
  service = "dead"
  [[listener.route]]
  path_prefix = "/none"
  service = "none"
  [[listener.route]]
  host = "*.example.com"
  service = "web"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "dead"
  [[service.endpoint]]
  addr = "127.0.0.1:{dead}"
[[service]]
name = "none"
  [[service.endpoint]]
  addr = "{}"
  weight = 0
"#,
        a.addr, a.addr
    );
    let lb = Lb::start(&text).await?;
    let client = client();
    assert_eq!(get_with(&client, &lb.url("/dead")).await?.0, 502);
    assert_eq!(get_with(&client, &lb.url("/none")).await?.0, 503);
    // No host route matches 127.0.0.1.
    assert_eq!(get_with(&client, &lb.url("/")).await?.0, 404);

    let raw = |req: String| -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", lb.port))?;
        s.set_read_timeout(Some(WAIT))?;
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        Ok(out)
    };
    let out =
        raw("GET /slow/2000 HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n".into())?;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    let out = raw(
        "GET /headers HTTP/1.1\r\nHost: a.example.com:8080\r\nConnection: close, x-secret\r\n\
         X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
            .into(),
    )?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.to_ascii_lowercase();
    assert!(
        body.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1"),
        "{out}"
    );
    assert!(body.contains("x-forwarded-proto: http"), "{out}");
    assert!(
        body.contains("x-forwarded-host: a.example.com:8080"),
        "{out}"
    );
    assert!(!body.contains("x-secret"), "{out}");
    assert!(!body.contains("keep-alive: timeout"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_false_passes_the_clients_headers_unchanged() -> Result<()> {
    let a = Backend::start("a").await?;
    let text = config("", &endpoints(&[(&a, 1, "v1")]))
        .replace("max_body_bytes = 1000", "forwarded_headers = false");
    let lb = Lb::start(&text).await?;
    let (out, _) = raw_exchange(
        lb.port,
        b"GET /headers HTTP/1.1\r\nHost: a.example.com\r\nX-Forwarded-For: 10.0.0.1\r\n\
          Connection: close\r\n\r\n",
    )?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.to_ascii_lowercase();
    assert!(body.contains("x-forwarded-for: 10.0.0.1\n"), "{out}");
    assert!(!body.contains("x-forwarded-proto"), "{out}");
    assert!(!body.contains("x-forwarded-host"), "{out}");
    Ok(())
}

/// Sends raw bytes and returns what came back before the balancer closed the connection.
fn raw_exchange(port: u16, bytes: &[u8]) -> Result<(String, bool)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(bytes)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    Ok((String::from_utf8_lossy(&out).into_owned(), closed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_smuggling_and_oversized_requests_get_4xx_and_close() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&config("", &endpoints(&[(&a, 1, "v1")]))).await?;
    let port = lb.port;
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    );
    // TE + CL together (the classic smuggling shape): refused with 400 before anything
    // reaches a backend, and the connection closed, so the smuggled request never runs.
    let smuggle = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let (out, closed) = tokio::task::spawn_blocking(move || raw_exchange(port, &smuggle)).await??;
    assert!(out.starts_with("HTTP/1.1 400"), "TE+CL: {out}");
    assert!(closed, "TE+CL: connection left open: {out}");
    assert_eq!(
        out.matches("HTTP/1.1").count(),
        1,
        "smuggled request answered: {out}"
    );
    // Checked first, while nothing else has reached the backend (refused bodies of the
    // cases below may reach it late).
    assert_eq!(
        a.hits.load(Ordering::Relaxed),
        0,
        "TE+CL reached the backend"
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage request line", b"HELLO\r\n\r\n".to_vec(), "400"),
        (
            "conflicting content-lengths",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
            "400",
        ),
        (
            "transfer-encoding not ending in chunked",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc".to_vec(),
            "400",
        ),
        (
            "invalid chunk size",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        ("oversized header", big_header.into_bytes(), "431"),
        (
            "declared body over the limit",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_vec(),
            "413",
        ),
        (
            "chunked body over the limit",
            format!(
                "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
                "b".repeat(0x800)
            )
            .into_bytes(),
            "413",
        ),
    ];
    for (what, bytes, code) in cases {
        let (out, closed) =
            tokio::task::spawn_blocking(move || raw_exchange(port, &bytes)).await??;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {code}")),
            "{what}: expected {code}, got {out:?}"
        );
        assert!(closed, "{what}: connection left open");
    }
    // A good request still works, body streamed through.
    let ok =
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            .to_vec();
    let (out, _) = tokio::task::spawn_blocking(move || raw_exchange(port, &ok)).await??;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("5"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_h2c_pass_through() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&config("", &endpoints(&[(&a, 1, "v1")]))).await?;
    let port = lb.port;
    let (head, back) = tokio::task::spawn_blocking(move || {
        upgrade_echo(port, "/upgrade", b"ping through the tunnel")
    })
    .await??;
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    assert_eq!(&back, b"ping through the tunnel");

    // HTTP/2 with prior knowledge, forwarded as HTTP/1.1.
    let h2 = h2c_client();
    let (code, body) = get_with(&h2, &lb.url("/headers")).await?;
    assert_eq!(code, 200);
    assert!(body.contains(&format!("host: 127.0.0.1:{port}")), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_file_and_keeps_serving_on_a_bad_one() -> Result<()> {
    let (a, b) = (Backend::start("a").await?, Backend::start("b").await?);
    let with_log = |eps: String| format!("access_log = true\n{}", config("", &eps));
    let lb = Lb::start(&with_log(endpoints(&[(&a, 1, "v1")]))).await?;
    let client = client();
    assert_eq!(get_with(&client, &lb.url("/")).await?.1, "a");
    let log = lb.log();
    let access = log
        .lines()
        .find(|l| l.contains("access"))
        .unwrap_or_default();
    // Which instance answered, as in the tcp listeners' access log.
    assert!(
        access.contains("instance=") && access.contains(&format!("upstream={}", a.addr)),
        "access log line missing or without the instance: {log}"
    );

    lb.write_config("[[listener]\nthis is not toml")?;
    lb.signal(Signal::SIGHUP);
    wharf_tests::eventually("reload error metric", WAIT, || async {
        let m = lb.metrics().await.ok()?;
        (sample(&m, r#"balancer_config_reloads_total{result="error"}"#) == Some(1.0)).then_some(())
    })
    .await?;
    assert_eq!(
        get_with(&client, &lb.url("/")).await?.1,
        "a",
        "old config serves"
    );
    assert!(lb.log().contains("reload failed"), "{}", lb.log());

    lb.write_config(&with_log(endpoints(&[(&b, 1, "v1")])))?;
    lb.signal(Signal::SIGHUP);
    wharf_tests::eventually("new backend after reload", WAIT, || async {
        (get_with(&client, &lb.url("/")).await.ok()?.1 == "b").then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits() -> Result<()> {
    let a = Backend::start("a").await?;
    let mut lb = Lb::start(&config("", &endpoints(&[(&a, 1, "v1")]))).await?;
    let client = client();
    let url = lb.url("/slow/800");
    let slow = tokio::spawn({
        let client = client.clone();
        async move { get_with(&client, &url).await }
    });
    wharf_tests::eventually("request in flight", WAIT, || async {
        (a.hits.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await?;
    lb.signal(Signal::SIGTERM);
    let (code, body) = slow.await??;
    assert_eq!((code.as_u16(), body.as_str()), (200, "a"));
    assert_eq!(lb.wait_exit(WAIT).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text_parses_and_healthz_answers() -> Result<()> {
    let a = Backend::start("a").await?;
    let lb = Lb::start(&config("", &endpoints(&[(&a, 1, "v1")]))).await?;
    spread(&lb.url("/"), 10, 2).await?;
    let text = lb.metrics().await?;
    assert!(check_prometheus_text(&text)? > 10);
    for name in [
        "balancer_requests_total",
        "balancer_request_duration_seconds_bucket",
        "balancer_active_connections",
        "balancer_backends",
        "balancer_backend_up",
        "balancer_routing_table_swaps_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"balancer_requests_total{code="2xx",listener="web",service="web",version="v1"}"#
        ),
        Some(10.0)
    );
    let (code, body) =
        get_with(&client(), &format!("http://127.0.0.1:{}/healthz", lb.admin)).await?;
    assert_eq!((code.as_u16(), body.as_str()), (200, "ok\n"));
    Ok(())
}

#[test]
fn check_flag_rejects_a_bad_file_with_file_line_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lb.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nbind = \"not an address\"\n",
    )?;
    let out = common::check(&path)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("bind"), "{err}");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\n[[listener.route]]\nservice = \"web\"\n[[service]]\nname = \"web\"\n[[service.endpoint]]\naddr = \"127.0.0.1:2\"\n",
    )?;
    let out = common::check(&path)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("-> service web: 1 routable"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_5xx_is_ejected() -> Result<()> {
    let (a, bad) = (Backend::start("a").await?, Backend::start("fail1").await?);
    let text = config("", &endpoints(&[(&a, 1, "v1"), (&bad, 1, "v1")])).replace(
        "[upstream]",
        "[upstream.outlier]\nconsecutive_failures = 3\nbase_ejection = \"60s\"\n[upstream]",
    );
    let lb = Lb::start(&text).await?;
    let client = client();
    let mut errors = 0;
    for _ in 0..200 {
        if get_with(&client, &lb.url("/")).await?.0 != 200 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "a streak of 3 ejects the instance");
    let m = lb.metrics().await?;
    assert_eq!(
        sample(&m, r#"balancer_outlier_ejections_total{service="web"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"balancer_requests_total{code="5xx",listener="web",service="web",version="v1"}"#
        ),
        Some(3.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_upstream_does_not_break_client_keep_alive() -> Result<()> {
    // A minimal HTTP/1.0 server: one answer per connection, then close.
    let old = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = old.local_addr()?;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = old.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    let text = config(
        "",
        &format!("  [[service.endpoint]]\n  addr = \"{addr}\"\n"),
    );
    let lb = Lb::start(&text).await?;
    let port = lb.port;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        for _ in 0..2 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while !got.ends_with(b"ok") {
                s.read_exact(&mut b)?;
                got.push(b[0]);
            }
            let head = String::from_utf8_lossy(&got);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        Ok(())
    })
    .await??;
    Ok(())
}
