//! `busy_polling = true`: the worker spins (about a core of CPU time) while a client
//! connection is open and sleeps again once none is; without it an open connection costs
//! no CPU. Measured on the real binary from its CPU time in /proc.
mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_spins_while_a_connection_is_open_and_sleeps_without() -> Result<()> {
    let b = Backend::start("b1").await?;
    let lb = Lb::start(&config(&b.addr.to_string(), true)).await?;
    let (status, body) = get_with(&client(), &lb.url("/")).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "b1"));

    // The client's pooled connection above may still be open: wait for it to go, then
    // there is nothing to spin for.
    wait_share(lb.pid(), "idle", |s| s < 0.15).await?;
    let conn = TcpStream::connect(("127.0.0.1", lb.port))?;
    // Spinning: most of a core even on a loaded machine (an idle worker uses ~0).
    let busy = wait_share(lb.pid(), "one idle connection open", |s| s > 0.4).await?;
    drop(conn);
    let after = wait_share(lb.pid(), "connection closed", |s| s < 0.15).await?;
    eprintln!("CPU share: {busy:.2} with a connection open, {after:.2} after it closed");
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
