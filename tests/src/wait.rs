//! Waiting for conditions with a deadline, never sleeping and hoping.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of a workspace binary (`balancer`, `healthcheck`, `registrar`, `render`) built by the
/// same `cargo test --workspace` run: it sits in the target profile directory, one level
/// above the test executable's `deps/`. Inside the binary's own package, prefer
/// `env!("CARGO_BIN_EXE_<name>")`.
pub fn workspace_bin(name: &str) -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not built; run `cargo build --workspace` (cargo test --workspace builds it)",
            path.display()
        );
    }
    Ok(path)
}
