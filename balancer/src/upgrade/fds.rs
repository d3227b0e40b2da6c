//! Passing listening sockets between processes with SCM_RIGHTS.
//!
//! The one place of the balancer that needs `unsafe`: file descriptors received in a
//! control message arrive as bare numbers, and turning them into owned sockets is an
//! `unsafe` `from_raw_fd`. See ARCHITECTURE.md ("unsafe code").
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// At most this many sockets per handover (listeners + admin).
pub const MAX_FDS: usize = 64;

/// Sends `payload` with `fds` attached, in one message.
pub fn send(stream: &UnixStream, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(payload)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(std::io::Error::from)?;
    Ok(())
}

/// Receives one message of at most `buf.len()` bytes and the descriptors attached to it
/// (close-on-exec). Returns the payload length.
pub fn recv(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel has just installed `fd` in this process's descriptor
                // table for this message (SCM_RIGHTS); nothing else in the process knows
                // the number, so this `OwnedFd` is its only owner and closes it once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other(
            "control message truncated: too many descriptors",
        ));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_survives_the_trip() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, b"hello", &[l.as_raw_fd()]).unwrap();
        drop(l);
        let mut buf = [0u8; 16];
        let (n, mut fds) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let got = std::net::TcpListener::from(fds.remove(0));
        assert_eq!(got.local_addr().unwrap(), addr);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert!(got.accept().is_ok());
    }
}
