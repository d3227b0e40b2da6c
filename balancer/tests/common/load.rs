//! Client load for the end-to-end tests: `Load` keeps GETs going while a test changes
//! the fleet and counts every answer by the backend that gave it (and every failure, with
//! its reason); `spread` sends a fixed number and returns the counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, bail};
use hyper::StatusCode;

use super::{client, get_with};

/// Counts answers by backend name while `concurrency` loops send GETs.
#[derive(Default)]
pub struct LoadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub by_backend: Mutex<HashMap<String, u64>>,
    /// When each backend answered last.
    pub last_seen: Mutex<HashMap<String, Instant>>,
    pub first_seen: Mutex<HashMap<String, Instant>>,
    pub errors: Mutex<Vec<String>>,
}

impl LoadStats {
    pub fn count(&self, name: &str) -> u64 {
        self.by_backend
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

pub struct Load {
    pub stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: String, concurrency: usize) -> Self {
        let stats = Arc::new(LoadStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let client = client();
        let tasks = (0..concurrency)
            .map(|_| {
                let (stats, stop, client, url) =
                    (stats.clone(), stop.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match get_with(&client, &url).await {
                            Ok((StatusCode::OK, body)) => {
                                stats.ok.fetch_add(1, Ordering::Relaxed);
                                let now = Instant::now();
                                *stats
                                    .by_backend
                                    .lock()
                                    .unwrap()
                                    .entry(body.clone())
                                    .or_default() += 1;
                                stats.last_seen.lock().unwrap().insert(body.clone(), now);
                                stats.first_seen.lock().unwrap().entry(body).or_insert(now);
                            }
                            Ok((code, body)) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                stats.errors.lock().unwrap().push(format!("{code}: {body}"));
                            }
                            Err(e) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                stats.errors.lock().unwrap().push(format!("{e:#}"));
                            }
                        }
                    }
                })
            })
            .collect();
        Self { stats, stop, tasks }
    }

    pub async fn stop(self) -> Arc<LoadStats> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.stats
    }
}

/// Sends `n` GETs with `concurrency` in flight; answers per backend name.
pub async fn spread(url: &str, n: usize, concurrency: usize) -> Result<HashMap<String, u64>> {
    let client = client();
    let counts = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, counts, next, url) =
            (client.clone(), counts.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                let (code, body) = get_with(&client, &url).await?;
                if code != StatusCode::OK {
                    bail!("{code}: {body}");
                }
                *counts.lock().unwrap().entry(body).or_default() += 1;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let c = counts.lock().unwrap().clone();
    Ok(c)
}
