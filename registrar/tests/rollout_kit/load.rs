//! The load generator of the rollout tests: keep-alive clients at constant concurrency
//! through both balancers, counting each answer by balancer, version and rollout phase.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use wharf_tests::eventually;

use super::stack::Stack;

const CONCURRENCY: usize = 16;

/// Marks which phase a request belongs to: 0 = none, 1..=100 = a canary step's percent,
/// `AFTER` = the rollout command has exited.
pub const AFTER: u32 = 1000;

#[derive(Default)]
pub struct Stats {
    pub total: u64,
    /// (balancer, marker) → (v1 answers, v2 answers)
    pub by_marker: BTreeMap<(usize, u32), (u64, u64)>,
    pub failures: Vec<String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    pub marker: Arc<AtomicU32>,
    stats: Arc<Mutex<Stats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `CONCURRENCY` keep-alive clients, half on each balancer, GETting `path` back to back.
    pub fn start(lbs: &[SocketAddr], path: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let marker = Arc::new(AtomicU32::new(0));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let tasks = (0..CONCURRENCY)
            .map(|i| {
                let (lb, addr) = (i % lbs.len(), lbs[i % lbs.len()]);
                let (stop, marker, stats) = (stop.clone(), marker.clone(), stats.clone());
                tokio::spawn(async move { client(lb, addr, path, stop, marker, stats).await })
            })
            .collect();
        Self {
            stop,
            marker,
            stats,
            tasks,
        }
    }

    pub async fn finish(self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        Arc::try_unwrap(self.stats)
            .ok()
            .expect("clients are done")
            .into_inner()
            .unwrap()
    }

    pub fn total(&self) -> u64 {
        self.stats.lock().unwrap().total
    }
}

async fn client(
    lb: usize,
    addr: SocketAddr,
    path: &'static str,
    stop: Arc<AtomicBool>,
    marker: Arc<AtomicU32>,
    stats: Arc<Mutex<Stats>>,
) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    let t0 = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let s = match sender.as_mut() {
            Some(s) => s,
            None => {
                let conn = match tokio::net::TcpStream::connect(addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        stats
                            .lock()
                            .unwrap()
                            .failures
                            .push(format!("[lb{lb}] connect: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                match hyper::client::conn::http1::handshake(TokioIo::new(conn)).await {
                    Ok((s, c)) => {
                        tokio::spawn(c);
                        sender.insert(s)
                    }
                    Err(e) => {
                        stats
                            .lock()
                            .unwrap()
                            .failures
                            .push(format!("[lb{lb}] handshake: {e}"));
                        continue;
                    }
                }
            }
        };
        if s.ready().await.is_err() {
            // The balancer closed an idle keep-alive connection: not a failed request.
            sender = None;
            continue;
        }
        let before = marker.load(Ordering::SeqCst);
        let req = http::Request::get(path)
            .header("host", "web")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let result = match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(b) => Ok((
                        status,
                        String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                    )),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
            Err(e) => Err(format!("request: {e}")),
        };
        let after = marker.load(Ordering::SeqCst);
        let at = format!("[lb{lb} marker {before}->{after} at {:?}]", t0.elapsed());
        let mut st = stats.lock().unwrap();
        st.total += 1;
        match result {
            Ok((200, body)) if body == "v1" || body == "v2" => {
                if before == after {
                    let e = st.by_marker.entry((lb, after)).or_default();
                    if body == "v1" {
                        e.0 += 1;
                    } else {
                        e.1 += 1;
                    }
                }
            }
            Ok((status, body)) => st.failures.push(format!("{at} {status} {body:?}")),
            Err(e) => {
                st.failures.push(format!("{at} {e}"));
                sender = None;
            }
        }
    }
}

/// Keeps the load on after the rollout until at least `n` requests were sent in all.
pub async fn keep_loading(load: &Load, n: u64) -> Result<()> {
    eventually("enough requests", Duration::from_secs(120), || async move {
        (load.total() >= n).then_some(())
    })
    .await
}

pub fn assert_clean(s: &Stack, stats: &Stats) {
    assert!(
        stats.failures.is_empty(),
        "{} of {} requests failed, first ones: {:?}\n{}",
        stats.failures.len(),
        stats.total,
        &stats.failures[..stats.failures.len().min(10)],
        s.logs()
    );
}
