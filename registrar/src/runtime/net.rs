//! Container networking done by the runtime itself: loopback inside a private network
//! namespace. (Bridge/veth plumbing is done from the host side by the helper.)

use super::error::{Result, RuntimeError};

/// Brings `lo` up in the current network namespace (a fresh netns has it down).
pub fn loopback_up() -> Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized `ifreq`; the fd is
    // closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io_err("socket for lo"));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            let e = io_err("get lo flags");
            libc::close(fd);
            return Err(e);
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            let e = io_err("bring lo up");
            libc::close(fd);
            return Err(e);
        }
        libc::close(fd);
    }
    Ok(())
}

fn io_err(what: &str) -> RuntimeError {
    RuntimeError::Io {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}
