//! `http2 = true` on a service (gRPC instances), through the real binary: requests reach
//! the instances over HTTP/2 on one shared connection each; an HTTP/2 client's call
//! streams both ways at once and its trailers come back (a gRPC bidirectional call); an
//! HTTP/1 client's body reaches the instance whole; a dead instance costs no failed
//! request; an instance that restarts gets a new connection; over `[service.tls]` the
//! balancer offers ALPN h2 and verifies the instance; etcd instances drain without a
//! failed call; `--check` refuses `http2` with `proxy_protocol`.

mod common;
mod l4kit;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// An HTTP/2-only (h2c prior knowledge) instance, like a gRPC server. Every answer says
/// which instance gave it and how the request came (`x-seen-*`), and ends with trailers
/// (`grpc-status: 0`, `x-instance`). `/echo` streams each request body frame back as it
/// arrives; anything else answers the instance's name.
struct H2Backend {
    addr: SocketAddr,
    /// Connections accepted since the start.
    accepted: Arc<AtomicU64>,
    /// Connections open now.
    open: Arc<AtomicU64>,
    kill: watch::Sender<bool>,
}

impl H2Backend {
    async fn start(name: &str) -> Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    async fn start_on(name: &str, addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (kill, kill_rx) = watch::channel(false);
        let (name, count, open_in) = (name.to_owned(), accepted.clone(), open.clone());
        tokio::spawn(async move {
            let mut accept_kill = kill_rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = accept_kill.wait_for(|k| *k) => return,
                };
                count.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                let mut conn_kill = kill_rx.clone();
                let open = open_in.clone();
                open.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, name.clone()));
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc);
                    // Killed: the connection is dropped, like a crashed process.
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_kill.wait_for(|k| *k) => {}
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Self {
            addr,
            accepted,
            open,
            kill,
        })
    }

    fn kill(&self) {
        let _ = self.kill.send(true);
    }
}

type EchoBody = Channel<Bytes, Infallible>;

async fn answer(req: Request<Incoming>, name: String) -> Result<Response<EchoBody>, Infallible> {
    let seen = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let mut resp = Response::builder()
        .header("x-backend", &name)
        .header("x-seen-version", format!("{:?}", req.version()))
        .header("x-seen-te", seen("te"))
        .header("x-seen-xff", seen("x-forwarded-for"))
        .header(
            "x-seen-authority",
            req.uri().authority().map_or("-", |a| a.as_str()),
        )
        .header("content-type", "application/grpc");
    let (mut tx, body) = Channel::new(4);
    if req.uri().path() == "/echo" {
        let mut incoming = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = incoming.frame().await {
                if let Ok(data) = frame.into_data()
                    && tx.send_data(data).await.is_err()
                {
                    return;
                }
            }
            let _ = tx.send_trailers(trailers(&name)).await;
        });
    } else if req.uri().path() == "/status/503" {
        resp = resp.status(503);
        drop(tx);
    } else {
        resp = resp.header("x-method", req.method().as_str());
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from(name.clone())).await;
            let _ = tx.send_trailers(trailers(&name)).await;
        });
    }
    Ok(resp.body(body).expect("a valid answer"))
}

fn trailers(name: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", "0".parse().unwrap());
    t.insert("x-instance", name.parse().unwrap());
    t
}

fn config(addrs: &[SocketAddr], extra: &str) -> String {
    service_config("grpc", &format!("http2 = true\n{extra}"), addrs)
}

/// An HTTP/2 (h2c) connection to the balancer.
async fn h2_connect(
    port: u16,
) -> Result<hyper::client::conn::http2::SendRequest<Channel<Bytes, Infallible>>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// The next frame of `body` within the deadline.
async fn next_frame(body: &mut Incoming) -> Result<http_body::Frame<Bytes>> {
    tokio::time::timeout(WAIT, body.frame())
        .await
        .context("no frame in time")?
        .context("the body ended")?
        .map_err(Into::into)
}

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

/// An answer read off an HTTP/1.1 connection: status, header lines, the chunked body.
struct H1Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// Sends `requests` one after the other on one HTTP/1.1 connection to `port` and reads
/// their (chunked) answers. Blocking.
fn h1_answers(port: u16, requests: &[&str]) -> Result<Vec<H1Answer>> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(WAIT))?;
    let mut w = s.try_clone()?;
    let mut r = std::io::BufReader::new(s);
    let mut out = Vec::new();
    for req in requests {
        w.write_all(req.as_bytes())?;
        let (status, headers) = read_head(&mut r)?;
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16)?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        out.push(H1Answer {
            status,
            headers,
            body: String::from_utf8(body)?,
        });
    }
    Ok(out)
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

/// An HTTPS instance that speaks HTTP/2 only (its ALPN list is `h2` alone: a client that
/// offers only http/1.1 fails the handshake) and answers with the protocol it agreed.
async fn h2_tls_instance(pki: &wharf_tests::TestPki) -> Result<SocketAddr> {
    let mut cfg = l4kit::server_config(pki, false)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else {
                    return;
                };
                let alpn = s
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let alpn = alpn.clone().unwrap_or_else(|| "none".into());
                    async move {
                        let body = format!("{alpn} {:?}", req.version());
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_instance_is_reached_over_h2_by_alpn() -> Result<()> {
    let pki = wharf_tests::TestPki::generate()?;
    let up = h2_tls_instance(&pki).await?;
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
