//! Generated upstream responses through the real balancer binary: a raw TCP instance
//! answers each request with bytes chosen by the test (1xx answers first, a body by
//! length, repeated length, chunked with extensions and trailers, or until the close;
//! bare-LF line ends; hop-by-hop lines and lines named by `Connection`), and a hyper
//! client, over HTTP/1.1 or h2c, must get the status, the body byte for byte and the
//! end-to-end header lines, without the hop-by-hop ones.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use common::framing::Framing;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
struct Resp {
    interim: Vec<&'static str>,
    extra: Vec<&'static str>,
    framing: Framing,
    body: Vec<u8>,
    eol: &'static str,
}

/// Lines an instance may send that a client must never get (`X-Hop` only when the
/// first one names it).
const HOP_LINES: &[&str] = &[
    "Connection: keep-alive, X-Hop",
    "X-Hop: 1",
    "Keep-Alive: timeout=5",
    "Proxy-Connection: keep-alive",
];

impl Resp {
    fn encode(&self) -> Vec<u8> {
        let e = self.eol;
        let mut head = String::new();
        for status in &self.interim {
            head += &format!("HTTP/1.1 {status}{e}{e}");
        }
        head += &format!("HTTP/1.1 200 OK{e}X-Case: 1{e}");
        for line in &self.extra {
            head += &format!("{line}{e}");
        }
        head += &self.framing.head_lines(self.body.len(), e);
        head += e;
        let mut out = head.into_bytes();
        self.framing.put_body(&self.body, &mut out);
        out
    }

    /// The end-to-end lines the client must get (names in lower case).
    fn end_to_end(&self) -> Vec<(String, String)> {
        let mut lines = vec![("x-case".to_owned(), "1".to_owned())];
        for line in &self.extra {
            // `X-Hop` is hop-by-hop only when the `Connection` line names it.
            let hop = match *line {
                "X-Hop: 1" => self.extra.contains(&HOP_LINES[0]),
                _ => HOP_LINES.contains(line),
            };
            if hop {
                continue;
            }
            let (n, v) = line.split_once(':').unwrap();
            lines.push((n.to_ascii_lowercase(), v.trim().to_owned()));
        }
        lines
    }
}

fn response() -> impl Strategy<Value = Resp> {
    let framing = prop_oneof![
        any::<bool>().prop_map(Framing::Length),
        (
            prop::collection::vec(1usize..300, 1..4),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(s, e, t)| Framing::Chunked(s, e, t)),
        Just(Framing::UntilClose),
    ];
    let lines: Vec<&'static str> = HOP_LINES
        .iter()
        .copied()
        .chain([
            "X-A: 1",
            "Server: raw",
            "Cache-Control: no-store",
            "X-Empty:",
        ])
        .collect();
    (
        prop::sample::subsequence(&["100 Continue", "103 Early Hints"][..], 0..=2),
        prop::sample::subsequence(lines, 0..6),
        framing,
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::sample::select(&["\r\n", "\r\n", "\n"][..]),
    )
        .prop_map(|(interim, extra, framing, body, eol)| Resp {
            interim,
            extra,
            framing,
            body,
            eol,
        })
}

/// Answers by request id: the bytes to write, and whether to close after them.
type Answers = Arc<Mutex<HashMap<String, (Vec<u8>, bool)>>>;

/// The raw instance: for `GET /r?<id>` it writes the bytes registered under `id`, then
/// closes the connection if they have no length (the body ends with the connection).
struct RawInstance {
    addr: std::net::SocketAddr,
    answers: Answers,
}

impl RawInstance {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let answers: Answers = Arc::default();
        let table = answers.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, table.clone()));
            }
        });
        Ok(Self { addr, answers })
    }
}

async fn serve(mut s: TcpStream, answers: Answers) {
    let mut buf = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let (len, id) = match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let path = req.path.unwrap_or("");
                (n, path.split_once('?').map_or("", |p| p.1).to_owned())
            }
            Ok(httparse::Status::Partial) => {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            }
            Err(_) => return,
        };
        buf.drain(..len);
        let Some((bytes, close)) = answers.lock().unwrap().get(&id).cloned() else {
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await;
            continue;
        };
        if s.write_all(&bytes).await.is_err() || close {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_responses_reach_the_client_as_the_instance_meant_them() -> Result<()> {
    let raw = RawInstance::start().await?;
    let lb = Lb::start(&one_service_config(&raw.addr.to_string())).await?;
    let h1: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let h2: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let rt = tokio::runtime::Handle::current();
    let answers = raw.answers.clone();
    let port = lb.port;
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = proptest_runner(128);
        let next_id = std::sync::atomic::AtomicU64::new(0);
        runner
            .run(&(response(), any::<bool>()), |(resp, over_h2)| {
                let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let close = matches!(resp.framing, Framing::UntilClose);
                answers
                    .lock()
                    .unwrap()
                    .insert(id.to_string(), (resp.encode(), close));
                let client = if over_h2 { &h2 } else { &h1 };
                let url = format!("http://127.0.0.1:{port}/r?{id}");
                let got = rt.block_on(async {
                    let r = tokio::time::timeout(WAIT, client.get(url.parse()?))
                        .await
                        .context("timed out")??;
                    let status = r.status();
                    let headers = r.headers().clone();
                    let body = r.into_body().collect().await?.to_bytes();
                    anyhow::Ok((status, headers, body))
                });
                let (status, headers, body) =
                    got.map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                prop_assert_eq!(status.as_u16(), 200, "{}", String::from_utf8_lossy(&body));
                prop_assert!(
                    body[..] == resp.body[..],
                    "body differs ({} vs {} bytes)",
                    body.len(),
                    resp.body.len()
                );
                for (name, value) in resp.end_to_end() {
                    let got: Vec<_> = headers
                        .get_all(&name)
                        .iter()
                        .map(|v| v.to_str().unwrap_or("?").to_owned())
                        .collect();
                    prop_assert!(
                        got.contains(&value),
                        "{}: {:?}, want {:?}",
                        name,
                        got,
                        value
                    );
                }
                let named = resp.extra.contains(&HOP_LINES[0]);
                for hop in ["x-hop", "keep-alive", "proxy-connection", "x-trailer"] {
                    if hop == "x-hop" && !named {
                        continue;
                    }
                    prop_assert!(
                        !headers.contains_key(hop),
                        "{} reached the client: {:?}",
                        hop,
                        headers
                    );
                }
                if let Some(c) = headers.get("connection") {
                    prop_assert!(
                        !c.to_str()
                            .unwrap_or("")
                            .to_ascii_lowercase()
                            .contains("x-hop")
                    );
                }
                prop_assert!(
                    headers.get_all("content-length").iter().count() <= 1,
                    "{:?}",
                    headers
                );
                Ok(())
            })
            .map_err(|e| e.to_string())
    })
    .await?;
    if let Err(e) = result {
        bail!("{e}\nbalancer log:\n{}", lb.log());
    }
    Ok(())
}
