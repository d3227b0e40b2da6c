//! Mutual TLS towards the instances, through the real binary: `[service.tls]` with `cert`
//! and `key` presents a client certificate to an instance that requires one, on HTTP and
//! tcp listeners alike; a service without it is refused by that instance (502); the
//! certificate follows its files (new handshakes present the new one, including ones the
//! balancer could have resumed under the old identity); a bad file keeps the previous
//! certificate; the expiry gauge of a service whose certificate a SIGHUP removed goes
//! away; `--check` names a client certificate that does not load.

mod common;
mod l4kit;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use common::{Lb, WAIT, get_with, sample};
use l4kit::{issue_client, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_tests::{TestPki, eventually};

/// An HTTPS instance that requires a client certificate from the test CA and answers
/// every request with the certificate's subject CN, then closes (`Connection: close`), so
/// each request through the balancer makes a new handshake. It keeps rustls' default
/// session cache and tickets: a handshake the balancer resumes reports the identity of
/// the session it resumes.
async fn mtls_instance(pki: &TestPki) -> Result<SocketAddr> {
    let cfg = l4kit::server_config(pki, true)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let cn = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map_or("none".into(), |c| {
                        x509_parser::parse_x509_certificate(&c[0]).map_or("?".into(), |(_, x)| {
                            x.subject()
                                .iter_common_name()
                                .filter_map(|n| n.as_str().ok())
                                .collect::<String>()
                        })
                    });
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{cn}",
                    cn.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(a)
}

/// lb.toml: an HTTP listener to `secure`, a tcp listener on `tcp_port` to `secure-tcp`
/// (both present the client certificate `cert`/`key` unless `tcp_cert` is false for the
/// tcp one), and an HTTP listener on `anon_port` to `anon`, which verifies the instance
/// but has no client certificate. All three services are the one instance `up`.
fn config(
    pki: &TestPki,
    (cert, key): (&Path, &Path),
    up: SocketAddr,
    (tcp_port, anon_port): (u16, u16),
    tcp_cert: bool,
) -> String {
    let ca = pki.path("ca.crt");
    let verified = format!("ca = \"{}\", sni = \"localhost\"", ca.display());
    let with_cert = format!(
        "{verified}, cert = \"{}\", key = \"{}\"",
        cert.display(),
        key.display()
    );
    let tcp_tls = if tcp_cert { &with_cert } else { &verified };
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "secure"
[[listener]]
name = "raw"
bind = "127.0.0.1:{tcp_port}"
protocol = "tcp"
service = "secure-tcp"
[[listener]]
name = "anon"
bind = "127.0.0.1:{anon_port}"
  [[listener.route]]
  service = "anon"
[[service]]
name = "secure"
tls = {{ {with_cert} }}
  [[service.endpoint]]
  addr = "{up}"
[[service]]
name = "secure-tcp"
tls = {{ {tcp_tls} }}
  [[service.endpoint]]
  addr = "{up}"
[[service]]
name = "anon"
tls = {{ {verified} }}
  [[service.endpoint]]
  addr = "{up}"
"#
    )
}

/// The identity the instance saw for one GET through the HTTP listener on `port`.
async fn via_http(port: u16) -> Result<(u16, String)> {
    let (status, body) = get_with(&common::client(), &format!("http://127.0.0.1:{port}/")).await?;
    Ok((status.as_u16(), body))
}

