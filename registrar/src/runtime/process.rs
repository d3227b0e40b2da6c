//! Watching helper processes that are not (or no longer) our children, so that a restarted
//! agent can adopt the containers its predecessor started.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A pidfd for `pid`: becomes readable when the process exits (child or not).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd registered with the tokio reactor: `readable()` resolves when `pid` exits.
/// Must be called inside a tokio runtime (the agent's, never the helper).
pub fn exit_watch(pid: i32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let fd = pidfd_open(pid)?;
    // SAFETY: the AsyncFd owns the fd for its whole life and deregisters it on drop;
    // nothing else holds it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// The process's start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`): with
/// the pid it identifies a process across pid reuse.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let after = stat.rsplit_once(") ")?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t));
        assert!(start_time(i32::MAX).is_none());
        assert!(pidfd_open(me).is_ok());
    }
}
