//! Mutual TLS on a listener through the real binary: a client certificate from the
//! configured CA is required and reaches the instance as `X-Forwarded-Client-Cert` (a
//! forged one is dropped), one from another CA or none is refused; `optional = true` lets
//! clients without a certificate in; a SIGHUP re-reads the CA file; a certificate listed in
//! the CRL file is refused, and so is every client while the CRL is past its nextUpdate.

mod common;
mod l4kit;

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use common::{Backend, Lb, WAIT};
use l4kit::{get_over, https_config, metric, tls_connect, tls_connector_as};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_tests::{TestPki, eventually};

/// A client that trusts `ca` and presents the client certificate of `client`, if given.
fn connector(ca: &Path, client: Option<&TestPki>) -> Result<tokio_rustls::TlsConnector> {
    let files = client.map(|p| (p.path("client.crt"), p.path("client.key")));
    tls_connector_as(
        ca,
        &["http/1.1"],
        files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
}

/// One GET over a new TLS connection: the status, or the error that ended it (a refused
/// client certificate shows as an alert on the first read under TLS 1.3).
async fn get(lb: &Lb, c: &tokio_rustls::TlsConnector) -> Result<u16> {
    let (s, _) = tls_connect(c, addr(lb), "localhost").await?;
    Ok(get_over(s, false, "/").await?.0)
}

fn addr(lb: &Lb) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], lb.port))
}

/// The head the instance received (the backend's `/headers` echo) for a request sent over
/// a new TLS connection with `extra` header lines.
async fn headers_seen(lb: &Lb, c: &tokio_rustls::TlsConnector, extra: &str) -> Result<String> {
    let (mut s, _) = tls_connect(c, addr(lb), "localhost").await?;
    let req = format!("GET /headers HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await??;
    anyhow::ensure!(out.starts_with("HTTP/1.1 200"), "{out}");
    Ok(out)
}

/// lb.toml with one mutual-TLS listener; `auth` goes into `[listener.tls.client_auth]`.
fn config(pki: &TestPki, ca: &Path, web: SocketAddr, auth: &str) -> String {
    let client_auth = format!(
        "  [listener.tls.client_auth]\n  ca = \"{}\"\n  {auth}",
        ca.display()
    );
    https_config("mtls", pki, web, "", &client_auth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_verified_and_their_ca_reread_on_sighup() -> Result<()> {
    let (ours, theirs) = (TestPki::generate()?, TestPki::generate()?);
    let web = Backend::start("web").await?;
    // The listener's CA file is a copy, so the test can replace it.
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("clients-ca.crt");
    std::fs::copy(ours.path("ca.crt"), &ca)?;
    let lb = Lb::start(&config(&ours, &ca, web.addr, "optional = false")).await?;
    let server_ca = ours.path("ca.crt");
    let (with_ours, with_theirs, without) = (
        connector(&server_ca, Some(&ours))?,
        connector(&server_ca, Some(&theirs))?,
        connector(&server_ca, None)?,
    );

    assert_eq!(get(&lb, &with_ours).await?, 200);
    assert!(
        get(&lb, &with_theirs).await.is_err(),
        "another CA's client got in"
    );
    assert!(
        get(&lb, &without).await.is_err(),
        "a client without a certificate got in"
    );
    // The instance learns who the client is; what a client claims about itself is dropped.
    let forged = "X-Forwarded-Client-Cert: Hash=forged\r\n";
    let seen = headers_seen(&lb, &with_ours, forged).await?;
    let xfcc = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .unwrap_or_default();
    let (hash, subject) = xfcc.split_once(';').unwrap_or_default();
    // The SHA-256 of the certificate the client presented (DER).
    let pem = std::fs::read(ours.path("client.crt"))?;
    let der = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("no client certificate"))?;
    use sha2::Digest as _;
    let want = hex::encode(sha2::Sha256::digest(&der[..]));
    assert_eq!(hash, format!("Hash={want}"), "{seen}");
    assert_eq!(subject, "Subject=\"CN=wharf test client\"", "{seen}");
    assert!(!seen.contains("forged"), "{seen}");
    // Both refusals are failed handshakes on the listener's metric.
    let failed = || async {
        let m = lb.metrics().await.ok()?;
        let n = metric(
            &m,
            "balancer_tls_handshakes_total",
            &["mtls", "result=\"error\""],
        );
        (n >= 2.0).then_some(())
    };
    eventually("two failed handshakes counted", WAIT, failed).await?;

    // optional: no certificate is fine, a bad one still is not.
    lb.write_config(&config(&ours, &ca, web.addr, "optional = true"))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("clients without a certificate let in", WAIT, || async {
        (get(&lb, &without).await.ok() == Some(200)).then_some(())
    })
    .await?;
    assert!(
        get(&lb, &with_theirs).await.is_err(),
        "another CA's client got in"
    );
    assert_eq!(get(&lb, &with_ours).await?, 200);
    let seen = headers_seen(&lb, &without, forged).await?;
    assert!(!seen.contains("x-forwarded-client-cert"), "{seen}");

    // The CA file replaced, lb.toml unchanged: a SIGHUP reads it again.
    std::fs::copy(theirs.path("ca.crt"), &ca)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the other CA's clients let in", WAIT, || async {
        (get(&lb, &with_theirs).await.ok() == Some(200)).then_some(())
    })
    .await?;
    assert!(
        get(&lb, &with_ours).await.is_err(),
        "a client of the replaced CA got in"
    );

    // A CA file that does not load: the reload fails, the running verifier stays.
    std::fs::write(&ca, "not a certificate\n")?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the failed reload logged", WAIT, || async {
        lb.log().contains("reload failed").then_some(())
    })
    .await?;
    assert_eq!(get(&lb, &with_theirs).await?, 200);
    Ok(())
}

