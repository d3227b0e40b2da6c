//! TLS termination through the real binary: SNI with a default certificate, a certificate
//! swapped on disk under continuous handshakes, a bad file keeping the old certificate,
//! the expiry metric, h2 via ALPN, TLS on a tcp listener, TLS to upstreams, session
//! resumption on and off.

mod common;
mod l4kit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use common::{Backend, Lb};
use l4kit::{
    Echo, get_over, greeting, https_config, issue, metric, resuming_tls_connector, tls_connect,
    tls_connector,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_tests::TestPki;

fn addr(lb: &Lb) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], lb.port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_default_and_hot_swap_under_load() -> Result<()> {
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
    let config = format!(
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
  [[listener.tls.certificate]]
  cert = "{}"
  key = "{}"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
"#,
        a_crt.display(),
        a_key.display(),
        b_crt.display(),
        b_key.display(),
        backend.addr
    );
    let lb = Lb::start(&config).await?;
    let tls = tls_connector(&pki.path("ca.crt"), &["http/1.1"])?;

    // SNI picks the certificate; no SNI (an IP) gets the default (the first).
    for (sni, cn) in [("a.test", "a-1"), ("b.test", "b-1"), ("127.0.0.1", "a-1")] {
        let (s, got) = tls_connect(&tls, addr(&lb), sni).await?;
        assert_eq!(got, cn, "{sni}");
        let (status, body) = get_over(s, false, "/").await?;
        assert_eq!((status, body.as_str()), (200, "web"));
    }
    // X-Forwarded-Proto says https.
    let (s, _) = tls_connect(&tls, addr(&lb), "a.test").await?;
    let (_, headers) = get_over(s, false, "/headers").await?;
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");

    // Clients keep handshaking with b.test while its certificate is replaced on disk.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let seen_new = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (stop, failures, seen_new, ok, tls) = (
            stop.clone(),
            failures.clone(),
            seen_new.clone(),
            ok.clone(),
            tls.clone(),
        );
        let target = addr(&lb);
        tasks.push(tokio::spawn(async move {
            let mut after_new = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // A handshake every ~10 ms per client: steady, without exhausting ports.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                let r = async {
                    let (s, cn) = tls_connect(&tls, target, "b.test").await?;
                    let (status, _) = get_over(s, false, "/").await?;
                    anyhow::ensure!(status == 200, "status {status}");
                    anyhow::Ok(cn)
                }
                .await;
                match r {
                    Ok(cn) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if cn == "b-2" {
                            seen_new.fetch_add(1, Ordering::Relaxed);
                        }
                        if seen_new.load(Ordering::Relaxed) > 0 {
                            after_new.push(cn);
                        }
                    }
                    Err(e) => {
                        eprintln!(
                            "client failure at {:?}: {e:#}",
                            std::time::SystemTime::now()
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            after_new
        }));
    }
    wharf_tests::eventually("clients running", l4kit::WAIT, || async {
        (ok.load(Ordering::Relaxed) > 10).then_some(())
    })
    .await?;
    // Replace the files the way deploy tools do: write aside, rename over (cert, then key).
    let fresh = tempfile::tempdir_in(certs.path())?;
    let (n_crt, n_key) = issue(&ca_dir, fresh.path(), "b", &["b.test"], "b-2")?;
    std::fs::rename(&n_crt, &b_crt)?;
    std::fs::rename(&n_key, &b_key)?;
    wharf_tests::eventually("new certificate served", l4kit::WAIT, || async {
        (seen_new.load(Ordering::Relaxed) > 20).then_some(())
    })
    .await
    .map_err(|e| e.context(lb.log()))?;
    stop.store(true, Ordering::Relaxed);
    let mut tail = Vec::new();
    for t in tasks {
        tail.extend(t.await?);
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "{}", lb.log());
    // Once the new certificate was seen, the old one may still finish in handshakes that
    // had started, but the last handshakes of every client see the new one.
    assert!(tail.iter().rev().take(3).all(|cn| cn == "b-2"), "{tail:?}");

    // A broken file keeps the previous certificate and counts an error.
    std::fs::write(&a_crt, "not a certificate")?;
    wharf_tests::eventually("reload error counted", l4kit::WAIT, || async {
        let m = lb.metrics().await.ok()?;
        (metric(
            &m,
            "balancer_tls_certificate_reloads_total",
            &["result=\"error\""],
        ) >= 1.0)
            .then_some(())
    })
    .await?;
    let (_, cn) = tls_connect(&tls, addr(&lb), "a.test").await?;
    assert_eq!(cn, "a-1");
    let m = lb.metrics().await?;
    assert!(
        metric(
            &m,
            "balancer_tls_certificate_reloads_total",
            &["result=\"ok\""]
        ) >= 1.0
    );
    let expiry = metric(&m, "balancer_tls_certificate_expiry_seconds", &["b.crt"]);
    // Issued for 2 days.
    assert!(
        expiry > 86_400.0 && expiry <= 2.0 * 86_400.0 + 60.0,
        "{expiry}"
    );
    assert!(metric(&m, "balancer_tls_handshakes_total", &["result=\"ok\""]) > 20.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_via_alpn_and_tls_on_tcp_with_tls_upstream() -> Result<()> {
    let pki = TestPki::generate()?;
    let backend = Backend::start("web").await?;
    let echo = Echo::start("echo", false).await?;
    // A TLS upstream: a second balancer-free TLS echo made with the test kit's server cert.
    let up = tls_echo_upstream(&pki).await?;
    let p2 = wharf_tests::free_port()?;
    let p3 = wharf_tests::free_port()?;
    let config = format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "https"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
  [[listener.tls.certificate]]
  cert = "{crt}"
  key = "{key}"
[[listener]]
name = "tls-tcp"
bind = "127.0.0.1:{p2}"
protocol = "tcp"
service = "echo"
  [[listener.tls.certificate]]
  cert = "{crt}"
  key = "{key}"
[[listener]]
name = "to-tls"
bind = "127.0.0.1:{p3}"
protocol = "tcp"
service = "secure"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{web}"
[[service]]
name = "echo"
  [[service.endpoint]]
  addr = "{echo}"
[[service]]
name = "secure"
tls = {{ ca = "{ca}", sni = "localhost" }}
  [[service.endpoint]]
  addr = "{up}"
"#,
        crt = pki.path("server.crt").display(),
        key = pki.path("server.key").display(),
        ca = pki.path("ca.crt").display(),
        web = backend.addr,
        echo = echo.addr,
    );
    let lb = Lb::start(&config).await?;

    // ALPN: h2 offered first → h2, and the balancer speaks h2 on it.
    let h2 = tls_connector(&pki.path("ca.crt"), &["h2", "http/1.1"])?;
    let (s, _) = tls_connect(&h2, addr(&lb), "localhost").await?;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, body) = get_over(s, true, "/").await?;
    assert_eq!((status, body.as_str()), (200, "web"));
    let h1 = tls_connector(&pki.path("ca.crt"), &["http/1.1"])?;
    let (s, _) = tls_connect(&h1, addr(&lb), "localhost").await?;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(s, false, "/").await?.0, 200);

    // TLS terminated on a tcp listener, plain to the echo backend.
    let plain = tls_connector(&pki.path("ca.crt"), &[])?;
    let (mut s, _) =
        tls_connect(&plain, SocketAddr::from(([127, 0, 0, 1], p2)), "localhost").await?;
    assert_eq!(greeting(&mut s).await?, "echo");
    s.write_all(b"secret").await?;
    let mut got = [0u8; 6];
    s.read_exact(&mut got).await?;
    assert_eq!(&got, b"secret");

    // Plain client, TLS (verified against the CA, SNI localhost) to the upstream.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p3)).await?;
    assert_eq!(greeting(&mut s).await?, "tls-upstream");
    s.write_all(b"hello").await?;
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await?;
    assert_eq!(&got, b"hello");
    Ok(())
}

