//! Generated pipelines of HTTP/1.1 requests through the real balancer binary to a real
//! hyper backend, written in reads of random sizes. The backend's `/mirror` answers with
//! the method, target and body it read, so each answer shows what reached the instance.
//!
//! - Valid requests (bodies by length or chunked with extensions and trailers, a repeated
//!   identical length, bare-LF line ends, `Expect: 100-continue`): every one is answered
//!   in order, and the instance read exactly the method, target and body that were sent.
//! - The same with one request that must be refused (the framing shapes used for request
//!   smuggling) in the middle: the requests before it are answered as above, it gets 400,
//!   the connection closes, and nothing after it reaches the instance.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{Context, Result, bail};
use common::framing::Framing;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    query: String,
    body: Vec<u8>,
    framing: Framing,
    extra: Vec<&'static str>,
    eol: &'static str,
}

impl Req {
    fn target(&self) -> String {
        format!("/mirror?{}", self.query)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let e = self.eol;
        let mut head = format!(
            "{} {} HTTP/1.1{e}Host: wire.test{e}",
            self.method,
            self.target()
        );
        for line in &self.extra {
            head += &format!("{line}{e}");
        }
        head += &self.framing.head_lines(self.body.len(), e);
        head += e;
        out.extend_from_slice(head.as_bytes());
        self.framing.put_body(&self.body, out);
    }

    /// What `/mirror` answers when the instance read this request.
    fn mirrored(&self) -> Vec<u8> {
        [
            format!("{} {}\n", self.method, self.target()).as_bytes(),
            &self.body,
        ]
        .concat()
    }
}

fn valid_request() -> impl Strategy<Value = Req> {
    let framing = prop_oneof![
        Just(Framing::None),
        any::<bool>().prop_map(Framing::Length),
        (
            prop::collection::vec(1usize..200, 1..4),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(s, e, t)| Framing::Chunked(s, e, t)),
    ];
    (
        prop::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH"][..]),
        "[a-z0-9=&]{0,12}",
        prop::collection::vec(any::<u8>(), 0..600),
        framing,
        prop::sample::subsequence(
            &[
                "X-A: 1",
                "Connection: keep-alive",
                "X-Forwarded-For: 192.0.2.1",
                "Accept: */*",
                "Expect: 100-continue",
                "X-Empty:",
            ][..],
            0..4,
        ),
        prop::sample::select(&["\r\n", "\r\n", "\n"][..]),
    )
        .prop_map(|(method, query, body, framing, extra, eol)| {
            // A body needs framing; a request without one has none.
            let body = if matches!(framing, Framing::None) {
                Vec::new()
            } else {
                body
            };
            Req {
                method,
                query,
                body,
                framing,
                extra,
                eol,
            }
        })
}

/// Requests that must be refused with 400 (the last two only once their head went on:
/// a chunk that is not one).
const REFUSED: &[&str] = &[
    "POST /mirror HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Content-Length: 3\r\n\r\nabc",
    "POST /mirror HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n",
    "POST /mirror HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
];

/// One answer: status and body (1xx answers skipped).
type Answer = (u16, Vec<u8>);

