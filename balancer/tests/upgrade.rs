//! Zero-downtime self-upgrade of the real binary under continuous HTTP load: `balancer
//! upgrade` (control socket), then SIGUSR2 on the new process. Zero failed requests, the
//! old process finishes its in-flight request and exits, the new one serves.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{Backend, Lb, Load, get_with};
use hyper::StatusCode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills a process that is not our child (the upgraded balancer) when dropped.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// Running (not exited, not a zombie waiting to be reaped).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_drops_nothing() -> Result<()> {
    let backend = Backend::start("web").await?;
    let dir = tempfile::tempdir()?;
    let ctl = dir.path().join("ctl.sock");
    let pid_file = dir.path().join("balancer.pid");
    let config = format!(
        r#"
shutdown_timeout = "10s"
[admin]
bind = "127.0.0.1:@ADMIN@"
[upgrade]
socket = "{}"
pid_file = "{}"
ready_timeout = "15s"
[[listener]]
name = "web"
bind = "127.0.0.1:@PORT@"
  [[listener.route]]
  service = "web"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "{}"
"#,
        ctl.display(),
        pid_file.display(),
        backend.addr
    );
    let mut lb = Lb::start(&config).await?;
    let first = lb.pid();
    wharf_tests::eventually("pid file", common::WAIT, || async {
        (read_pid(&pid_file) == Some(first)).then_some(())
    })
    .await?;
    let load = Load::start(lb.url("/"), 4);
    wharf_tests::eventually("load running", common::WAIT, || async {
        (load.stats.ok.load(std::sync::atomic::Ordering::Relaxed) > 50).then_some(())
    })
    .await?;

    // A request in flight on the old process when it hands over: it must complete.
    let slow_url = lb.url("/slow/1500");
    let slow = tokio::spawn(async move { get_with(&common::client(), &slow_url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let config_path = lb.config_path();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_balancer"))
            .arg("--config")
            .arg(&config_path)
            .arg("upgrade")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lb.log()
    );
    let second: i32 = stdout
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .context("pid in the output")?;
    let _second_guard = KillOnDrop(second);
    assert_ne!(second, first);
    assert_eq!(read_pid(&pid_file), Some(second));

    // The old process drains (the slow request finishes) and exits cleanly.
    let (status, body) = slow.await??;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web"));
    assert_eq!(
        lb.wait_exit(Duration::from_secs(15)).await?,
        Some(0),
        "{}",
        lb.log()
    );
    assert!(alive(second));

    // The new process serves alone now.
    let ok_then = load.stats.ok.load(std::sync::atomic::Ordering::Relaxed);
    wharf_tests::eventually("served by the new process", common::WAIT, || async {
        (load.stats.ok.load(std::sync::atomic::Ordering::Relaxed) > ok_then + 100).then_some(())
    })
    .await?;

    // Again with SIGUSR2 on the new process.
    kill(Pid::from_raw(second), Signal::SIGUSR2)?;
    let third = wharf_tests::eventually("third process ready", common::WAIT, || async {
        read_pid(&pid_file).filter(|p| *p != second)
    })
    .await?;
    let _third_guard = KillOnDrop(third);
    wharf_tests::eventually("second process exits", common::WAIT, || async {
        (!alive(second)).then_some(())
    })
    .await?;
    let ok_then = load.stats.ok.load(std::sync::atomic::Ordering::Relaxed);
    wharf_tests::eventually("served by the third process", common::WAIT, || async {
        (load.stats.ok.load(std::sync::atomic::Ordering::Relaxed) > ok_then + 100).then_some(())
    })
    .await?;
    assert!(alive(third));

    let stats = load.stop().await;
    let failed = stats.failed.load(std::sync::atomic::Ordering::Relaxed);
    let ok = stats.ok.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{ok} ok, errors: {:?}\n{}",
        stats.errors.lock().unwrap(),
        lb.log()
    );
    // The admin port came along too.
    let (st, _) = get_with(
        &common::client(),
        &format!("http://127.0.0.1:{}/healthz", lb.admin),
    )
    .await?;
    assert_eq!(st, StatusCode::OK);
    let log = lb.log();
    assert!(log.contains("upgrade: received listening sockets"), "{log}");
    Ok(())
}
