//! Helpers for the crate's unit tests: the kernel's view of a TCP connection, header maps.

use std::io;
use std::os::fd::AsRawFd;

/// TCP segments the socket has received so far (TCP_INFO `tcpi_segs_in`; neither nix nor
/// socket2 wraps TCP_INFO). Tells whether bytes and a FIN arrived together or apart.
#[allow(unsafe_code)]
pub fn segs_in(s: &impl AsRawFd) -> u32 {
    // SAFETY: TCP_INFO fills at most `len` bytes of a plain-data struct that lives for the call.
    let info = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
        info
    };
    info.tcpi_segs_in
}

/// A header map of `(name, value)` pairs, repeated names appended in order.
pub fn header_map(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, http::HeaderValue::from_static(v));
    }
    h
}
