//! The bundled container runtime.
//!
//! This is the only module of wharf allowed to use `unsafe`: creating a container needs
//! `clone` with namespace flags, `fork` in the container's init, signal handlers for PID 1
//! and a few ioctls, none of which have safe wrappers. Every `unsafe` block says why it is
//! sound; all of them run in the single-threaded helper process, never inside tokio.
#![allow(unsafe_code)]

pub mod bridge;
pub mod cgroup;
pub mod error;
pub mod helper;
mod init;
mod net;
pub mod process;
mod rootfs;
pub mod spec;

use std::os::fd::OwnedFd;

pub use cgroup::{Cgroup, Layout};
pub use error::RuntimeError;
pub use spec::{BridgeSpec, ContainerSpec, ExitStatus, Limits, NetSpec};

/// Writes all of `buf` to a pipe.
fn pipe_write_all(fd: &OwnedFd, mut buf: &[u8]) -> nix::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one byte; `None` at EOF.
fn pipe_read_byte(fd: &OwnedFd) -> nix::Result<Option<u8>> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads until EOF.
fn pipe_read_to_end(fd: &OwnedFd) -> nix::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}