/// A TLS echo server with the test kit's server certificate: greets `tls-upstream\n`.
async fn tls_echo_upstream(pki: &TestPki) -> Result<SocketAddr> {
    let cfg = l4kit::server_config(pki, false)?;
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
                let _ = s.write_all(b"tls-upstream\n").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(a)
}

/// A client that sends an IP address as SNI (wrk and other OpenSSL-based clients do) is
/// served, and rustls' warning about it, one per handshake, stays out of the log.
#[tokio::test]
async fn ip_address_sni_is_served_without_a_log_line_per_handshake() -> Result<()> {
    let pki = TestPki::generate()?;
    let backend = Backend::start("web").await?;
    let lb = Lb::start(&https_config("https", &pki, backend.addr, "", "")).await?;
    let said = s_client(lb.port, &["-servername", "127.0.0.1", "-brief"], b"").await?;
    assert!(said.contains("Protocol version"), "no handshake: {said}");
    let log = lb.log();
    assert!(!log.contains("SNI"), "{log}");
    Ok(())
}

/// Runs `openssl s_client` against the balancer's `port` with `args`, writes `input` and
/// closes its stdin; what it printed, stdout then stderr.
async fn s_client(port: u16, args: &[&str], input: &'static [u8]) -> Result<String> {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
        use std::io::Write as _;
        let mut child = cmd.spawn()?;
        child.stdin.take().expect("piped").write_all(input)?;
        child.wait_with_output()
    })
    .await??;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// `config` with `table` (a `[listener.tls]` table) put in front of its first
