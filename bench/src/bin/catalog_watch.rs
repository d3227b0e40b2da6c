//! Benchmark of the catalog Watcher against a real etcd (not a test; prints figures).
//!
//! 1. Loads N instances (default 100,000) into a fresh etcd, then times the Watcher's initial
//!    list: from spawn to the `Reset` holding every instance.
//! 2. Sustained event rate: a writer puts M keys (default 20,000) as fast as etcd takes them,
//!    with K concurrent puts; reports puts/s acknowledged and puts/s seen by the watcher.
//! 3. Put → seen latency: P sequential puts, time until the watcher delivers each.
//!
//! Usage: cargo run --release -p wharf-bench --bin catalog_watch [-- N M K P]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use catalog::store::{Op, Store};
use catalog::watch::WatchConfig;
use catalog::{Diff, EtcdStore, Keyspace, Watcher};
use wharf_tests::EtcdServer;

fn instance(i: usize) -> (String, Vec<u8>) {
    let ks = Keyspace::default();
    let svc = format!("svc-{}", i % 100);
    let id = format!("n{}-c{}-8080", i % 50, i);
    let key = ks.instance(&svc.parse().unwrap(), &id.parse().unwrap());
    let value = serde_json::json!({
        "id": id, "service": svc, "version": if i.is_multiple_of(10) { "v2" } else { "v1" },
        "node": format!("n{}", i % 50),
        "addr": format!("127.0.{}.{}", (i >> 8) & 0xff, i & 0xff), "port": 8080,
        "weight": 100, "state": "serving", "tags": ["bench"],
    });
    (key, value.to_string().into_bytes())
}

async fn load(store: &EtcdStore, n: usize) -> Result<()> {
    // etcd accepts at most 128 operations per transaction by default.
    let batches: Vec<Vec<usize>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(128)
        .map(<[usize]>::to_vec)
        .collect();
    let store = Arc::new(store.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in batches.chunks(batches.len().div_ceil(8)) {
        let chunk = chunk.to_vec();
        let store = store.clone();
        tasks.spawn(async move {
            for batch in chunk {
                let ops = batch
                    .into_iter()
                    .map(|i| {
                        let (key, value) = instance(i);
                        Op::Put {
                            key,
                            value,
                            lease: None,
                        }
                    })
                    .collect();
                store.txn(vec![], ops).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

fn watcher(store: EtcdStore) -> Watcher {
    let ks = Keyspace::default();
    Watcher::spawn(store, ks.clone(), WatchConfig::new(vec![ks.services()]))
}

fn count_puts(diffs: &[Diff]) -> usize {
    diffs.iter().filter(|d| matches!(d, Diff::Put(_))).count()
}

fn arg(args: &[String], i: usize, default: usize) -> Result<usize> {
    args.get(i)
        .map(|s| s.parse().with_context(|| format!("argument {i}: {s:?}")))
        .unwrap_or(Ok(default))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = arg(&args, 0, 100_000)?;
    let m = arg(&args, 1, 20_000)?;
    let k = arg(&args, 2, 64)?;
    let p = arg(&args, 3, 500)?;

    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let t = Instant::now();
    load(&store, n).await?;
    println!("loaded {n} instances in {:.2?}", t.elapsed());

    // 1. Initial list.
    let t = Instant::now();
    let mut w = watcher(store.clone());
    let first = w.next().await.context("watcher stopped")?;
    let list_time = t.elapsed();
    let Some(Diff::Reset(snapshot)) = first.diffs.first() else {
        bail!("first update is not a Reset");
    };
    if snapshot.entries.len() != n {
        bail!("listed {} of {n} instances", snapshot.entries.len());
    }
    println!(
        "initial list of {n} instances: {:.0} ms ({:.0} instances/s decoded)",
        list_time.as_secs_f64() * 1e3,
        n as f64 / list_time.as_secs_f64()
    );

    // 2. Sustained event rate.
    let t = Instant::now();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for lane in 0..k {
                let store = store.clone();
                tasks.spawn(async move {
                    for i in (lane..m).step_by(k) {
                        let (key, value) = instance(n + i);
                        store.put(&key, value, None).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            anyhow::Ok(Instant::now())
        })
    };
    let mut seen = 0;
    while seen < m {
        let u = tokio::time::timeout(Duration::from_secs(60), w.next())
            .await
            .context("watcher stalled")?
            .context("watcher stopped")?;
        seen += count_puts(&u.diffs);
    }
    let seen_time = t.elapsed();
    let acked_time = writer.await??.duration_since(t);
    println!(
        "sustained: {m} puts ({k} concurrent) acknowledged at {:.0} puts/s, seen by the watcher at {:.0} puts/s",
        m as f64 / acked_time.as_secs_f64(),
        m as f64 / seen_time.as_secs_f64()
    );

    // 3. Put → seen latency.
    let mut lat = Vec::with_capacity(p);
    for i in 0..p {
        let (key, value) = instance(n + m + i);
        let t = Instant::now();
        store.put(&key, value, None).await?;
        loop {
            let u = w.next().await.context("watcher stopped")?;
            if count_puts(&u.diffs) > 0 {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "put -> seen over {p} sequential puts: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    let stats = w.stats();
    println!(
        "watcher stats: resets {}, events {}, malformed {}, reconnects {}",
        stats.resets(),
        stats.events(),
        stats.malformed(),
        stats.reconnects()
    );
    Ok(())
}
