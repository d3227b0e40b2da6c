//! A route's `mirror`, through the real binary: GETs answered by the split's version are
//! copied to the dark-launched version, whose answers never reach the client; a POST is
//! not copied; a share below 100 % copies about that share; a shadow that is down costs
//! the clients nothing and is counted; `--check` lists the mirror and refuses a share
//! over 100.

mod common;

use std::net::SocketAddr;

use anyhow::Result;
use common::*;
use wharf_tests::eventually;

fn config(v1: SocketAddr, v2: SocketAddr, percent: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:@ADMIN@"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
  mirror = {{ version = "v2"{percent} }}
[[service]]
name = "web"
split = {{ v1 = 100 }}
  [[service.endpoint]]
  addr = "{v1}"
  version = "v1"
  [[service.endpoint]]
  addr = "{v2}"
  version = "v2"
"#
    )
}

async fn mirrored(lb: &Lb, result: &str) -> f64 {
    let m = lb.metrics().await.unwrap_or_default();
    let series = format!(
        r#"balancer_mirrored_requests_total{{result="{result}",service="web",version="v2"}}"#
    );
    sample(&m, &series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_are_copied_to_the_dark_version_and_its_answers_dropped() -> Result<()> {
    let (a, shadow) = (Backend::start("a").await?, Backend::start("shadow").await?);
    let lb = Lb::start(&config(a.addr, shadow.addr, "")).await?;
    let client = client();
    for i in 0..20 {
        // /mirror answers with the request line: the client's answer is v1's.
        let (code, body) = get_with(&client, &lb.url(&format!("/mirror?i={i}"))).await?;
        assert_eq!((code.as_u16(), body), (200, format!("GET /mirror?i={i}\n")));
    }
    eventually("20 copies on the shadow", WAIT, || async {
        (shadow.mirrored.lock().unwrap().len() == 20).then_some(())
    })
    .await?;
    assert_eq!(a.mirrored.lock().unwrap().len(), 20);
    let mut copies = shadow.mirrored.lock().unwrap().clone();
    copies.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("/mirror?i={i}")).collect();
    want.sort();
    assert_eq!(copies, want);
    eventually("the copies counted", WAIT, || async {
        (mirrored(&lb, "2xx").await == 20.0).then_some(())
    })
    .await?;

    // A POST (with a body) is not copied.
    let port = lb.port;
    tokio::task::spawn_blocking(move || -> Result<()> {
        use std::io::{BufReader, Write as _};
        let s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        let mut w = s.try_clone()?;
        w.write_all(b"POST /mirror?post HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")?;
        let (status, _) = read_response(&mut BufReader::new(s))?;
        anyhow::ensure!(status == 200, "POST answered {status}");
        Ok(())
    })
    .await??;
    // The GET after it is copied; the POST before it never was.
    get_with(&client, &lb.url("/mirror?after")).await?;
    eventually("the GET after the POST copied", WAIT, || async {
        (shadow.mirrored.lock().unwrap().len() == 21).then_some(())
    })
    .await?;
    assert!(
        !shadow
            .mirrored
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.contains("post"))
    );

    let check = common::check(&lb.config_path())?;
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("[100% of GET/HEAD mirrored to v2]"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_is_copied_and_a_dead_shadow_costs_nothing() -> Result<()> {
    let (a, shadow) = (Backend::start("a").await?, Backend::start("shadow").await?);
    let lb = Lb::start(&config(a.addr, shadow.addr, ", percent = 25")).await?;
    let seen = spread(&lb.url("/mirror"), 800, 4).await?;
    assert_eq!(seen.len(), 1, "{seen:?}");
    eventually("the copies settled", WAIT, || async {
        let n = shadow.mirrored.lock().unwrap().len();
        ((mirrored(&lb, "2xx").await as usize) == n && n > 0).then_some(())
    })
    .await?;
    let n = shadow.mirrored.lock().unwrap().len();
    // 25 % of 800 is 200; 4 standard deviations (~12 each) either way.
    assert!((150..=250).contains(&n), "{n} copies of 800");

    // The shadow goes away: clients see no failure, the copies count as errors.
    shadow.kill();
    let seen = spread(&lb.url("/"), 200, 4).await?;
    assert_eq!(seen.get("a"), Some(&200), "{seen:?}");
    eventually("failed copies counted", WAIT, || async {
        (mirrored(&lb, "error").await > 0.0).then_some(())
    })
    .await?;
    Ok(())
}

/// A shadow that takes connections and never answers: at most `max_in_flight` copies wait
/// on it, the others are skipped and counted, and the clients see nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_to_a_hanging_shadow_are_bounded() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let a = Backend::start("a").await?;
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hang_addr = hang.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    let lb = Lb::start(&config(a.addr, hang_addr, ", max_in_flight = 2")).await?;
    let client = client();
    for _ in 0..10 {
        let (code, body) = get_with(&client, &lb.url("/")).await?;
        assert_eq!((code.as_u16(), body.as_str()), (200, "a"));
    }
    eventually("8 copies skipped", WAIT, || async {
        (mirrored(&lb, "skipped").await == 8.0).then_some(())
    })
    .await?;
    eventually("2 copies waiting on the shadow", WAIT, || async {
        (accepted.load(Ordering::Relaxed) == 2).then_some(())
    })
    .await?;
    Ok(())
}

#[test]
fn check_refuses_a_share_over_100() -> Result<()> {
    route_option_refused(
        "  mirror = { version = \"v2\", percent = 150 }",
        "mirror.percent",
    )
}
