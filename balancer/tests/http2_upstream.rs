//! `http2 = true` on a service (gRPC instances), through the real binary: requests reach
//! the instances over HTTP/2 on one shared connection each; an HTTP/2 client's call
//! streams both ways at once and its trailers come back (a gRPC bidirectional call); an
//! HTTP/1 client's body reaches the instance whole; a dead instance costs no failed
//! request (calls at once: `http2_streams.rs`); an instance that restarts gets a
//! new connection; over `[service.tls]` the balancer offers ALPN h2 and verifies the
//! instance; etcd instances drain without a failed call; `--check` refuses `http2` with
//! `proxy_protocol`.

mod common;
mod h2kit;
mod l4kit;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::*;
use h2kit::*;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_streams_both_ways_and_its_trailers_come_back() -> Result<()> {
    let a = H2Backend::start("a").await?;
    let lb = Lb::start(&config(&[a.addr], "")).await?;

    let mut send = h2_connect(lb.port).await?;
    let (mut tx, rx) = Channel::<Bytes, Infallible>::new(1);
    let req = Request::post(lb.url("/echo"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(rx)?;
    let resp = tokio::time::timeout(WAIT, send.send_request(req)).await??;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-seen-version"], "HTTP/2.0");
    assert_eq!(h["x-seen-te"], "trailers");
    assert_eq!(h["x-seen-xff"], "127.0.0.1");
    assert_eq!(h["x-seen-authority"], format!("127.0.0.1:{}", lb.port));
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: nothing waits for the request's end.
    for msg in ["one", "two", "three"] {
        tx.send_data(Bytes::from(msg)).await?;
        let frame = next_frame(&mut body).await?;
        assert_eq!(frame.into_data().ok().as_deref(), Some(msg.as_bytes()));
    }
    drop(tx);
    let trailers = next_frame(&mut body)
        .await?
        .into_trailers()
        .map_err(|f| anyhow::anyhow!("a data frame after the last message: {f:?}"))?;
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-instance"], "a");

    // Calls on many client connections share the instance's one connection.
    for _ in 0..5 {
        let mut send = h2_connect(lb.port).await?;
        let (tx, rx) = Channel::<Bytes, Infallible>::new(1);
        drop(tx);
        let resp = send
            .send_request(Request::get(lb.url("/")).body(rx)?)
            .await?;
        let body = resp.into_body().collect().await?;
        assert_eq!(body.trailers().map(|t| &t["x-instance"]).unwrap(), "a");
        assert_eq!(body.to_bytes(), "a");
    }
    assert_eq!(a.accepted.load(Ordering::Relaxed), 1);

    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains("-> service grpc [HTTP/2 to the instances]: 1 routable"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_reach_http2_instances_with_their_bodies() -> Result<()> {
    let (a, b) = (H2Backend::start("a").await?, H2Backend::start("b").await?);
    let lb = Lb::start(&config(&[a.addr, b.addr], "")).await?;

    // A body with a length, and a chunked one, come back whole from /echo.
    let port = lb.port;
    let answers = tokio::task::spawn_blocking(move || {
        h1_answers(
            port,
            &[
                "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world",
                "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n there\r\n0\r\n\r\n",
            ],
        )
    })
    .await??;
    assert_eq!(answers[0].status, 200);
    assert_eq!(answers[0].body, "hello world");
    assert_eq!(answers[1].body, "hello there");
    for a in &answers {
        let has = |n: &str, v: &str| a.headers.contains(&(n.into(), v.into()));
        assert!(has("x-seen-version", "HTTP/2.0"), "{:?}", a.headers);
        // Unknown length from an HTTP/2 instance: chunked to the HTTP/1.1 client.
        assert!(has("transfer-encoding", "chunked"), "{:?}", a.headers);
    }

    // GETs spread over both instances.
    let seen = spread(&lb.url("/"), 200, 8).await?;
    assert_eq!(seen.values().sum::<u64>(), 200, "{seen:?}");
    assert!(seen.get("a").copied().unwrap_or(0) > 40, "{seen:?}");
    assert!(seen.get("b").copied().unwrap_or(0) > 40, "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_restarted_instances_cost_no_failed_request() -> Result<()> {
    let a = H2Backend::start("a").await?;
    // A port nobody listens on: every connect is refused.
    let dead: SocketAddr = format!("127.0.0.1:{}", wharf_tests::free_port()?).parse()?;
    let lb = Lb::start(&config(&[a.addr, dead], "")).await?;
    let client = client();
    for i in 0..40 {
        let (code, body) = get_with(&client, &lb.url("/")).await?;
        assert_eq!((code.as_u16(), body.as_str()), (200, "a"), "request {i}");
    }

    // The instance restarts on the same address: its old connection is gone, the next
    // requests get a new one.
    a.kill();
    let addr = a.addr;
    drop(a);
    let a2 = tokio::time::timeout(WAIT, async {
        loop {
            match H2Backend::start_on("a2", addr).await {
                Ok(b) => return b,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await?;
    for i in 0..40 {
        let (code, body) = get_with(&client, &lb.url("/")).await?;
        assert_eq!(
            (code.as_u16(), body.as_str()),
            (200, "a2"),
            "request {i} after the restart"
        );
    }
    assert_eq!(a2.accepted.load(Ordering::Relaxed), 1);
    Ok(())
}

/// A call's body is cut off past the listener's `max_body_bytes`: the stream is reset
/// (its answer had begun), and the connection serves the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_the_body_limit_is_reset() -> Result<()> {
    let a = H2Backend::start("a").await?;
    let text = config(&[a.addr], "").replace(
        "bind = \"127.0.0.1:@PORT@\"\n",
        "bind = \"127.0.0.1:@PORT@\"\nmax_body_bytes = 1000\n",
    );
    let lb = Lb::start(&text).await?;
    let mut send = h2_connect(lb.port).await?;
    let (mut tx, rx) = Channel::<Bytes, Infallible>::new(1);
    let resp = send
        .send_request(Request::post(lb.url("/echo")).body(rx)?)
        .await?;
    let mut body = resp.into_body();
    tx.send_data(Bytes::from(vec![b'x'; 600])).await?;
    let first = next_frame(&mut body).await?;
    assert_eq!(first.data_ref().map(|d| d.len()), Some(600));
    // 1,200 bytes in all: over the limit.
    let _ = tx.send_data(Bytes::from(vec![b'y'; 600])).await;
    let cut = tokio::time::timeout(WAIT, body.frame()).await?;
    assert!(
        matches!(cut, Some(Err(_))),
        "the call went on past the limit: {cut:?}"
    );
    // The client's connection is still good.
    let (tx, rx) = Channel::<Bytes, Infallible>::new(1);
    drop(tx);
    let resp = send
        .send_request(Request::get(lb.url("/")).body(rx)?)
        .await?;
    assert_eq!(resp.into_body().collect().await?.to_bytes(), "a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_instance_is_reached_over_h2_by_alpn() -> Result<()> {
    let pki = wharf_tests::TestPki::generate()?;
    let (up, _) = h2_tls_instance(&pki, Duration::ZERO).await?;
    let tls = format!("tls = {{ ca = \"{}\" }}\n", pki.path("ca.crt").display());
    let lb = Lb::start(&config(&[up], &tls)).await?;
    let client = client();
    for _ in 0..3 {
        let (code, body) = get_with(&client, &lb.url("/")).await?;
        assert_eq!((code.as_u16(), body.as_str()), (200, "h2 HTTP/2.0"));
    }
    Ok(())
}

/// Instances found in etcd, with `http2` set in `[[upstream.service]]`: a drained instance
/// stops getting calls at once, its connection closes once idle, and the calls under way
/// all along fail none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_instances_drain_without_a_failed_call() -> Result<()> {
    use catalog::Store as _;
    let etcd = wharf_tests::EtcdServer::start()?;
    let store = etcd.store().await?;
    let ks = catalog::Keyspace::default();
    let (a, b) = (H2Backend::start("a").await?, H2Backend::start("b").await?);
    // No checker in this catalog: every serving instance is routed (panic mode).
    let register = |id: &'static str, port: u16, state: &'static str| {
        let (store, ks) = (&store, &ks);
        async move {
            let v = serde_json::json!({
                "id": id, "service": "grpc", "version": "v1", "node": "n1",
                "addr": "127.0.0.1", "port": port, "state": state,
            });
            let key = ks.instance(&"grpc".parse()?, &id.parse()?);
            store.put(&key, v.to_string().into_bytes(), None).await?;
            anyhow::Ok(())
        }
    };
    register("n1-a-1", a.addr.port(), "serving").await?;
    register("n1-b-1", b.addr.port(), "serving").await?;
    let text = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[discovery.etcd]
endpoints = ["{}"]
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "grpc"
[[upstream.service]]
name = "grpc"
http2 = true
"#,
        etcd.endpoint()
    );
    let lb = Lb::start(&text).await?;
    let load = Load::start(lb.url("/"), 8);
    wharf_tests::eventually("calls on a and b", WAIT, || async {
        (load.stats.count("a") > 50 && load.stats.count("b") > 50).then_some(())
    })
    .await?;
    assert_eq!(b.open.load(Ordering::Relaxed), 1, "one connection to b");

    register("n1-b-1", b.addr.port(), "draining").await?;
    wharf_tests::eventually("b's connection closed", WAIT, || async {
        (b.open.load(Ordering::Relaxed) == 0).then_some(())
    })
    .await?;
    let on_b = load.stats.count("b");
    let on_a = load.stats.count("a");
    wharf_tests::eventually("a serves alone", WAIT, || async {
        (load.stats.count("a") > on_a + 200).then_some(())
    })
    .await?;
    assert_eq!(load.stats.count("b"), on_b, "b got calls after its drain");
    let stats = load.stop().await;
    assert_eq!(
        stats.failed.load(Ordering::Relaxed),
        0,
        "failures: {:?}",
        &stats.errors.lock().unwrap()[..]
    );
    Ok(())
}

/// `http2` turned on by a SIGHUP applies to the next requests: an HTTP/2-only instance
/// that HTTP/1.1 could not reach (502) answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_http2_on() -> Result<()> {
    let a = H2Backend::start("a").await?;
    let http2 = config(&[a.addr], "");
    let lb = Lb::start(&http2.replace("http2 = true\n", "")).await?;
    let client = client();
    let (code, _) = get_with(&client, &lb.url("/")).await?;
    assert_eq!(
        code.as_u16(),
        502,
        "HTTP/1.1 reached an HTTP/2-only instance"
    );
    lb.write_config(&http2)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    let (code, body) = get_with(&client, &lb.url("/")).await?;
    assert_eq!((code.as_u16(), body.as_str()), (200, "a"));
    Ok(())
}

/// `[service.check]` with a path on an `http2` service asks over HTTP/2: an instance that
/// answers 200 stays in (a probe over HTTP/1.1 would fail it), one that answers 503 goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_checks_of_http2_instances_speak_http2() -> Result<()> {
    let a = H2Backend::start("a").await?;
    let check = |path: &str| {
        format!("  [service.check]\n  path = \"{path}\"\n  interval = \"50ms\"\n  fall = 1\n")
    };
    let lb = Lb::start(&config(&[a.addr], &check("/ok"))).await?;
    // Each probe opens a connection of its own: five of them have run.
    wharf_tests::eventually("five probes", WAIT, || async {
        (a.accepted.load(Ordering::Relaxed) >= 6).then_some(())
    })
    .await?;
    let m = lb.metrics().await?;
    let state = |s: &str| {
        sample(
            &m,
            &format!(r#"balancer_backends{{service="grpc",state="{s}"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert_eq!((state("routable"), state("critical")), (1.0, 0.0));

    lb.write_config(&config(&[a.addr], &check("/status/503")))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    wharf_tests::eventually("a critical", WAIT, || async {
        let m = lb.metrics().await.ok()?;
        let s = r#"balancer_backends{service="grpc",state="critical"}"#;
        (sample(&m, s)? == 1.0).then_some(())
    })
    .await?;
    Ok(())
}

#[test]
fn check_refuses_http2_with_a_proxy_header() -> Result<()> {
    let text = config(&["127.0.0.1:1".parse()?], "proxy_protocol = \"v2\"\n");
    let err = check_refuses(&text)?;
    assert!(err.contains("service[0].http2"), "{err}");
    Ok(())
}
