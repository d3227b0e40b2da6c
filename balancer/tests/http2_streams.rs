//! `http2 = true` services under many calls at once, through the real binary: a burst of
//! first calls opens one connection to the instance, calls past the instance's stream
//! limit wait for a stream (none refused), and a stream the instance refuses
//! (`REFUSED_STREAM`) is sent again whatever its method.

mod common;
mod h2kit;
mod l4kit;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::*;
use h2kit::*;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_calls_opens_one_connection() -> Result<()> {
    // An HTTPS instance whose handshakes wait 300 ms: the connection a first call opens
    // takes that long, and every call of the burst arrives while it is being opened.
    let pki = wharf_tests::TestPki::generate()?;
    let (up, accepted) = h2_tls_instance(&pki, Duration::from_millis(300)).await?;
    let tls = format!("tls = {{ ca = \"{}\" }}\n", pki.path("ca.crt").display());
    let lb = Lb::start(&config(&[up], &tls)).await?;
    let mut sends = Vec::new();
    for _ in 0..16 {
        sends.push(h2_connect(lb.port).await?);
    }
    let calls = sends.into_iter().map(|mut send| {
        let url = lb.url("/");
        tokio::spawn(async move {
            let (tx, rx) = Channel::<Bytes, Infallible>::new(1);
            drop(tx);
            let resp = send.send_request(Request::get(url).body(rx)?).await?;
            anyhow::Ok(resp.into_body().collect().await?.to_bytes())
        })
    });
    let answers = tokio::time::timeout(WAIT, futures::future::join_all(calls)).await?;
    for answer in answers {
        assert_eq!(answer??, "h2 HTTP/2.0");
    }
    // One opened the connection while the other 15 waited for it.
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        1,
        "one connection for the burst"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_instance_stream_limit_wait_for_a_stream() -> Result<()> {
    let (up, accepted, most) = two_stream_instance().await?;
    let lb = Lb::start(&config(&[up], "")).await?;
    // 8 calls at once on one client connection: the instance takes 2 at a time on the
    // balancer's one connection to it; the others wait for a stream, none is refused.
    let send = h2_connect(lb.port).await?;
    let calls = (0..8).map(|_| {
        let (mut send, url) = (send.clone(), lb.url("/"));
        tokio::spawn(async move {
            let (tx, rx) = Channel::<Bytes, Infallible>::new(1);
            drop(tx);
            let resp = send.send_request(Request::get(url).body(rx)?).await?;
            let status = resp.status();
            anyhow::Ok((status, resp.into_body().collect().await?.to_bytes()))
        })
    });
    let answers = tokio::time::timeout(WAIT, futures::future::join_all(calls)).await?;
    for answer in answers {
        let (status, body) = answer??;
        assert_eq!(
            (status.as_u16(), &body[..]),
            (200, &b"ok"[..]),
            "{}",
            lb.log()
        );
    }
    assert_eq!(most.load(Ordering::SeqCst), 2, "the instance's limit held");
    assert_eq!(accepted.load(Ordering::Relaxed), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_whatever_its_method() -> Result<()> {
    let (up, streams) = refusing_instance(2).await?;
    let lb = Lb::start(&config(&[up], "")).await?;
    // A body-less POST (not idempotent): the instance refuses it twice, which says it
    // processed nothing, so it goes again and the third stream answers.
    let port = lb.port;
    let answers = tokio::task::spawn_blocking(move || {
        h1_answers(
            port,
            &["POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"],
        )
    })
    .await??;
    assert_eq!(
        (answers[0].status, answers[0].body.as_str()),
        (200, "ok"),
        "{}",
        lb.log()
    );
    assert_eq!(streams.load(Ordering::SeqCst), 3);
    Ok(())
}
