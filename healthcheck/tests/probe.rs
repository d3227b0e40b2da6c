//! One probe against real sockets that misbehave in the ways a backend can: an answer in
//! several TCP segments, a slow answer, something that is not HTTP, a reset, a close
//! without an answer, no answer at all, nobody listening.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use catalog::{CheckSpec, Instance};
use healthcheck::probe::{Outcome, Target, Verdict};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// What a one-connection backend does once it has read the request.
#[derive(Clone, Copy)]
enum Act {
    /// Writes each piece as its own TCP segment, after its pause (ms).
    Pieces(&'static [(u64, &'static str)]),
    /// Resets the connection (zero linger).
    Reset,
    /// Closes without answering.
    Close,
    /// Never answers (holds the connection).
    Hang,
}

/// Serves one connection with `act`; hands back the request it read.
async fn backend(act: Act) -> Result<(SocketAddr, oneshot::Receiver<String>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let request = read_request(&mut s).await;
        let _ = tx.send(request);
        match act {
            Act::Pieces(pieces) => {
                let _ = s.set_nodelay(true);
                for (pause_ms, piece) in pieces {
                    tokio::time::sleep(Duration::from_millis(*pause_ms)).await;
                    if s.write_all(piece.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Keep the connection open: the probe must not need the close.
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Act::Reset => {
                let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            Act::Close => {}
            Act::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
        }
    });
    Ok((addr, rx))
}

async fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn target(addr: SocketAddr, timeout: Duration) -> Result<Target> {
    let instance: Instance = serde_json::from_value(serde_json::json!({
        "id": "n1-web-0-8080", "service": "web", "version": "v1", "node": "n1",
        "addr": addr.ip(), "port": addr.port(),
    }))?;
    let spec = CheckSpec {
        path: Some("/healthz".into()),
        timeout,
        ..CheckSpec::default()
    };
    Ok(Target::new(&instance, &spec, "hc-test"))
}

async fn probe(act: Act, timeout: Duration) -> Result<(Outcome, Verdict, String)> {
    let (addr, request) = backend(act).await?;
    let t = target(addr, timeout)?;
    let outcome = t.probe().await;
    let request = request.await.unwrap_or_default();
    Ok((outcome, t.judge(outcome), request))
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_status_line_split_over_several_segments_is_put_together() -> Result<()> {
    // The first piece is there for the first read (before the event loop is involved),
    // the rest arrives later, bit by bit.
    let pieces = &[
        (0, "HT"),
        (30, "TP/1.1 2"),
        (30, "04"),
        (30, " No Content\r\n\r\n"),
    ];
    let (outcome, verdict, request) = probe(Act::Pieces(pieces), TIMEOUT).await?;
    assert_eq!(outcome, Outcome::Status(204));
    assert_eq!(verdict, Verdict::Pass);
    // The whole request arrived, with the headers a backend uses to check who asks.
    assert!(
        request.starts_with("GET /healthz HTTP/1.1\r\n"),
        "{request:?}"
    );
    assert!(request.contains("\r\nX-Wharf-Instance: n1-web-0-8080\r\n"));
    assert!(request.contains("\r\nX-Wharf-Checker: hc-test\r\n"));
    Ok(())
}

#[tokio::test]
async fn fast_and_slow_answers_are_both_read() -> Result<()> {
    // At once (read without the event loop) and well after the first read (through it).
    let fast = &[(0, "HTTP/1.1 503 Service Unavailable\r\n\r\n")];
    let slow = &[(80, "HTTP/1.1 503 Service Unavailable\r\n\r\n")];
    for (answer, pause) in [(fast, Duration::ZERO), (slow, Duration::from_millis(80))] {
        let started = Instant::now();
        let (outcome, verdict, _) = probe(Act::Pieces(answer), TIMEOUT).await?;
        assert_eq!(outcome, Outcome::Status(503), "pause {pause:?}");
        assert_eq!(verdict, Verdict::Fail);
        assert!(started.elapsed() >= pause);
    }
    Ok(())
}

#[tokio::test]
async fn an_answer_that_is_not_http_fails() -> Result<()> {
    let ssh = &[(0, "SSH-2.0-OpenSSH_9.6\r\n")];
    let (outcome, verdict, _) = probe(Act::Pieces(ssh), TIMEOUT).await?;
    assert_eq!(outcome, Outcome::Malformed);
    assert_eq!(verdict, Verdict::Fail);
    // Bad from the first bytes: no need to wait for more.
    let http2 = &[(0, "HTTP/2 200\r\n\r\n")];
    let (outcome, _, _) = probe(Act::Pieces(http2), TIMEOUT).await?;
    assert_eq!(outcome, Outcome::Malformed);
    Ok(())
}

#[tokio::test]
async fn a_reset_is_an_error_and_a_close_without_answer_a_failure() -> Result<()> {
    let (outcome, verdict, _) = probe(Act::Reset, TIMEOUT).await?;
    assert_eq!(
        outcome,
        Outcome::Io(std::io::ErrorKind::ConnectionReset),
        "reset"
    );
    assert_eq!(verdict, Verdict::Error);
    let (outcome, verdict, _) = probe(Act::Close, TIMEOUT).await?;
    assert_eq!(outcome, Outcome::Closed);
    assert_eq!(verdict, Verdict::Fail);
    Ok(())
}

#[tokio::test]
async fn no_answer_times_out_and_nobody_listening_is_an_error() -> Result<()> {
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (outcome, verdict, _) = probe(Act::Hang, timeout).await?;
    assert_eq!(outcome, Outcome::Timeout);
    assert_eq!(verdict, Verdict::Timeout);
    assert!(started.elapsed() >= timeout);

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let t = target(closed, TIMEOUT)?;
    let outcome = t.probe().await;
    assert_eq!(outcome, Outcome::Io(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(t.judge(outcome), Verdict::Error);
    Ok(())
}
