//! Shared pieces of the checker's integration tests: a real HTTP backend whose answers can
//! be switched at run time and which logs every probe, an in-process checker, and etcd
//! helpers.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use catalog::model::now_millis;
use catalog::store::{KeyValue, Store};
use catalog::{CheckerId, EtcdStore, Health, Keyspace};
use healthcheck::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(20);

/// One probe as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub instance: String,
    pub checker: String,
    /// When the answer was sent (ms since the epoch).
    pub at_ms: u64,
    pub status: u16,
}

#[derive(Default)]
struct BackendState {
    status: AtomicU16,
    delay_ms: AtomicU64,
    in_flight: AtomicUsize,
    script: Mutex<VecDeque<u16>>,
    log: Mutex<Vec<Seen>>,
    /// While true, answers wait (see [`Backend::hold`]).
    hold: tokio::sync::watch::Sender<bool>,
}

/// A real HTTP/1.1 server on 127.0.0.1. Each request gets the next scripted status, else
/// the current one (chosen when the request arrives), after the current delay.
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(status: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(BackendState::default());
        state.status.store(status, Ordering::SeqCst);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(handle(stream, st.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn script(&self, statuses: &[u16]) {
        self.state.script.lock().unwrap().extend(statuses);
    }

    /// Holds every answer (requests already read and new ones) until released.
    pub fn hold(&self, on: bool) {
        self.state.hold.send_replace(on);
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Every probe answered so far.
    pub fn log(&self) -> Vec<Seen> {
        self.state.log.lock().unwrap().clone()
    }

    /// Probes answered for one instance.
    pub fn probes_of(&self, instance: &str) -> Vec<Seen> {
        self.log()
            .into_iter()
            .filter(|s| s.instance == instance)
            .collect()
    }
}

async fn handle(mut stream: TcpStream, state: Arc<BackendState>) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let scripted = state.script.lock().unwrap().pop_front();
    let status = scripted.unwrap_or_else(|| state.status.load(Ordering::SeqCst));
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let _ = state.hold.subscribe().wait_for(|held| !*held).await;
    let reply = format!("HTTP/1.1 {status} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let sent = stream.write_all(reply.as_bytes()).await.is_ok();
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    if sent {
        state.log.lock().unwrap().push(Seen {
            instance: header("x-wharf-instance"),
            checker: header("x-wharf-checker"),
            at_ms: now_millis(),
            status,
        });
    }
}

/// A checker running in this process, stopped cleanly by [`Checker::stop`] or, like a crash,
/// when dropped.
pub struct Checker {
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checker {
    pub async fn start(store: EtcdStore, settings: Settings) -> Result<Self> {
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let addr = admin.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(healthcheck::run(store, settings, admin, async {
            let _ = rx.await;
        }));
        Ok(Self {
            admin: addr,
            stop: Some(tx),
            task,
        })
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    pub async fn metrics(&self) -> Result<String> {
        scrape(self.admin).await
    }
}

/// `GET /metrics` over a plain TCP connection.
pub async fn scrape(admin: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of one sample line (`name{labels} value`), if present.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Test settings: short lease, quick watch.
pub fn settings(id: &str, ttl: Duration) -> Settings {
    let mut s = Settings::new(CheckerId::new(id).unwrap());
    s.lease_ttl = ttl;
    s.watch_progress_interval = Duration::from_millis(300);
    s
}

pub fn ks() -> Keyspace {
    Keyspace::default()
}

pub fn instance_key(svc: &str, id: &str) -> String {
    ks().instance(&svc.parse().unwrap(), &id.parse().unwrap())
}

pub fn health_key(svc: &str, id: &str) -> String {
    ks().health(&svc.parse().unwrap(), &id.parse().unwrap())
}

/// Registers an HTTP instance on 127.0.0.1:`port`; returns the put's revision.
pub async fn put_instance(store: &EtcdStore, svc: &str, id: &str, port: u16) -> Result<i64> {
    put_instance_json(
        store,
        svc,
        id,
        serde_json::json!({
            "id": id, "service": svc, "version": "v1", "node": "n1",
            "addr": "127.0.0.1", "port": port,
        }),
    )
    .await
}

pub async fn put_instance_json(
    store: &EtcdStore,
    svc: &str,
    id: &str,
    v: serde_json::Value,
) -> Result<i64> {
    Ok(store
        .put(&instance_key(svc, id), v.to_string().into_bytes(), None)
        .await?)
}

pub async fn put_check(store: &EtcdStore, svc: &str, check: serde_json::Value) -> Result<()> {
    let key = ks().config(&svc.parse().unwrap());
    let v = serde_json::json!({ "check": check });
    store.put(&key, v.to_string().into_bytes(), None).await?;
    Ok(())
}

/// The mark of an instance and its raw key/value (for the lease and revisions).
pub async fn health(store: &EtcdStore, svc: &str, id: &str) -> Option<(Health, KeyValue)> {
    let kv = store.get(&health_key(svc, id)).await.ok()??;
    let h = serde_json::from_slice(&kv.value).ok()?;
    Some((h, kv))
}

/// Every version the mark of an instance has had since etcd started, oldest first, up to
/// the one written at revision `until` (a replay of the key's history through a watch from
/// revision 1; the test servers never compact). Deletes are left out.
pub async fn mark_history(
    store: &EtcdStore,
    svc: &str,
    id: &str,
    until: catalog::store::Revision,
) -> Result<Vec<Health>> {
    use catalog::store::{EventKind, WatchMessage, WatchSession};
    let key = health_key(svc, id);
    let mut watch = store.watch(&[(key.clone(), 1)]).await?;
    let mut marks = Vec::new();
    let mut seen = 0;
    while seen < until {
        let msg = tokio::time::timeout(WAIT, watch.next())
            .await
            .map_err(|_| anyhow::anyhow!("mark history: nothing up to revision {until}"))??;
        match msg {
            Some(WatchMessage::Events { events, .. }) => {
                for e in events.into_iter().filter(|e| e.kv.key == key.as_bytes()) {
                    seen = seen.max(e.kv.mod_revision);
                    if e.kind == EventKind::Put {
                        marks.push(serde_json::from_slice(&e.kv.value)?);
                    }
                }
            }
            Some(WatchMessage::Canceled { reason, .. }) => {
                anyhow::bail!("mark history: watch canceled: {reason}")
            }
            Some(_) => {}
            None => anyhow::bail!("mark history: watch closed"),
        }
    }
    Ok(marks)
}

/// Waits until the mark of an instance satisfies `pred`.
pub async fn wait_mark(
    store: &EtcdStore,
    svc: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&Health) -> bool,
) -> Result<(Health, KeyValue)> {
    wharf_tests::eventually(what, WAIT, || async {
        health(store, svc, id).await.filter(|(h, _)| pred(h))
    })
    .await
}
