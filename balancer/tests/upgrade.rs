//! Zero-downtime self-upgrade of the real binary under continuous HTTP load: `balancer
//! upgrade` (control socket), then SIGUSR2 on the new process. Zero failed requests, the
//! old process finishes its in-flight request and exits, the new one serves — and from
//! the moment it is ready, it alone answers the admin port.

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

/// `GET path` on a new admin connection: (status, the `x-balancer-pid` that answered).
async fn admin_get(port: u16, path: &str) -> Result<(u16, i32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(common::WAIT, s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .context("status")?;
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("x-balancer-pid: "))
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("no pid in {text:.200}"))?;
    Ok((status, pid))
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
    let slow_url = lb.url("/slow/3000");
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

    // The old process is still draining, but the admin port is the new one's alone.
    assert_eq!(admin_get(lb.admin, "/healthz").await?.1, second);
    for _ in 0..10 {
        for path in ["/healthz", "/metrics"] {
            assert_eq!(admin_get(lb.admin, path).await?, (200, second), "{path}");
        }
        // (503 until the new process's first status sample, a second after its start.)
        assert_eq!(admin_get(lb.admin, "/api/status").await?.1, second);
    }
    assert!(
        alive(first),
        "the old process was expected to be still draining"
    );

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

/// The balancer as PID 1 of its own pid namespace (one process per container): after an
/// upgrade the old process stays as the parent, the new one serves, and a SIGTERM to
/// PID 1 is forwarded, drains the new process, and ends the "container" with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_the_old_process_stays_as_parent() -> Result<()> {
    let backend = Backend::start("web").await?;
    let dir = tempfile::tempdir()?;
    let (port, admin) = (wharf_tests::free_port()?, wharf_tests::free_port()?);
    let ctl = dir.path().join("ctl.sock");
    let config = dir.path().join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "shutdown_timeout = \"5s\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n[upgrade]\nsocket = \"{}\"\npid_file = \"{}\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\n  [[listener.route]]\n  service = \"web\"\n[[service]]\nname = \"web\"\n  [[service.endpoint]]\n  addr = \"{}\"\n",
            ctl.display(),
            dir.path().join("pid").display(),
            backend.addr
        ),
    )?;
    let log = dir.path().join("log");
    let mut ns = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_balancer"))
        .arg("--config")
        .arg(&config)
        .args(["--threads", "1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.path().join("log.err"))?)
        .spawn()?;
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let unshare_pid = ns.id();
    let ns = Reap(&mut ns);
    let logs = || {
        std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(dir.path().join("log.err")).unwrap_or_default()
    };
    let client = common::client();
    let url = format!("http://127.0.0.1:{port}/");
    wharf_tests::eventually("balancer up", common::WAIT, || async {
        matches!(get_with(&client, &url).await, Ok((StatusCode::OK, _))).then_some(())
    })
    .await
    .map_err(|e| e.context(logs()))?;
    // PID 1's pid outside the namespace: unshare's only child.
    let init: i32 =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))?
            .trim()
            .parse()?;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_balancer"))
        .arg("--config")
        .arg(&config)
        .arg("upgrade")
        .output()?;
    assert!(out.status.success(), "{}", logs());
    // PID 1 drains (nothing in flight) and stays; the new process serves.
    wharf_tests::eventually("PID 1 stays as parent", common::WAIT, || async {
        logs()
            .contains("PID 1: staying as the parent")
            .then_some(())
    })
    .await
    .map_err(|e| e.context(logs()))?;
    assert!(alive(init), "{}", logs());
    for _ in 0..20 {
        assert_eq!(get_with(&client, &url).await?.0, StatusCode::OK);
    }

    // SIGTERM to PID 1 reaches the serving process; the namespace ends cleanly.
    kill(Pid::from_raw(init), Signal::SIGTERM)?;
    let deadline = std::time::Instant::now() + common::WAIT;
    let status = loop {
        if let Some(st) = ns.0.try_wait()? {
            break st;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "namespace still running\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}\n{}", logs());
    Ok(())
}
