//! Test pieces of the L4 features: TCP echo backends (optionally reading a PROXY header
//! first), certificates issued by the test CA, a TLS client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const WAIT: Duration = Duration::from_secs(20);

/// A TCP backend: on accept it optionally reads a PROXY header (recording its source
/// address), writes `<name>\n`, then echoes every byte until EOF and closes.
pub struct Echo {
    pub name: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    pub open: Arc<AtomicU64>,
    /// Client addresses announced by PROXY headers, in arrival order.
    pub proxied: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    /// First bytes of every connection (raw, for checking the header format).
    pub heads: Arc<Mutex<Vec<Vec<u8>>>>,
    kill: watch::Sender<bool>,
}

impl Echo {
    pub async fn start(name: &str, expect_proxy: bool) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let proxied = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (kill, mut kill_rx) = watch::channel(false);
        let (n, acc, op, px, hd) = (
            name.to_owned(),
            accepted.clone(),
            open.clone(),
            proxied.clone(),
            heads.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = kill_rx.wait_for(|k| *k) => return,
                };
                acc.fetch_add(1, Ordering::Relaxed);
                op.fetch_add(1, Ordering::Relaxed);
                let (n, op, px, hd) = (n.clone(), op.clone(), px.clone(), hd.clone());
                tokio::spawn(async move {
                    if expect_proxy {
                        let mut peek = [0u8; 16];
                        let k = s.peek(&mut peek).await.unwrap_or(0);
                        hd.lock().unwrap().push(peek[..k].to_vec());
                        match balancer::proxy_protocol::read_header(&mut s).await {
                            Ok(h) => px.lock().unwrap().push(h.source),
                            Err(_) => {
                                op.fetch_sub(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                    let _ = s.write_all(format!("{n}\n").as_bytes()).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                    op.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Self {
            name: name.to_owned(),
            addr,
            accepted,
            open,
            proxied,
            heads,
            kill,
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.kill.send(true);
    }
}

/// Reads the backend's `<name>\n` greeting.
pub async fn greeting<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut name = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .context("greeting timed out")??;
        if n == 0 {
            bail!(
                "closed before the greeting ({:?})",
                String::from_utf8_lossy(&name)
            );
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8(name)?);
        }
        name.push(b[0]);
    }
}

/// Connects, reads the greeting, sends `payload`, half-closes, reads everything back until
/// EOF. Returns (backend name, echoed bytes).
pub async fn echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    let name = greeting(&mut s).await?;
    let (mut r, mut w) = s.into_split();
    let data = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        anyhow::Ok(w)
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .context("echo timed out")??;
    writer.await??;
    Ok((name, back))
}

/// Issues a server certificate for `names` (DNS SANs) signed by the test CA in `pki_dir`,
/// written as `<file>.crt` / `<file>.key` in `out`. `cn` goes into the subject so tests can
/// tell certificates apart.
pub fn issue(
    pki_dir: &Path,
    out: &Path,
    file: &str,
    names: &[&str],
    cn: &str,
) -> Result<(PathBuf, PathBuf)> {
    let san = names
        .iter()
        .map(|n| {
            if n.contains(':') {
                n.to_string()
            } else {
                format!("DNS:{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    issue_with(
        pki_dir,
        out,
        file,
        &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth"),
        cn,
    )
}

/// Issues a client certificate (`clientAuth`) with subject `CN=cn`, signed by the test CA
/// in `pki_dir`, written as `<file>.crt` / `<file>.key` in `out`.
pub fn issue_client(
    pki_dir: &Path,
    out: &Path,
    file: &str,
    cn: &str,
) -> Result<(PathBuf, PathBuf)> {
    issue_with(pki_dir, out, file, "extendedKeyUsage=clientAuth", cn)
}

fn issue_with(
    pki_dir: &Path,
    out: &Path,
    file: &str,
    extensions: &str,
    cn: &str,
) -> Result<(PathBuf, PathBuf)> {
    let ext = out.join(format!("{file}.ext"));
    std::fs::write(&ext, extensions)?;
    let key = out.join(format!("{file}.key"));
    let csr = out.join(format!("{file}.csr"));
    let crt = out.join(format!("{file}.crt"));
    let run = |args: &[&str]| -> Result<()> {
        let o = Command::new("openssl").args(args).output()?;
        if !o.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={cn}"),
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&pki_dir.join("ca.crt")),
        "-CAkey",
        &p(&pki_dir.join("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&crt),
    ])?;
    Ok((crt, key))
}

/// lb.toml with one HTTPS listener `name` on `@PORT@` serving the test kit's server
/// certificate and routing everything to a static service `web` at `web`. `cert_extra`
/// lines go into the certificate's entry, `tls_extra` after it (a `[listener.tls.…]`
/// table).
pub fn https_config(
    name: &str,
    pki: &wharf_tests::TestPki,
    web: SocketAddr,
    cert_extra: &str,
    tls_extra: &str,
) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "{name}"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
  [[listener.tls.certificate]]
  cert = "{crt}"
  key = "{key}"
  {cert_extra}
{tls_extra}
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{web}"
"#,
        crt = pki.path("server.crt").display(),
        key = pki.path("server.key").display(),
    )
}

/// A TLS server config with the test kit's server certificate (for a TLS instance behind
/// the balancer); with `require_client_cert`, clients must present one from its CA.
pub fn server_config(
    pki: &wharf_tests::TestPki,
    require_client_cert: bool,
) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem = std::fs::read(pki.path("server.crt"))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut &std::fs::read(pki.path("server.key"))?[..])?
        .context("no key")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &std::fs::read(pki.path("ca.crt"))?[..]) {
            roots.add(c?)?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Ok(builder.with_single_cert(chain, key)?)
}

/// A TLS client trusting the test CA, offering `alpn`.
pub fn tls_connector(ca: &Path, alpn: &[&str]) -> Result<tokio_rustls::TlsConnector> {
    tls_connector_as(ca, alpn, None)
}

/// [`tls_connector`] that presents a client certificate (`cert`, `key` PEM files).
pub fn tls_connector_as(
    ca: &Path,
    alpn: &[&str],
    client: Option<(&Path, &Path)>,
) -> Result<tokio_rustls::TlsConnector> {
    let mut cfg = client_config(ca, alpn, client)?;
    // Full handshakes only: a resumed session reports the certificate of the first one.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// [`tls_connector`] (no ALPN) that keeps the sessions the server offers and resumes them
/// (rustls' default in-memory store), as browsers and OpenSSL clients do.
pub fn resuming_tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    let cfg = client_config(ca, &[], None)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// A rustls client config trusting `ca`, offering `alpn`, presenting `client` if given.
fn client_config(
    ca: &Path,
    alpn: &[&str],
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = rustls_pemfile::certs(&mut &std::fs::read(cert)?[..])
                .collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pemfile::private_key(&mut &std::fs::read(key)?[..])?
                .context("no private key")?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Ok(cfg)
}

/// Sends `GET path` over an established stream with HTTP/1.1 (or h2); (status, body).
pub async fn get_over<S>(s: S, h2: bool, path: &str) -> Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Empty};
    let io = hyper_util::rt::TokioIo::new(s);
    let req = hyper::Request::get(format!("http://localhost{path}"))
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = if h2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        tokio::time::timeout(WAIT, tx.send_request(req)).await??
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        tokio::time::timeout(WAIT, tx.send_request(req)).await??
    };
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .context("body timed out")??
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Handshakes with `sni`; returns the stream and the CN of the certificate served.
pub async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, String)> {
    let tcp = TcpStream::connect(addr).await?;
    tls_over(connector, tcp, sni).await
}

/// Handshakes with `sni` over an established connection (which may have sent a PROXY
/// header already); returns the stream and the CN of the certificate served.
pub async fn tls_over(
    connector: &tokio_rustls::TlsConnector,
    tcp: TcpStream,
    sni: &str,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, String)> {
    let name = match sni.parse::<std::net::IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls::pki_types::ServerName::try_from(sni.to_owned())?,
    };
    let s = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .context("TLS handshake timed out")??;
    let cert = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .context("no certificate")?;
    let (_, x) = x509_parser::parse_x509_certificate(&cert)?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((s, cn))
}

/// Value of the first sample of `metric` whose line contains every `labels` fragment.
pub fn metric(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}