/// certificate: TOML keys after `[[listener.tls.certificate]]` would belong to that entry.
fn with_tls_table(config: String, table: &str) -> String {
    config.replacen(
        "  [[listener.tls.certificate]]",
        &format!("{table}\n  [[listener.tls.certificate]]"),
        1,
    )
}

/// How each of two connections in a row from one client (the same session store) got
/// its session: `Full` then `Resumed` when the listener offers resumption.
async fn two_handshakes(lb: &Lb, pki: &TestPki) -> Result<[rustls::HandshakeKind; 2]> {
    let client = resuming_tls_connector(&pki.path("ca.crt"))?;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (s, _) = tls_connect(&client, addr(lb), "localhost").await?;
        let kind = s
            .get_ref()
            .1
            .handshake_kind()
            .context("handshake unfinished")?;
        // A TLS 1.3 ticket arrives after the handshake: read the answer to take it in.
        let (status, _) = get_over(s, false, "/").await?;
        assert_eq!(status, 200);
        kinds.push(kind);
    }
    Ok([kinds[0], kinds[1]])
}

/// Resumption is offered by default (a returning client skips the certificate and its
/// signature); `session_resumption = false` makes every handshake a full one, applied by
/// a SIGHUP to a listener that keeps its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumption_is_offered_and_can_be_turned_off() -> Result<()> {
    use rustls::HandshakeKind::{Full, Resumed};
    let pki = TestPki::generate()?;
    let backend = Backend::start("web").await?;
    let config = |resume: bool| {
        let table = format!("[listener.tls]\nsession_resumption = {resume}");
        with_tls_table(https_config("https", &pki, backend.addr, "", ""), &table)
    };
    let lb = Lb::start(&config(true)).await?;
    assert_eq!(two_handshakes(&lb, &pki).await?, [Full, Resumed]);

    lb.write_config(&config(false))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    wharf_tests::eventually("the reload turned resumption off", l4kit::WAIT, || async {
        let kinds = two_handshakes(&lb, &pki).await.ok()?;
        (kinds == [Full, Full]).then_some(())
    })
    .await?;
    Ok(())
}

/// The TLS 1.3 session tickets an OpenSSL client is sent over one connection (a GET
/// with `Connection: close`, read to the end).
async fn tickets_sent(lb: &Lb) -> Result<usize> {
    let get = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let said = s_client(lb.port, &["-msg", "-ign_eof"], get).await?;
    anyhow::ensure!(said.contains("200 OK"), "no answer: {said}");
    Ok(said.matches("NewSessionTicket").count())
}

/// Two tickets per handshake by default; `session_tickets` sets how many (a SIGHUP
/// applies it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tickets_sets_the_tickets_sent_per_handshake() -> Result<()> {
    let pki = TestPki::generate()?;
    let backend = Backend::start("web").await?;
    let config =
        |table: &str| with_tls_table(https_config("https", &pki, backend.addr, "", ""), table);
    let lb = Lb::start(&config("")).await?;
    assert_eq!(tickets_sent(&lb).await?, 2);
    lb.write_config(&config("[listener.tls]\nsession_tickets = 1"))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    wharf_tests::eventually("one ticket per handshake", l4kit::WAIT, || async {
        (tickets_sent(&lb).await.ok()? == 1).then_some(())
    })
    .await?;
    Ok(())
}

#[test]
fn check_loads_certificates_and_names_bad_files() -> Result<()> {
    let pki = TestPki::generate()?;
    let dir = tempfile::tempdir()?;
    let config = |cert: &std::path::Path| {
        format!(
            "[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:1\"\n  [[listener.route]]\n  service = \"web\"\n  [[listener.tls.certificate]]\n  cert = \"{}\"\n  key = \"{}\"\n[[service]]\nname = \"web\"\n  [[service.endpoint]]\n  addr = \"127.0.0.1:2\"\n",
            cert.display(),
            pki.path("server.key").display()
        )
    };
    let path = dir.path().join("lb.toml");
    let run = |text: String| -> Result<std::process::Output> {
        std::fs::write(&path, text)?;
        Ok(common::check(&path)?)
    };
    let ok = run(config(&pki.path("server.crt")))?;
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("for [\"localhost\"], expires in 1 days")
            || out.contains("for [\"localhost\"], expires in 2 days"),
        "{out}"
    );
    // The CA's certificate does not fit the server key: named, exit 1.
    let bad = run(config(&pki.path("ca.crt")))?;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("listener https") && err.contains("server.key"),
        "{err}"
    );
    // Too many tickets: file, line and key.
    let many = with_tls_table(
        config(&pki.path("server.crt")),
        "[listener.tls]\nsession_tickets = 9",
    );
    let bad = run(many)?;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("lb.toml:2") && err.contains("listener[0].tls.session_tickets"),
        "{err}"
    );
    Ok(())
}
