//! A synchronous HAProxy reload through the master CLI (`haproxy -W -S <socket>`), for use as
//! a `reload_cmd`: `render haproxy-reload --master-socket /run/haproxy-master.sock`.
//!
//! `kill -USR2 <master>` and the master CLI's `reload` both return before the new worker
//! exists, and say nothing about a configuration the new worker rejected. This waits until
//! the master reports a new current worker (success) or a new failed reload (failure), so
//! render's reload failure handling (restore the previous file, reload again) works.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("haproxy master socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected `show proc` output from the haproxy master: {0:?}")]
    Parse(String),
    #[error("haproxy reported a failed reload (the old worker keeps running)")]
    Failed,
    #[error("haproxy did not start a new worker within {0:?}")]
    TimedOut(Duration),
}

/// What `show proc` on the master CLI says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Procs {
    pub reloads: u64,
    pub failed: u64,
    /// Pids of the current workers (not the old ones still finishing connections).
    pub workers: BTreeSet<u32>,
}

/// Parses HAProxy 2.x `show proc` output.
pub fn parse_show_proc(text: &str) -> Option<Procs> {
    let mut reloads = None;
    let mut failed = 0;
    let mut workers = BTreeSet::new();
    let mut section = "";
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("#<PID>") || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('#') {
            section = if name.trim() == "workers" {
                "workers"
            } else {
                "other"
            };
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols.as_slice() {
            [_, "master", n, rest @ ..] => {
                reloads = n.parse().ok();
                // "[failed: N]" since HAProxy 2.5.
                if let [label, f, ..] = rest
                    && *label == "[failed:"
                {
                    failed = f.trim_end_matches(']').parse().unwrap_or(0);
                }
            }
            [pid, "worker", ..] if section == "workers" => {
                workers.insert(pid.parse().ok()?);
            }
            _ => {}
        }
    }
    Some(Procs {
        reloads: reloads?,
        failed,
        workers,
    })
}

fn command(socket: &Path, cmd: &str, io_timeout: Duration) -> Result<String, ReloadError> {
    let err = |source| ReloadError::Socket {
        path: socket.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(err)?;
    s.set_read_timeout(Some(io_timeout)).map_err(err)?;
    s.set_write_timeout(Some(io_timeout)).map_err(err)?;
    s.write_all(format!("{cmd}\n").as_bytes()).map_err(err)?;
    // The master CLI answers once the client has finished sending.
    s.shutdown(Shutdown::Write).map_err(err)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(err)?;
    Ok(out)
}

fn show_proc(socket: &Path) -> Result<Procs, ReloadError> {
    let text = command(socket, "show proc", Duration::from_secs(2))?;
    parse_show_proc(&text).ok_or(ReloadError::Parse(text))
}

/// Reloads and waits for the outcome.
pub fn reload(socket: &Path, timeout: Duration) -> Result<Procs, ReloadError> {
    let deadline = Instant::now() + timeout;
    let before = show_proc(socket)?;
    // The master re-executes itself: the connection may end without an answer.
    let _ = command(socket, "reload", Duration::from_secs(2));
    loop {
        // While the master re-executes, its socket refuses connections: retry.
        if let Ok(now) = show_proc(socket) {
            if now.failed > before.failed {
                return Err(ReloadError::Failed);
            }
            if now.reloads > before.reloads
                && now.workers.iter().any(|p| !before.workers.contains(p))
            {
                return Ok(now);
            }
        }
        if Instant::now() >= deadline {
            return Err(ReloadError::TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_proc_of_haproxy_2_6() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
12059           master          2 [failed: 1]   0d00h00m01s     2.6.12-1+deb12u4\n\
# workers\n\
12120           worker          0               0d00h00m00s     2.6.12-1+deb12u4\n\
# old workers\n\
12066           worker          1               0d00h00m01s     2.6.12-1+deb12u4\n\
# programs\n\n";
        let p = parse_show_proc(text).unwrap();
        assert_eq!(p.reloads, 2);
        assert_eq!(p.failed, 1);
        assert_eq!(p.workers, BTreeSet::from([12120]));
        assert!(parse_show_proc("garbage").is_none());
    }
}