/// The identity the instance saw for one request relayed by the tcp listener on `port`.
async fn via_tcp(port: u16) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await??;
    let (_, body) = out.split_once("\r\n\r\n").context("no answer")?;
    Ok(body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_to_instances_is_presented_and_follows_its_files() -> Result<()> {
    let pki = TestPki::generate()?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("id.crt"), dir.path().join("id.key"));
    std::fs::copy(pki.path("client.crt"), &cert)?;
    std::fs::copy(pki.path("client.key"), &key)?;
    let (next_cert, next_key) = issue_client(&pki.path(""), dir.path(), "next", "rotated client")?;
    let up = mtls_instance(&pki).await?;
    let ports = (wharf_tests::free_port()?, wharf_tests::free_port()?);
    let lb = Lb::start(&config(&pki, (&cert, &key), up, ports, true)).await?;

    assert_eq!(via_http(lb.port).await?, (200, "wharf test client".into()));
    // A second one: a new upstream connection, which may resume the first one's session.
    assert_eq!(via_http(lb.port).await?, (200, "wharf test client".into()));
    assert_eq!(via_tcp(ports.0).await?, "wharf test client");
    // No client certificate: the instance refuses the handshake, a connect error → 502.
    assert_eq!(via_http(ports.1).await?.0, 502);

    let m = lb.metrics().await?;
    for service in ["secure", "secure-tcp"] {
        let left = metric(
            &m,
            "balancer_upstream_tls_certificate_expiry_seconds",
            &[&format!("service=\"{service}\"")],
        );
        // The test certificates are valid for 2 days.
        assert!(
            left > 86_400.0 && left <= 2.0 * 86_400.0,
            "{service}: {left}\n{m}"
        );
    }
    assert!(!m.contains("expiry_seconds{service=\"anon\"}"), "{m}");

    // Rotate: the next handshakes present the new certificate, on both kinds of listener.
    std::fs::copy(&next_cert, &cert)?;
    std::fs::copy(&next_key, &key)?;
    eventually(
        "HTTP requests presenting the new certificate",
        WAIT,
        || async {
            (via_http(lb.port).await.ok()? == (200, "rotated client".into())).then_some(())
        },
    )
    .await
    .map_err(|e| e.context(lb.log()))?;
    eventually(
        "tcp connections presenting the new certificate",
        WAIT,
        || async { (via_tcp(ports.0).await.ok()? == "rotated client").then_some(()) },
    )
    .await?;
    let reloaded = |m: &str, service: &str, result: &str| {
        sample(
            m,
            &format!(
                "balancer_upstream_tls_certificate_reloads_total{{result=\"{result}\",service=\"{service}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    let m = lb.metrics().await?;
    assert!(reloaded(&m, "secure", "ok") >= 1.0, "{m}");
    assert!(reloaded(&m, "secure-tcp", "ok") >= 1.0, "{m}");
    // Not one handshake afterwards resumes a session of the old identity.
    for _ in 0..5 {
        assert_eq!(via_http(lb.port).await?, (200, "rotated client".into()));
    }

    // A key that does not parse: counted, and the rotated certificate stays in use.
    let errors = reloaded(&m, "secure", "error");
    std::fs::write(&key, "not a key")?;
    eventually("the bad key counted", WAIT, || async {
        let m = lb.metrics().await.ok()?;
        (reloaded(&m, "secure", "error") > errors).then_some(())
    })
    .await?;
    assert_eq!(via_http(lb.port).await?, (200, "rotated client".into()));
    assert_eq!(via_tcp(ports.0).await?, "rotated client");
    assert!(lb.log().contains("id.key"), "the log names the file");

    // A SIGHUP that takes the tcp service's certificate away: its gauge goes, the HTTP
    // service's stays, and the tcp service is now refused by the instance (closed).
    std::fs::copy(&next_key, &key)?;
    lb.write_config(&config(&pki, (&cert, &key), up, ports, false))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    let gauge = "balancer_upstream_tls_certificate_expiry_seconds{service=\"secure-tcp\"}";
    eventually("the tcp service's expiry gauge gone", WAIT, || async {
        let m = lb.metrics().await.ok()?;
        (sample(&m, gauge).is_none()).then_some(())
    })
    .await
    .map_err(|e| e.context(lb.log()))?;
    let m = lb.metrics().await?;
    assert!(
        sample(
            &m,
            "balancer_upstream_tls_certificate_expiry_seconds{service=\"secure\"}"
        )
        .is_some(),
        "{m}"
    );
    assert!(
        via_tcp(ports.0).await.is_err(),
        "the instance let a client without a certificate in"
    );
    assert_eq!(via_http(lb.port).await?, (200, "rotated client".into()));
    Ok(())
}

#[test]
fn check_names_a_client_certificate_that_does_not_load() -> Result<()> {
    let pki = TestPki::generate()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lb.toml");
    let check = |key: &Path| -> Result<std::process::Output> {
        let text = format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:1\"\n  [[listener.route]]\n  service = \"secure\"\n[[service]]\nname = \"secure\"\ntls = {{ verify = false, cert = \"{}\", key = \"{}\" }}\n  [[service.endpoint]]\n  addr = \"127.0.0.1:2\"\n",
            pki.path("client.crt").display(),
            key.display()
        );
        std::fs::write(&path, text)?;
        Ok(common::check(&path)?)
    };
    let ok = check(&pki.path("client.key"))?;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The server's key does not fit the client certificate: service and file named.
    let bad = check(&pki.path("server.key"))?;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("service secure") && err.contains("server.key"),
        "{err}"
    );
    Ok(())
}
