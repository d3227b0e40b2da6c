//! Benchmark of one `healthcheck` replica at fleet scale: N instances (default 10,000) spread
//! over 127.0.0.x addresses and ports served by a few cheap listeners, probed every second.
//! Reports the CPU the checker uses (utime + stime from /proc/<pid>/stat over a window), the
//! probe rate the backends saw, and etcd writes per second in steady state (growth of etcd's
//! revision, which every write bumps and nothing else does).
//!
//! The window starts only once every instance is passing (steady state: nothing should be
//! written), and the checker's own counters (scraped from its /metrics) say what it did in
//! it: probes by result, probes discarded by the starved-checker guard, mark writes.
//!
//! `FLOOR=1` runs no checker: one thread makes the probes' bare system calls at the same
//! rate, which measures what the kernel alone costs per probe on this box.
//!
//! Usage: [CHECK=tcp] [FLOOR=1] healthcheck_scale <path/to/healthcheck> [instances] [window-seconds]
//! [checker args…]
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
use tokio::net::{TcpListener, TcpStream};
use wharf_tests::{EtcdServer, cpu_seconds, free_port, stat_cpu_seconds};

const ADDRESSES: u8 = 20;
const PORTS_PER_ADDRESS: usize = 5;
const SERVICES: usize = 10;
/// How long the checker may take to mark every instance passing.
const STEADY_WAIT: Duration = Duration::from_secs(180);

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `VmRSS:`/`VmHWM:` line of /proc/<pid>/status, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
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

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The checker's counters that matter here, summed over their labels.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    pass: f64,
    fail: f64,
    timeout: f64,
    error: f64,
    discarded: f64,
    mark_writes: f64,
    stalls: f64,
    lease_losses: f64,
    passing: f64,
    pending: f64,
}

impl Counters {
    fn probes(&self) -> f64 {
        self.pass + self.fail + self.timeout + self.error
    }
}

/// Scrapes the checker's /metrics (plain HTTP/1.0, read to the end).
async fn scrape(admin: SocketAddr) -> Result<Counters> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let mut c = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let field = if name.starts_with("healthcheck_probes_total{") {
            if name.contains("result=\"pass\"") {
                &mut c.pass
            } else if name.contains("result=\"fail\"") {
                &mut c.fail
            } else if name.contains("result=\"timeout\"") {
                &mut c.timeout
            } else {
                &mut c.error
            }
        } else if name.starts_with("healthcheck_probes_discarded_total") {
            &mut c.discarded
        } else if name.starts_with("healthcheck_etcd_writes_total{") {
            &mut c.mark_writes
        } else if name.starts_with("healthcheck_stalls_total") {
            &mut c.stalls
        } else if name.starts_with("healthcheck_lease_losses_total") {
            &mut c.lease_losses
        } else if name == "healthcheck_instances{state=\"passing\"}" {
            &mut c.passing
        } else if name == "healthcheck_instances{state=\"pending\"}" {
            &mut c.pending
        } else {
            continue;
        };
        *field += v;
    }
    Ok(c)
}

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu_seconds() -> Result<f64> {
    let (user, system) = stat_cpu_seconds("/proc/thread-self/stat")?;
    Ok(user + system)
}