/// A listener that checks client certificates against a CRL file, and a client whose
/// certificate comes from the listener's CA.
struct CrlRig {
    pki: TestPki,
    _web: Backend,
    _dir: tempfile::TempDir,
    /// The CRL file (rewrite it, then SIGHUP).
    list: std::path::PathBuf,
    lb: Lb,
    client: tokio_rustls::TlsConnector,
}

impl CrlRig {
    /// `write` puts the first CRL in place before the balancer starts.
    async fn start(write: impl FnOnce(&TestPki, &Path) -> Result<()>) -> Result<Self> {
        let pki = TestPki::generate()?;
        let web = Backend::start("web").await?;
        let dir = tempfile::tempdir()?;
        let list = dir.path().join("clients.crl");
        write(&pki, &list)?;
        let auth = format!("crl = \"{}\"", list.display());
        let lb = Lb::start(&config(&pki, &pki.path("ca.crt"), web.addr, &auth)).await?;
        let client = connector(&pki.path("ca.crt"), Some(&pki))?;
        Ok(Self {
            pki,
            _web: web,
            _dir: dir,
            list,
            lb,
            client,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused_and_the_crl_reread_on_sighup() -> Result<()> {
    let rig = CrlRig::start(|pki, list| pki.crl(false, list)).await?;
    let (pki, list, lb, client) = (&rig.pki, &rig.list, &rig.lb, &rig.client);
    assert_eq!(get(lb, client).await?, 200);

    // The client's certificate revoked, lb.toml unchanged: a SIGHUP reads the CRL again.
    pki.crl(true, list)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the revoked client refused", WAIT, || async {
        get(lb, client).await.is_err().then_some(())
    })
    .await?;
    // Refused by the verifier (a failed handshake), not by a balancer gone away.
    let m = lb.metrics().await?;
    let failed = metric(&m, "balancer_tls_handshakes_total", &["result=\"error\""]);
    assert!(failed >= 1.0, "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_refuses_clients_until_a_fresh_one_is_read() -> Result<()> {
    // Nothing revoked, but the list is stale: it cannot vouch for the client any more.
    let rig = CrlRig::start(|pki, list| pki.expired_crl(list)).await?;
    let (pki, list, lb, client) = (&rig.pki, &rig.list, &rig.lb, &rig.client);
    assert!(get(lb, client).await.is_err(), "a stale CRL was trusted");
    let m = lb.metrics().await?;
    let failed = metric(&m, "balancer_tls_handshakes_total", &["result=\"error\""]);
    assert!(failed >= 1.0, "{m}");
    // The operator is told why, when the list is read, and can alert on the date.
    assert!(lb.log().contains("CRL expired"), "{}", lb.log());
    let next_update = "balancer_tls_crl_next_update_timestamp_seconds";
    let listener = ["listener=\"mtls\""];
    // 2020-01-02T00:00:00Z, as `TestPki::expired_crl` wrote it.
    assert_eq!(metric(&m, next_update, &listener), 1_577_923_200.0, "{m}");

    // A fresh list (the same contents) read on SIGHUP admits the client again.
    pki.crl(false, list)?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the client admitted with a fresh CRL", WAIT, || async {
        matches!(get(lb, client).await, Ok(200)).then_some(())
    })
    .await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let m = lb.metrics().await?;
    assert!(
        metric(&m, next_update, &listener) > now.as_secs_f64(),
        "{m}"
    );
    Ok(())
}