/// Writes `wire` in reads of `sizes` (cycled), then reads answers until `want` are in or
/// the balancer closes. `closed`: the connection ended.
fn exchange(port: u16, wire: &[u8], sizes: &[usize], want: usize) -> Result<(Vec<Answer>, bool)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(WAIT))?;
    let mut rest = wire;
    for &n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        // A refused request closes the connection: what is still unsent may not go.
        if s.write_all(piece).is_err() {
            break;
        }
        rest = tail;
    }
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let mut closed = false;
    loop {
        while let Some((answer, used)) = parse_answer(&buf)? {
            buf.drain(..used);
            if let Some(a) = answer {
                answers.push(a);
            }
        }
        if answers.len() >= want && !matches!(answers.last(), Some((400, _))) {
            break;
        }
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    if !buf.is_empty() {
        bail!(
            "bytes after the last answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    Ok((answers, closed))
}

/// One answer at the front of `buf` (`None` inside: a 1xx), and the bytes it took.
fn parse_answer(buf: &[u8]) -> Result<Option<(Option<Answer>, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = resp.parse(buf)? else {
        return Ok(None);
    };
    let code = resp.code.context("status")?;
    if (100..200).contains(&code) {
        return Ok(Some((None, head)));
    }
    let len: usize = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap_or("x").trim().parse())
        .context("answer without content-length")??;
    if buf.len() < head + len {
        return Ok(None);
    }
    Ok(Some((
        Some((code, buf[head..head + len].to_vec())),
        head + len,
    )))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn reads() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![2 => 1usize..16, 1 => 16usize..4096], 1..16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_pipelines_reach_the_instance_as_sent() -> Result<()> {
    let backend = Backend::start("a").await?;
    let lb = Lb::start(&one_service_config(&backend.addr.to_string())).await?;
    let port = lb.port;
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = proptest_runner(96);
        runner.run(
            &(prop::collection::vec(valid_request(), 1..5), reads()),
            |(reqs, sizes)| {
                let mut wire = Vec::new();
                for r in &reqs {
                    r.encode(&mut wire);
                }
                let (answers, _) = exchange(port, &wire, &sizes, reqs.len())
                    .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                prop_assert_eq!(answers.len(), reqs.len(), "answers: {:?}", answers);
                for (r, (code, body)) in reqs.iter().zip(&answers) {
                    prop_assert_eq!(*code, 200, "{}", lossy(body));
                    prop_assert_eq!(lossy(body), lossy(&r.mirrored()));
                }
                Ok(())
            },
        )
    })
    .await?;
    if let Err(e) = result {
        bail!("{e}\nbalancer log:\n{}", lb.log());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_ends_the_pipeline_and_nothing_after_it_is_sent_on() -> Result<()> {
    let backend = Backend::start("a").await?;
    let lb = Lb::start(&one_service_config(&backend.addr.to_string())).await?;
    let port = lb.port;
    let mirrored = backend.mirrored.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = proptest_runner(96);
        let strategy = (
            prop::collection::vec(valid_request(), 0..3),
            prop::sample::select(REFUSED),
            prop::collection::vec(valid_request(), 0..3),
            reads(),
        );
        runner.run(&strategy, |(before, refused, mut after, sizes)| {
            let mut wire = Vec::new();
            for r in &before {
                r.encode(&mut wire);
            }
            wire.extend_from_slice(refused.as_bytes());
            // Marked: none of these may ever reach the instance.
            for r in &mut after {
                r.query = format!("after{}", r.query);
                r.encode(&mut wire);
            }
            let (answers, closed) = exchange(port, &wire, &sizes, before.len() + 1)
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            prop_assert_eq!(answers.len(), before.len() + 1, "answers: {:?}", answers);
            for (r, (code, body)) in before.iter().zip(&answers) {
                prop_assert_eq!(*code, 200, "{}", lossy(body));
                prop_assert_eq!(lossy(body), lossy(&r.mirrored()));
            }
            prop_assert_eq!(answers[before.len()].0, 400, "{:?}: {:?}", refused, answers);
            prop_assert!(closed, "connection left open after {:?}", refused);
            Ok(())
        })
    })
    .await?;
    if let Err(e) = result {
        bail!("{e}\nbalancer log:\n{}", lb.log());
    }
    // Checked once at the end: an instance that heard a request after a refused one, in
    // any case, heard it by now (those cases' answers all came back long before).
    let smuggled: Vec<_> = mirrored
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.starts_with("/mirror?after"))
        .cloned()
        .collect();
    assert!(
        smuggled.is_empty(),
        "reached the instance after a refused request: {smuggled:?}"
    );
    Ok(())
}

/// The test's own reader and writer, checked on a fixed exchange (so that a failure above
/// is the balancer's).
#[test]
fn the_test_codec_reads_what_it_writes() {
    let r = Req {
        method: "POST",
        query: "a=1".into(),
        body: b"hello world".to_vec(),
        framing: Framing::Chunked(vec![3, 5], true, true),
        extra: vec!["X-A: 1"],
        eol: "\n",
    };
    let mut wire = Vec::new();
    r.encode(&mut wire);
    assert_eq!(
        lossy(&wire),
        "POST /mirror?a=1 HTTP/1.1\nHost: wire.test\nX-A: 1\nTransfer-Encoding: chunked\n\n\
         3;ext=\"x\"\r\nhel\r\n5;ext=\"x\"\r\nlo wo\r\n3;ext=\"x\"\r\nrld\r\n0\r\nX-Trailer: 1\r\n\r\n"
    );
    let answers = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (first, used) = parse_answer(answers).unwrap().unwrap();
    assert!(first.is_none());
    let (second, _) = parse_answer(&answers[used..]).unwrap().unwrap();
    assert_eq!(second, Some((200, b"ok".to_vec())));
}
