//! Benchmark of one `healthcheck` replica at fleet scale: N instances (default 10,000) spread
//! over 127.0.0.x addresses and ports served by a few cheap listeners, probed every second.
//! Reports the CPU the checker uses (utime + stime from /proc/<pid>/stat over a window), the
//! probe rate the backends saw, and etcd writes per second in steady state (growth of etcd's
//! revision, which every write bumps and nothing else does).
//!
//! Usage: healthcheck_scale <path/to/healthcheck> [instances] [window-seconds]
//! (bench/healthcheck-scale.sh builds everything in release mode and runs it.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use catalog::store::{Op, Store};
use catalog::{EtcdStore, Keyspace};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wharf_tests::EtcdServer;

const ADDRESSES: u8 = 20;
const PORTS_PER_ADDRESS: usize = 5;
const SERVICES: usize = 10;

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (utime, stime) of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // USER_HZ is 100 on every Linux configuration that matters here.
    Ok((f[11].parse::<f64>()? / 100.0, f[12].parse::<f64>()? / 100.0))
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn serve(listener: TcpListener, hits: Arc<AtomicU64>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let hits = hits.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let mut seen = 0;
            loop {
                match s.read(&mut buf[seen..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen += n,
                }
                if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") || seen == buf.len() {
                    break;
                }
            }
            hits.fetch_add(1, Ordering::Relaxed);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        });
    }
}

async fn count_passing(store: &EtcdStore, ks: &Keyspace) -> Result<usize> {
    let listing = store.list(&[ks.services()]).await?;
    Ok(listing
        .kvs
        .iter()
        .filter(|kv| kv.key.windows(8).any(|w| w == b"/health/"))
        .filter(|kv| kv.value.windows(9).any(|w| w == b"\"passing\""))
        .count())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .context("usage: healthcheck_scale <healthcheck binary> [instances] [window-seconds]")?;
    let instances: usize = args.get(2).map_or(Ok(10_000), |s| s.parse())?;
    let window = Duration::from_secs(args.get(3).map_or(Ok(20), |s| s.parse())?);

    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let ks = Keyspace::default();

    // Listeners: 127.0.0.1..=20, 5 ports each.
    let hits = Arc::new(AtomicU64::new(0));
    let mut endpoints = Vec::new();
    for a in 1..=ADDRESSES {
        for _ in 0..PORTS_PER_ADDRESS {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, a));
            let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
            endpoints.push(l.local_addr()?);
            tokio::spawn(serve(l, hits.clone()));
        }
    }

    // Catalog: SERVICES services, instances spread over every listener, 1 s HTTP checks.
    for s in 0..SERVICES {
        let cfg =
            serde_json::json!({"check": {"path": "/healthz", "interval": "1s", "timeout": "1s"}});
        store
            .put(
                &ks.config(&format!("svc{s}").parse()?),
                cfg.to_string().into_bytes(),
                None,
            )
            .await?;
    }
    let started = Instant::now();
    let mut ops = Vec::new();
    for i in 0..instances {
        let ep = endpoints[i % endpoints.len()];
        let svc = format!("svc{}", i % SERVICES);
        let id = format!("n{}-app-{i}-{}", i % 50, ep.port());
        let v = serde_json::json!({
            "id": id, "service": svc, "version": "v1", "node": format!("n{}", i % 50),
            "addr": ep.ip(), "port": ep.port(),
        });
        ops.push(Op::Put {
            key: ks.instance(&svc.parse()?, &id.parse()?),
            value: v.to_string().into_bytes(),
            lease: None,
        });
        if ops.len() == 100 {
            store.txn(vec![], std::mem::take(&mut ops)).await?;
        }
    }
    if !ops.is_empty() {
        store.txn(vec![], ops).await?;
    }
    println!(
        "registered {instances} instances on {} listeners in {:?}",
        endpoints.len(),
        started.elapsed()
    );

    let child = Command::new(bin)
        .args([
            "--etcd",
            &etcd.endpoint(),
            "--id",
            "bench-hc",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(args.iter().skip(4))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let checker = Guard(child);
    let pid = checker.0.id();

    let started = Instant::now();
    let mut passing;
    loop {
        passing = count_passing(&store, &ks).await?;
        if passing == instances || started.elapsed() > Duration::from_secs(90) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "{passing} of {instances} passing {:?} after start",
        started.elapsed()
    );
    // Let the start-up write burst settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (cpu0, rev0, hits0, t0) = (
        cpu_seconds(pid)?,
        store.revision().await?,
        hits.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (cpu1, rev1, hits1, t1) = (
        cpu_seconds(pid)?,
        store.revision().await?,
        hits.load(Ordering::Relaxed),
        Instant::now(),
    );
    let secs = (t1 - t0).as_secs_f64();
    println!("window {secs:.1} s, steady state:");
    let (user, sys) = ((cpu1.0 - cpu0.0) / secs, (cpu1.1 - cpu0.1) / secs);
    println!(
        "  checker CPU      {:.1} % of one core (user {:.1} %, system {:.1} %)",
        (user + sys) * 100.0,
        user * 100.0,
        sys * 100.0
    );
    println!("  probes answered  {:.0} /s", (hits1 - hits0) as f64 / secs);
    println!("  etcd writes      {:.2} /s", (rev1 - rev0) as f64 / secs);
    println!("  checker RSS      {:.1} MiB", rss_mib(pid));
    println!(
        "  passing marks    {} of {instances}",
        count_passing(&store, &ks).await?
    );
    drop(checker);
    Ok(())
}