/// The kernel's share, measured without the checker: one thread making exactly the system
/// calls of the checker's fast path (`socket`, `setsockopt` zero linger, `connect`,
/// `sendto`, `recvfrom` about a millisecond later, `close`) against the same backends, `rate`
/// probes a second for `window`. Returns (CPU seconds of the thread, probes, seconds).
fn floor(endpoints: &[SocketAddr], rate: usize, window: Duration) -> Result<(f64, u64, f64)> {
    use socket2::{Domain, Socket, Type};
    use std::io::Read;
    const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: wharf-healthcheck\r\n\
        X-Wharf-Instance: n1-app-0-1\r\nX-Wharf-Checker: bench-hc\r\nAccept: */*\r\nConnection: close\r\n\r\n";
    let per_ms = rate.div_ceil(1000);
    let mut in_flight: Vec<Socket> = Vec::new();
    let (mut next, mut probes) = (0usize, 0u64);
    let started = Instant::now();
    let cpu0 = thread_cpu_seconds()?;
    let mut tick = started;
    while started.elapsed() < window {
        // Answers to last millisecond's requests; a dropped socket is closed with a RST.
        in_flight.retain(|s| {
            let mut buf = [0u8; 32];
            match (&*s).read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                _ => {
                    probes += 1;
                    false
                }
            }
        });
        for _ in 0..per_ms {
            let addr = endpoints[next % endpoints.len()];
            next += 1;
            let s = Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None)?;
            s.set_linger(Some(Duration::ZERO))?;
            match s.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e.into()),
            }
            // A request that cannot be sent gets no answer: not kept waiting for one.
            if s.send(REQUEST).is_ok() {
                in_flight.push(s);
            }
        }
        tick += Duration::from_millis(1);
        if let Some(wait) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let cpu = thread_cpu_seconds()? - cpu0;
    Ok((cpu, probes, started.elapsed().as_secs_f64()))
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
    // CHECK=tcp: TCP connect checks instead of HTTP GETs (the backends then count nothing).
    let tcp_checks = std::env::var("CHECK").is_ok_and(|v| v == "tcp");

    // FLOOR=1: no checker, no etcd; the bare system calls of the probes (see `floor`).
    let floor_only = std::env::var("FLOOR").is_ok_and(|v| v == "1");
    let etcd = if floor_only {
        None
    } else {
        Some(EtcdServer::start()?)
    };
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
    let Some(etcd) = etcd else {
        let (endpoints, load0) = (endpoints.clone(), load_average());
        let hits0 = hits.load(Ordering::Relaxed);
        let (cpu, probes, secs) =
            tokio::task::spawn_blocking(move || floor(&endpoints, instances, window)).await??;
        println!(
            "bare probe loop, one thread, {secs:.1} s (load average {load0} at start, {} at end):",
            load_average()
        );
        println!(
            "  CPU              {:.1} % of one core, {:.1} µs per probe",
            cpu * 100.0 / secs,
            cpu * 1e6 / probes.max(1) as f64
        );
        println!(
            "  probes           {:.0} /s, {:.0} /s answered by the backends",
            probes as f64 / secs,
            (hits.load(Ordering::Relaxed) - hits0) as f64 / secs
        );
        return Ok(());
    };
    let store = etcd.store().await?;

    // Catalog: SERVICES services, instances spread over every listener, 1 s HTTP checks.
    for s in 0..SERVICES {
        let cfg = if tcp_checks {
            serde_json::json!({"check": {"interval": "1s", "timeout": "1s"}})
        } else {
            serde_json::json!({"check": {"path": "/healthz", "interval": "1s", "timeout": "1s"}})
        };
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

    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let child = Command::new(bin)
        .args([
            "--etcd",
            &etcd.endpoint(),
            "--id",
            "bench-hc",
            "--admin",
            &admin.to_string(),
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
    let mut last_report = Instant::now();
    loop {
        passing = count_passing(&store, &ks).await?;
        if passing == instances || started.elapsed() > STEADY_WAIT {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            println!(
                "  {:>3.0} s: {passing} passing, load {}",
                started.elapsed().as_secs_f64(),
                load_average()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let to_steady = started.elapsed();
    println!("{passing} of {instances} passing {to_steady:.1?} after start");
    if passing < instances {
        println!("  NOT in steady state: the figures below include start-up work");
    }
    // Let the last writes and their watch events settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let load0 = load_average();
    let (cpu0, rev0, hits0, m0, t0) = (
        cpu_seconds(pid)?,
        store.revision().await?,
        hits.load(Ordering::Relaxed),
        scrape(admin).await?,
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (cpu1, rev1, hits1, m1, t1) = (
        cpu_seconds(pid)?,
        store.revision().await?,
        hits.load(Ordering::Relaxed),
        scrape(admin).await?,
        Instant::now(),
    );
    let secs = (t1 - t0).as_secs_f64();
    let rate = |a: f64, b: f64| (b - a) / secs;
    println!(
        "window {secs:.1} s (load average {load0} at start, {} at end):",
        load_average()
    );
    let (user, sys) = ((cpu1.0 - cpu0.0) / secs, (cpu1.1 - cpu0.1) / secs);
    let probes = rate(m0.probes(), m1.probes());
    println!(
        "  checker CPU      {:.1} % of one core (user {:.1} %, system {:.1} %), {:.1} µs per probe",
        (user + sys) * 100.0,
        user * 100.0,
        sys * 100.0,
        (user + sys) * 1e6 / probes.max(1.0)
    );
    println!(
        "  probes           {probes:.0} /s by the checker (pass {:.0}, fail {:.0}, timeout {:.0}, error {:.0}, discarded {:.0}), {:.0} /s answered by the backends",
        rate(m0.pass, m1.pass),
        rate(m0.fail, m1.fail),
        rate(m0.timeout, m1.timeout),
        rate(m0.error, m1.error),
        rate(m0.discarded, m1.discarded),
        (hits1 - hits0) as f64 / secs
    );
    println!(
        "  etcd writes      {:.2} mark writes/s, {:.2} revisions/s",
        rate(m0.mark_writes, m1.mark_writes),
        (rev1 - rev0) as f64 / secs
    );
    println!(
        "  checker stalls   {:.0} (event loop woken >= 250 ms late), lease losses {:.0}",
        m1.stalls - m0.stalls,
        m1.lease_losses - m0.lease_losses
    );
    println!(
        "  checker RSS      {:.1} MiB (peak {:.1} MiB)",
        status_mib(pid, "VmRSS:"),
        status_mib(pid, "VmHWM:")
    );
    println!(
        "  passing marks    {} of {instances} (checker: {} passing, {} pending)",
        count_passing(&store, &ks).await?,
        m1.passing,
        m1.pending
    );
    drop(checker);
    Ok(())
}
