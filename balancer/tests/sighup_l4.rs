//! SIGHUP changes the TLS and PROXY settings of listeners that keep their address: new
//! connections see the new certificates and accept-proxy rule, established connections
//! go on, and the listening sockets never refuse a connection.

mod common;
mod l4kit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use common::{Backend, Lb};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use l4kit::{Echo, WAIT, greeting, issue, metric, tls_connect, tls_connector, tls_over};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_tests::TestPki;

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn get(tx: &mut Sender, path: &str) -> Result<(u16, String)> {
    tokio::time::timeout(WAIT, tx.ready())
        .await
        .context("not ready")??;
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())?;
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .context("request timed out")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn http1<S>(s: S) -> Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

/// Plain connects to `addrs`, every 5 ms until stopped: a reload must never make a
/// listening address refuse a connection.
struct ConnectProber {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProber {
    fn start(addrs: Vec<SocketAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let probes = Arc::new(AtomicU64::new(0));
        let (s, r, p) = (stop.clone(), refused.clone(), probes.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                for &a in &addrs {
                    if TcpStream::connect(a).await.is_err() {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    p.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        Self {
            stop,
            refused,
            probes,
            task,
        }
    }

    /// Waits until `n` more probes were made.
    async fn more(&self, n: u64) -> Result<()> {
        let until = self.probes.load(Ordering::Relaxed) + n;
        wharf_tests::eventually("probes", WAIT, || async {
            (self.probes.load(Ordering::Relaxed) >= until).then_some(())
        })
        .await
    }

    /// Stops probing; the number of refused connects.
    async fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?;
        Ok(self.refused.load(Ordering::Relaxed))
    }
}

/// The two services every test here routes to: `web` (HTTP) and `echo` (tcp).
fn web_and_echo(web: SocketAddr, echo: SocketAddr) -> String {
    format!(
        "[[service]]\nname = \"web\"\n  [[service.endpoint]]\n  addr = \"{web}\"\n[[service]]\nname = \"echo\"\n  [[service.endpoint]]\n  addr = \"{echo}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_certificates_and_accept_proxy_to_new_connections_only() -> Result<()> {
    let pki = TestPki::generate()?;
    let ca_dir = pki.path("");
    let certs = tempfile::tempdir()?;
    let (a_crt, a_key) = issue(
        &ca_dir,
        certs.path(),
        "a",
        &["a.test", "IP:127.0.0.1"],
        "a-1",
    )?;
    let (b_crt, b_key) = issue(&ca_dir, certs.path(), "b", &["b.test"], "b-1")?;
    let backend = Backend::start("web").await?;
    let echo = Echo::start("echo", false).await?;
    let raw_port = wharf_tests::free_port()?;
    let config = |after: bool| {
        let (b_cert, proxy) = if after {
            (
                format!(
                    "  [[listener.tls.certificate]]\n  cert = \"{}\"\n  key = \"{}\"\n",
                    b_crt.display(),
                    b_key.display()
                ),
                "  [listener.proxy_protocol]\n  trusted = [\"127.0.0.0/8\"]\n",
            )
        } else {
            (String::new(), "")
        };
        format!(
            r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "https"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
  [[listener.tls.certificate]]
  cert = "{}"
  key = "{}"
{b_cert}{proxy}
[[listener]]
name = "raw"
bind = "127.0.0.1:{raw_port}"
protocol = "tcp"
service = "echo"
{proxy}
{services}"#,
            a_crt.display(),
            a_key.display(),
            services = web_and_echo(backend.addr, echo.addr),
        )
    };
    let lb = Lb::start(&config(false)).await?;
    let https: SocketAddr = format!("127.0.0.1:{}", lb.port).parse()?;
    let raw: SocketAddr = format!("127.0.0.1:{raw_port}").parse()?;
    let tls = tls_connector(&pki.path("ca.crt"), &["http/1.1"])?;

    // Before: one certificate for every name, no PROXY header expected.
    // (b.test gets the default certificate, which does not name it.)
    assert!(tls_connect(&tls, https, "b.test").await.is_err());
    let (s, cn) = tls_connect(&tls, https, "a.test").await?;
    assert_eq!(cn, "a-1");
    let mut kept = http1(s).await?;
    assert_eq!(get(&mut kept, "/").await?, (200, "web".into()));
    let mut kept_raw = TcpStream::connect(raw).await?;
    assert_eq!(greeting(&mut kept_raw).await?, "echo");

    // Both ports are probed with plain connects all along: none may be refused.
    let prober = ConnectProber::start(vec![https, raw]);
    prober.more(10).await?;
    lb.write_config(&config(true))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;

    // New connections: a PROXY header is required, then SNI finds the added certificate.
    let mut tcp = TcpStream::connect(https).await?;
    tcp.write_all(&balancer::proxy_protocol::encode_v1(
        "203.0.113.9:4444".parse()?,
        https,
    ))
    .await?;
    let (s, cn) = tls_over(&tls, tcp, "b.test").await?;
    assert_eq!(cn, "b-1");
    let mut fresh = http1(s).await?;
    let (status, headers) = get(&mut fresh, "/headers").await?;
    assert_eq!(status, 200);
    assert!(
        headers.contains("x-forwarded-for: 203.0.113.9"),
        "{headers}"
    );
    // Without the header: refused now.
    assert!(tls_connect(&tls, https, "a.test").await.is_err());
    let mut tcp = TcpStream::connect(raw).await?;
    tcp.write_all(&balancer::proxy_protocol::encode_v2(
        "203.0.113.9:4444".parse()?,
        raw,
    ))
    .await?;
    assert_eq!(greeting(&mut tcp).await?, "echo");
    let mut bare = TcpStream::connect(raw).await?;
    bare.write_all(b"hello, this is not a PROXY header\r\n")
        .await?;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(WAIT, bare.read(&mut buf))
        .await
        .context("a connection without a PROXY header was not closed")?
        .unwrap_or(0);
    assert_eq!(n, 0, "got {:?}", &buf[..n]);

    // Connections from before the reload keep working as they were.
    assert_eq!(get(&mut kept, "/").await?, (200, "web".into()));
    kept_raw.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, kept_raw.read_exact(&mut back)).await??;
    assert_eq!(&back, b"ping");

    prober.more(10).await?;
    assert_eq!(prober.finish().await?, 0, "{}", lb.log());
    let m = lb.metrics().await?;
    assert!(
        metric(
            &m,
            "balancer_proxy_protocol_rejected_total",
            &["listener=\"https\"", "reason=\"missing\""]
        ) >= 1.0,
        "{m}"
    );

    // A certificate that does not load fails the whole reload: the running settings stay.
    let broken = config(true).replace(&*a_crt.to_string_lossy(), "/nonexistent/a.crt");
    lb.write_config(&broken)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("error", 1.0).await?;
    let mut tcp = TcpStream::connect(https).await?;
    tcp.write_all(&balancer::proxy_protocol::encode_v2(
        "203.0.113.9:1".parse()?,
        https,
    ))
    .await?;
    let (s, cn) = tls_over(&tls, tcp, "b.test").await?;
    assert_eq!(cn, "b-1");
    assert_eq!(get(&mut http1(s).await?, "/").await?, (200, "web".into()));

    // A certificate dropped from the list loses its expiry series (no alert for a
    // certificate that is not served); the one still listed keeps its series.
    let series = |m: &str, crt: &std::path::Path| {
        m.lines().any(|l| {
            l.starts_with("balancer_tls_certificate_expiry_seconds")
                && l.contains(&format!("certificate=\"{}\"", crt.display()))
        })
    };
    assert!(series(&lb.metrics().await?, &a_crt));
    let only_b = config(true)
        .replace(&*a_crt.to_string_lossy(), &b_crt.to_string_lossy())
        .replace(&*a_key.to_string_lossy(), &b_key.to_string_lossy());
    lb.write_config(&only_b)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 2.0).await?;
    let m = lb.metrics().await?;
    assert!(!series(&m, &a_crt), "{m}");
    assert!(series(&m, &b_crt), "{m}");
    Ok(())
}

/// SIGHUP turns a listener from `http` into `tcp` on the same address and back: new
/// connections get the new protocol and the port never refuses a connection. A keep-alive
/// HTTP connection from before the switch has no routes any more: its next request gets
/// 503 with `Connection: close` (never a request sent to the tcp service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_switches_a_listener_between_http_and_tcp_on_its_socket() -> Result<()> {
    let backend = Backend::start("web").await?;
    let echo = Echo::start("echo", false).await?;
    let config = |tcp: bool| {
        let kind = if tcp {
            "protocol = \"tcp\"\nservice = \"echo\"\n"
        } else {
            "  [[listener.route]]\n  service = \"web\"\n"
        };
        format!(
            r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "front"
bind = "127.0.0.1:@PORT@"
{kind}
{services}"#,
            services = web_and_echo(backend.addr, echo.addr),
        )
    };
    let lb = Lb::start(&config(false)).await?;
    let front: SocketAddr = format!("127.0.0.1:{}", lb.port).parse()?;
    let mut kept = http1(TcpStream::connect(front).await?).await?;
    assert_eq!(get(&mut kept, "/").await?, (200, "web".into()));

    let prober = ConnectProber::start(vec![front]);
    let short = std::time::Duration::from_secs(2);

    lb.write_config(&config(true))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    // The old loop may take one more connection while it stops: ask until tcp answers.
    wharf_tests::eventually("tcp on the listener's address", WAIT, || async {
        let mut s = TcpStream::connect(front).await.ok()?;
        let name = tokio::time::timeout(short, greeting(&mut s))
            .await
            .ok()?
            .ok()?;
        (name == "echo").then_some(())
    })
    .await?;
    assert_eq!(
        get(&mut kept, "/").await?,
        (503, "listener is closing\n".into())
    );

    lb.write_config(&config(false))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 2.0).await?;
    wharf_tests::eventually("http on the listener's address", WAIT, || async {
        let s = TcpStream::connect(front).await.ok()?;
        let mut tx = http1(s).await.ok()?;
        let answer = tokio::time::timeout(short, get(&mut tx, "/"))
            .await
            .ok()?
            .ok()?;
        (answer == (200, "web".into())).then_some(())
    })
    .await?;

    assert_eq!(prober.finish().await?, 0, "{}", lb.log());
    Ok(())
}
