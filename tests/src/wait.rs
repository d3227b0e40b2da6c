//! Waiting for conditions with a deadline, never sleeping and hoping.

use std::future::Future;
use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

/// A loopback TCP port that was free a moment ago, taken from just below the kernel's
/// ephemeral port range and never handed out twice by this process.
///
/// Why not `bind(0)`: that returns a port from the ephemeral range, and between this call
/// and the moment a test's server binds it, any outgoing connection of a test running in
/// parallel (load generators make thousands) may get it as its local port — the server
/// then fails with EADDRINUSE. The kernel never picks ports outside the range for
/// outgoing connections, so ports below it only collide with listeners, which the bind
/// check here sees.
pub fn free_port() -> Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let (low, span) = port_block();
    // A different starting point per process: test binaries that run one after the other
    // do not reuse each other's ports while old sockets linger in TIME_WAIT.
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (std::process::id().wrapping_mul(7919) ^ nanos) % span
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The block of ports [low, low + span) just below the ephemeral range (Linux default
/// 32768–60999 → 20768–32767).
fn port_block() -> (u32, u32) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(12_000).max(1024);
    (low, ephemeral_low.saturating_sub(low).max(1))
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
