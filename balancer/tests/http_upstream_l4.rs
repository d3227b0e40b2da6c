//! PROXY protocol headers and TLS towards the instances of **HTTP** services, through the
//! real binary: a PROXY-parsing HTTP backend sees each client's address once per new
//! upstream connection (and pooled connections stay pooled, one client each); an HTTPS
//! backend with the test CA's certificate gets requests (ALPN http/1.1) from an http
//! listener; a certificate that does not verify is a 502, not a hang.

mod common;
mod l4kit;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use common::Lb;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use l4kit::{WAIT, metric};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use wharf_tests::TestPki;

/// What the backend learned about one accepted connection.
#[derive(Debug, Clone)]
struct Seen {
    id: u64,
    /// From the PROXY header (`None` without one).
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
}

/// An HTTP/1.1 keep-alive backend that optionally reads a PROXY header, then optionally
/// TLS, on every connection. Answers `conn=<id> src=<source> alpn=<protocol> len=<body>`,
/// so a test can tell which upstream connection carried a request.
struct HttpBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Ids of the connections the balancer closed.
    closed: Arc<Mutex<Vec<u64>>>,
    accepted: Arc<AtomicU64>,
    _kill: watch::Sender<bool>,
}

impl HttpBackend {
    async fn start(proxy: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let (kill, mut kill_rx) = watch::channel(false);
        let (seen_in, acc, closed_in) = (seen.clone(), accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = kill_rx.wait_for(|k| *k) => return,
                };
                let id = acc.fetch_add(1, Ordering::Relaxed) + 1;
                let (seen, tls, kill_rx) = (seen_in.clone(), tls.clone(), kill_rx.clone());
                let closed = closed_in.clone();
                tokio::spawn(async move {
                    let mut record = Seen {
                        id,
                        source: None,
                        destination: None,
                    };
                    if proxy {
                        let Ok(h) = balancer::proxy_protocol::read_header(&mut s).await else {
                            return;
                        };
                        record.source = h.source;
                        record.destination = h.destination;
                    }
                    seen.lock().unwrap().push(record.clone());
                    match tls {
                        None => serve(s, record, String::new(), kill_rx).await,
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(s).await else {
                                return;
                            };
                            let alpn = s
                                .get_ref()
                                .1
                                .alpn_protocol()
                                .map(|p| String::from_utf8_lossy(p).into_owned())
                                .unwrap_or_default();
                            serve(s, record, alpn, kill_rx).await
                        }
                    }
                    closed.lock().unwrap().push(id);
                });
            }
        });
        Ok(Self {
            addr,
            seen,
            closed,
            accepted,
            _kill: kill,
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve<S>(s: S, record: Seen, alpn: String, mut kill: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let (record, alpn) = (record.clone(), alpn.clone());
        async move {
            let len = req.into_body().collect().await?.to_bytes().len();
            let src = record.source.map(|a| a.to_string()).unwrap_or_default();
            let text = format!("conn={} src={src} alpn={alpn} len={len}", record.id);
            anyhow::Ok(hyper::Response::new(Full::new(Bytes::from(text))))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc);
    tokio::select! {
        _ = conn => {}
        _ = kill.wait_for(|k| *k) => {}
    }
}

/// One client keep-alive connection to the balancer (hyper's HTTP/1.1 client).
struct Client {
    local: SocketAddr,
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        let local = s.local_addr()?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        Ok(Self { local, tx })
    }

    /// `GET path` (or a POST with `body`): (status, body).
    async fn send(&mut self, path: &str, body: Option<&'static [u8]>) -> Result<(u16, String)> {
        let req = hyper::Request::builder()
            .method(if body.is_some() { "POST" } else { "GET" })
            .uri(path)
            .header("host", "lb.test")
            .body(Full::new(Bytes::from_static(body.unwrap_or(b""))))?;
        tokio::time::timeout(WAIT, self.tx.ready())
            .await
            .context("client not ready")??;
        let resp = tokio::time::timeout(WAIT, self.tx.send_request(req))
            .await
            .context("request timed out")??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// `conn=<id>` of an answer.
fn conn_of(body: &str) -> &str {
    body.split(' ').next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_once_per_upstream_connection_with_the_client_address() -> Result<()> {
    let v2 = HttpBackend::start(true, None).await?;
    let v1 = HttpBackend::start(true, None).await?;
    let front = wharf_tests::free_port()?;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/v1/"
  service = "old"
  [[listener.route]]
  service = "app"
[[listener]]
name = "behind-lb"
bind = "127.0.0.1:{front}"
  [listener.proxy_protocol]
  trusted = ["127.0.0.0/8"]
  [[listener.route]]
  service = "app"
[[service]]
name = "app"
proxy_protocol = "v2"
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "old"
proxy_protocol = "v1"
  [[service.endpoint]]
  addr = "{}"
"#,
        v2.addr, v1.addr
    );
    let lb = Lb::start(&config).await?;
    let listen: SocketAddr = format!("127.0.0.1:{}", lb.port).parse()?;

    // Client A: several requests on one keep-alive connection ride one upstream
    // connection, which got one header naming A.
    let mut a = Client::connect(lb.port).await?;
    let mut a_conn = None;
    for i in 0..4 {
        let body = if i % 2 == 1 {
            Some(&b"hello"[..])
        } else {
            None
        };
        let (status, text) = a.send("/x", body).await?;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(&format!("src={}", a.local)), "{text}");
        let c = conn_of(&text).to_owned();
        assert_eq!(a_conn.get_or_insert(c.clone()), &c, "A moved connections");
    }
    // Client B gets its own upstream connection (a pooled one names A), with B's address.
    let mut b = Client::connect(lb.port).await?;
    for _ in 0..2 {
        let (status, text) = b.send("/y", None).await?;
        assert_eq!(status, 200);
        assert!(text.contains(&format!("src={}", b.local)), "{text}");
        assert_ne!(
            Some(conn_of(&text)),
            a_conn.as_deref(),
            "B reused A's connection"
        );
    }
    // A again: still its pooled connection.
    let (_, text) = a.send("/z", None).await?;
    assert_eq!(Some(conn_of(&text)), a_conn.as_deref(), "{text}");

    let seen = v2.seen();
    assert_eq!(
        seen.len(),
        2,
        "one header per upstream connection: {seen:?}"
    );
    assert_eq!(v2.accepted.load(Ordering::Relaxed), 2);
    assert_eq!(seen[0].source, Some(a.local));
    assert_eq!(seen[1].source, Some(b.local));
    // The destination is the address the client connected to (HAProxy's `send-proxy`).
    assert!(
        seen.iter().all(|s| s.destination == Some(listen)),
        "{seen:?}"
    );

    // v1 on the other service, same rules.
    for _ in 0..3 {
        let (status, text) = a.send("/v1/x", None).await?;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(&format!("src={}", a.local)), "{text}");
    }
    let seen = v1.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].destination, Some(listen));

    // Behind a front balancer (accept-proxy): the addresses it announced are relayed.
    let (src, dst): (SocketAddr, SocketAddr) =
        ("198.51.100.7:1234".parse()?, "192.0.2.1:443".parse()?);
    let mut s = TcpStream::connect(("127.0.0.1", front)).await?;
    s.write_all(&balancer::proxy_protocol::encode_v1(src, dst))
        .await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/x")
        .header("host", "lb.test")
        .body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(WAIT, tx.send_request(req)).await??;
    let text = resp.into_body().collect().await?.to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("src=198.51.100.7:1234"));
    let last = v2.seen().pop().context("no connection")?;
    assert_eq!((last.source, last.destination), (Some(src), Some(dst)));

    // Client A leaves: its upstream connection, which nobody else may use, is closed
    // (when the next connection comes back to the pool) instead of idling there.
    let a_id: u64 = a_conn
        .as_deref()
        .and_then(|c| c.strip_prefix("conn="))
        .context("id")?
        .parse()?;
    drop(a);
    let deadline = Instant::now() + WAIT;
    while !v2.closed.lock().unwrap().contains(&a_id) {
        assert!(
            Instant::now() < deadline,
            "A's upstream connection still open"
        );
        b.send("/y", None).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*v2.closed.lock().unwrap(), vec![a_id]);
    Ok(())
}

