//! Test pieces of the HTTP/2-towards-the-instances tests: HTTP/2-only instances (a
//! gRPC-like echo server, one with a stream limit, one that refuses streams, an HTTPS one
//! that agrees on h2 by ALPN only), an h2c client of the balancer, and a raw HTTP/1.1
//! client that reads chunked answers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::common::*;

/// An HTTP/2-only (h2c prior knowledge) instance, like a gRPC server. Every answer says
/// which instance gave it and how the request came (`x-seen-*`), and ends with trailers
/// (`grpc-status: 0`, `x-instance`). `/echo` streams each request body frame back as it
/// arrives; anything else answers the instance's name.
pub struct H2Backend {
    pub addr: SocketAddr,
    /// Connections accepted since the start.
    pub accepted: Arc<AtomicU64>,
    /// Connections open now.
    pub open: Arc<AtomicU64>,
    pub kill: watch::Sender<bool>,
}

impl H2Backend {
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Result<Self> {
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

    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }
}

pub type EchoBody = Channel<Bytes, Infallible>;

pub async fn answer(
    req: Request<Incoming>,
    name: String,
) -> Result<Response<EchoBody>, Infallible> {
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

pub fn trailers(name: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", "0".parse().unwrap());
    t.insert("x-instance", name.parse().unwrap());
    t
}

pub fn config(addrs: &[SocketAddr], extra: &str) -> String {
    service_config("grpc", &format!("http2 = true\n{extra}"), addrs)
}

/// An HTTP/2 (h2c) connection to the balancer.
pub async fn h2_connect(
    port: u16,
) -> Result<hyper::client::conn::http2::SendRequest<Channel<Bytes, Infallible>>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// The next frame of `body` within the deadline.
pub async fn next_frame(body: &mut Incoming) -> Result<http_body::Frame<Bytes>> {
    tokio::time::timeout(WAIT, body.frame())
        .await
        .context("no frame in time")?
        .context("the body ended")?
        .map_err(Into::into)
}

/// An h2c instance that allows 2 streams at once (SETTINGS_MAX_CONCURRENT_STREAMS) and
/// answers each call after 200 ms; it counts connections and the most calls it ever had
/// under way at once.
pub async fn two_stream_instance() -> Result<(SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (accepted, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (count, most_in) = (accepted.clone(), most.clone());
    let now = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let (now, most) = (now.clone(), most_in.clone());
            let svc = service_fn(move |_req: Request<Incoming>| {
                let (now, most) = (now.clone(), most.clone());
                async move {
                    most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(2)
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    Ok((addr, accepted, most))
}

/// An h2c instance (the `h2` crate's server, to reset streams at will) that refuses its
/// first `refuse` streams with `REFUSED_STREAM` and answers the others "ok"; it counts
/// the streams it saw.
pub async fn refusing_instance(refuse: u64) -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let streams = Arc::new(AtomicU64::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let Ok(mut body) = respond.send_response(Response::new(()), false) else {
                        continue;
                    };
                    let _ = body.send_data(Bytes::from_static(b"ok"), true);
                }
            });
        }
    });
    Ok((addr, streams))
}

/// An answer read off an HTTP/1.1 connection: status, header lines, the chunked body.
pub struct H1Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Sends `requests` one after the other on one HTTP/1.1 connection to `port` and reads
/// their (chunked) answers. Blocking.
pub fn h1_answers(port: u16, requests: &[&str]) -> Result<Vec<H1Answer>> {
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

/// An HTTPS instance that speaks HTTP/2 only (its ALPN list is `h2` alone: a client that
/// offers only http/1.1 fails the handshake) and answers with the protocol it agreed.
/// Each connection waits `hold` before its TLS handshake (a slow instance); the counter
/// is of connections accepted.
pub async fn h2_tls_instance(
    pki: &wharf_tests::TestPki,
    hold: Duration,
) -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let mut cfg = crate::l4kit::server_config(pki, false)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
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
    Ok((a, accepted))
}
