//! `busy_polling = true`: the worker spins (about a core of CPU time) while traffic flows
//! and sleeps once no connection is open or the open ones have been silent for 100 ms;
//! without it an open connection costs no CPU. Measured on the real binary from its CPU
//! time in /proc.
mod common;
mod l4kit;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use common::*;
use l4kit::Echo;

/// The process's CPU time over a 400 ms window, as a share of one core.
async fn cpu_share(pid: i32) -> Result<f64> {
    let cpu = || -> Result<f64> {
        let (user, system) = wharf_tests::cpu_seconds(pid as u32)?;
        Ok(user + system)
    };
    let (t0, c0) = (Instant::now(), cpu()?);
    tokio::time::sleep(Duration::from_millis(400)).await;
    Ok((cpu()? - c0) / t0.elapsed().as_secs_f64())
}

/// Waits until a window's CPU share satisfies `ok`; that share.
async fn wait_share(pid: i32, what: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    wharf_tests::eventually(what, WAIT, || async {
        cpu_share(pid).await.ok().filter(|&s| ok(s))
    })
    .await
}

fn config(addr: &str, busy: bool) -> String {
    format!("busy_polling = {busy}\n{}", one_service_config(addr))
}

/// What a [`Trickle`] does next.
const SEND: u8 = 0;
const HOLD: u8 = 1;
const CLOSE: u8 = 2;

/// One client connection that exchanges a message every 20 ms while told `SEND`, keeps
/// the connection open and silent on `HOLD`, and closes it on `CLOSE` (a thread with
/// blocking I/O, so that it costs the balancer's process nothing but the traffic).
struct Trickle {
    mode: Arc<AtomicU8>,
    thread: std::thread::JoinHandle<Result<u64>>,
}

impl Trickle {
    /// `greeting`: read one line first (the TCP echo backend's greeting); then `message`
    /// is written and read until the answer ends with `answer_end`.
    fn start(port: u16, greeting: bool, message: &'static [u8], answer_end: &'static [u8]) -> Self {
        let mode = Arc::new(AtomicU8::new(SEND));
        let m = mode.clone();
        let thread = std::thread::spawn(move || -> Result<u64> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let read_until = |s: &mut TcpStream, end: &[u8]| -> Result<()> {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.ends_with(end) {
                    let n = s.read(&mut buf)?;
                    anyhow::ensure!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                    got.extend_from_slice(&buf[..n]);
                }
                Ok(())
            };
            if greeting {
                read_until(&mut s, b"\n")?;
            }
            let mut exchanged = 0;
            loop {
                match m.load(Ordering::Relaxed) {
                    SEND => {
                        s.write_all(message)?;
                        read_until(&mut s, answer_end)?;
                        exchanged += 1;
                    }
                    HOLD => {}
                    _ => return Ok(exchanged),
                }
                // Pacing, not waiting for a condition: a message every 20 ms.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { mode, thread }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::Relaxed);
    }

    /// Closes the connection; how many messages went both ways.
    fn close(self) -> Result<u64> {
        self.set(CLOSE);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("trickle thread panicked"))?
    }
}

/// `balancer_busy_polling_workers` on the admin port.
async fn spinning_workers(lb: &Lb) -> Result<f64> {
    let text = lb.metrics().await?;
    sample(&text, "balancer_busy_polling_workers").context("no busy polling gauge")
}

/// The spinning cycle on one listener: asleep with no connection; spinning (most of a
/// core, where a message every 20 ms costs an idle worker ~0) while messages flow; asleep
/// again once the connection has been silent for `IDLE_AFTER` (100 ms) although it stays
/// open; spinning again at the next message; asleep after the close.
async fn spins_only_while_traffic_flows(lb: &Lb, trickle: Trickle) -> Result<()> {
    let pid = lb.pid();
    let flowing = wait_share(pid, "a message every 20 ms", |s| s > 0.4).await?;
    // The gauge tells operators why the process uses a core (one worker: `--threads 1`).
    assert_eq!(spinning_workers(lb).await?, 1.0);
    trickle.set(HOLD);
    let held = wait_share(pid, "the connection open and silent", |s| s < 0.15).await?;
    assert_eq!(spinning_workers(lb).await?, 0.0);
    trickle.set(SEND);
    let again = wait_share(pid, "messages again", |s| s > 0.4).await?;
    let exchanged = trickle.close()?;
    assert!(exchanged > 10, "only {exchanged} messages went through");
    let closed = wait_share(pid, "connection closed", |s| s < 0.15).await?;
    eprintln!(
        "CPU share: {flowing:.2} flowing, {held:.2} silent, {again:.2} flowing again, \
         {closed:.2} closed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_spins_while_traffic_flows_on_http_and_tcp_listeners() -> Result<()> {
    let web = Backend::start("b1").await?;
    let echo = Echo::start("e1", false).await?;
    let tcp_port = wharf_tests::free_port()?;
    let config = format!(
        r#"{}
[[listener]]
name = "echo"
bind = "127.0.0.1:{tcp_port}"
protocol = "tcp"
service = "echo"
[[service]]
name = "echo"
  [[service.endpoint]]
  addr = "{}"
"#,
        config(&web.addr.to_string(), true),
        echo.addr
    );
    let lb = Lb::start(&config).await?;
    let (status, body) = get_with(&client(), &lb.url("/")).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "b1"));
    // The client's pooled connection above may still be open: wait for it to go, then
    // there is nothing to spin for.
    wait_share(lb.pid(), "no connection", |s| s < 0.15).await?;

    let http = Trickle::start(lb.port, false, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", b"b1");
    spins_only_while_traffic_flows(&lb, http).await?;
    let tcp = Trickle::start(tcp_port, true, b"ping\n", b"ping\n");
    spins_only_while_traffic_flows(&lb, tcp).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_busy_polling_an_open_connection_costs_no_cpu_and_a_reload_keeps_it_off()
-> Result<()> {
    let b = Backend::start("b1").await?;
    let lb = Lb::start(&config(&b.addr.to_string(), false)).await?;
    let _conn = TcpStream::connect(("127.0.0.1", lb.port))?;
    // Several windows, each far below a spinning worker's share.
    for _ in 0..3 {
        let share = cpu_share(lb.pid()).await?;
        assert!(share < 0.15, "CPU share {share:.2} with busy_polling off");
    }
    // Read at start only: a SIGHUP that turns it on says so and applies the rest.
    lb.write_config(&config(&b.addr.to_string(), true))?;
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    lb.reloads("ok", 1.0).await?;
    assert!(
        lb.log().contains("take effect at the next start"),
        "{}",
        lb.log()
    );
    let share = cpu_share(lb.pid()).await?;
    assert!(share < 0.15, "CPU share {share:.2} after the reload");
    Ok(())
}