/// The test kit's server certificate (127.0.0.1 / localhost), offering http/1.1.
fn acceptor(pki: &TestPki) -> Result<tokio_rustls::TlsAcceptor> {
    let pem = std::fs::read(pki.path("server.crt"))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut &std::fs::read(pki.path("server.key"))?[..])?
        .context("no key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_http_upstreams_pooled_and_a_failed_verification_is_502() -> Result<()> {
    let pki = TestPki::generate()?;
    let stranger = TestPki::generate()?;
    let https = HttpBackend::start(false, Some(acceptor(&pki)?)).await?;
    let both = HttpBackend::start(true, Some(acceptor(&pki)?)).await?;
    let untrusted = HttpBackend::start(false, Some(acceptor(&stranger)?)).await?;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  path_prefix = "/both/"
  service = "both"
  [[listener.route]]
  path_prefix = "/bad/"
  service = "bad"
  [[listener.route]]
  service = "secure"
[[service]]
name = "secure"
tls = {{ ca = "{ca}" }}
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "both"
proxy_protocol = "v2"
tls = {{ ca = "{ca}", sni = "localhost" }}
  [[service.endpoint]]
  addr = "{}"
[[service]]
name = "bad"
tls = {{ ca = "{ca}" }}
  [[service.endpoint]]
  addr = "{}"
"#,
        https.addr,
        both.addr,
        untrusted.addr,
        ca = pki.path("ca.crt").display(),
    );
    let lb = Lb::start(&config).await?;

    // Verified TLS (SNI = the instance's IP), ALPN http/1.1, bodies both ways, and the
    // TLS connection pooled across requests and clients.
    let mut a = Client::connect(lb.port).await?;
    let mut b = Client::connect(lb.port).await?;
    let mut conns = Vec::new();
    for i in 0..4 {
        let body = if i % 2 == 0 {
            Some(&b"0123456789"[..])
        } else {
            None
        };
        let c = if i < 2 { &mut a } else { &mut b };
        let (status, text) = c.send("/x", body).await?;
        assert_eq!(status, 200, "{text}\n{}", lb.log());
        assert!(text.contains("alpn=http/1.1"), "{text}");
        assert!(text.contains(&format!("len={}", body.map_or(0, |b| b.len()))));
        conns.push(conn_of(&text).to_owned());
    }
    assert!(conns.iter().all(|c| *c == conns[0]), "{conns:?}");
    assert_eq!(https.accepted.load(Ordering::Relaxed), 1);

    // PROXY header first, then TLS on the same connection.
    let (status, text) = a.send("/both/x", Some(b"abc")).await?;
    assert_eq!(status, 200, "{text}\n{}", lb.log());
    assert!(text.contains(&format!("src={}", a.local)), "{text}");
    assert!(text.contains("alpn=http/1.1 len=3"), "{text}");

    // A certificate from another CA: 502 quickly, no hang; counted as a connect error.
    let started = Instant::now();
    let (status, text) = a.send("/bad/x", None).await?;
    assert_eq!(status, 502, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let m = lb.metrics().await?;
    assert!(
        metric(
            &m,
            "balancer_upstream_connect_errors_total",
            &["service=\"bad\""]
        ) >= 1.0,
        "{m}"
    );
    // The client connection is still good.
    let (status, _) = a.send("/x", None).await?;
    assert_eq!(status, 200);
    Ok(())
}
