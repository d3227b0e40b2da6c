//! CPU time of a process (or thread) from `/proc`, for tests and benchmarks that measure
//! what the code under test costs.

use anyhow::{Context, Result};

/// (user, system) CPU seconds of process `pid`.
pub fn cpu_seconds(pid: u32) -> Result<(f64, f64)> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// (user, system) CPU seconds from a `/proc/.../stat` file (`/proc/thread-self/stat` for
/// the calling thread).
pub fn stat_cpu_seconds(path: &str) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the parenthesised command name (which may hold spaces); utime and
    // stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let field =
        |i: usize| -> Result<f64> { Ok(f.get(i).context("short stat")?.parse::<f64>()? / tick) };
    Ok((field(11)?, field(12)?))
}
