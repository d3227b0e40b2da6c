//! `bulk_batching`: waking once per batch of a sustained bulk stream, not per arrival,
//! with a receive low-water mark (`SO_RCVLOWAT`).
//!
//! Without it, every write the sender makes while the relay sleeps wakes the relay's
//! thread, and the relay moves a few dozen KiB and sleeps again, about ten times per MiB.
//! Each wake-up costs the core that made the arrival (on loopback, the sender's) an
//! inter-processor interrupt, and the read it triggers sends a window update that wakes
//! the sender in turn. With the mark set, the kernel wakes the relay only once the mark is
//! queued (or at the FIN, an error, a nearly closed window), so each wake-up splices
//! several pipe-fuls. Figures: balancer/README.md, "Round 8".
//!
//! The price is the tail of a burst: bytes below the mark that arrive as the sender
//! pauses (an answer's last bytes on a kept-alive connection) wake nobody. So:
//!
//! - the mark goes up only on a *sustained* one-way stream: [`SUSTAINED`] bytes spliced
//!   this way with no byte the other way in between (a request on a kept-alive
//!   connection starts the count over, so a series of short answers never gets a mark);
//! - every wait under the mark has a deadline ([`STALL`]); when it passes, the mark goes
//!   down and the count starts over. A burst's last bytes thus wait [`STALL`] plus the
//!   timer's millisecond granularity, 1–2 ms, once per burst of more than [`SUSTAINED`].
//!
//! On one connection with answers of a few MiB that tail costs more than batching saves
//! (balancer/README.md), which is why it is a listener option, off by default: for relays
//! of many concurrent bulk streams (backups, replication, downloads), not for interactive
//! protocols.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

/// Bytes spliced one way, with no pause and no byte the other way, before the mark goes up.
const SUSTAINED: u64 = 1 << 20;
/// The highest mark: four pipe-fuls (a splice moves at most 64 KiB).
const MARK: usize = 256 * 1024;
/// The mark is at most this share of the receive buffer (1 / 4): `SO_RCVLOWAT` above half
/// the buffer would raise the buffer and clamp the window, and the kernel's own "window
/// nearly closed" wake-up stays far away.
const BUFFER_SHARE: usize = 4;
/// Below this, a mark saves too few wake-ups to be worth a tail delay.
const SMALLEST_MARK: usize = 64 * 1024;
/// How long a wait under the mark may last before the mark is dropped.
const STALL: Duration = Duration::from_millis(1);

/// One relay direction's mark on its source socket.
pub(super) struct LowWater {
    enabled: bool,
    /// Bytes spliced this way since the stream started, paused, or heard the other way.
    streak: u64,
    /// The other way's byte count when `streak` was last checked.
    heard: u64,
    /// Whether a mark above one byte is set.
    raised: bool,
}

impl LowWater {
    pub(super) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            streak: 0,
            heard: 0,
            raised: false,
        }
    }

    /// Waits until `src` is readable. Under a mark, waits at most [`STALL`]: then the
    /// sender has paused, and what it left below the mark must go on now.
    pub(super) async fn readable(&mut self, src: &TcpStream) -> io::Result<()> {
        if !self.raised {
            return src.readable().await;
        }
        match tokio::time::timeout(STALL, src.readable()).await {
            Ok(ready) => ready,
            Err(_) => {
                self.streak = 0;
                self.raised = false;
                // The kernel reports the bytes already queued as soon as the mark is 1.
                set(src, 1)?;
                src.readable().await
            }
        }
    }

    /// Counts `n` bytes spliced from `src`, `heard` being the bytes moved the other way
    /// so far; raises the mark once the stream is sustained.
    pub(super) fn spliced(&mut self, src: &TcpStream, n: usize, heard: u64) {
        if !self.enabled || self.raised {
            return;
        }
        if heard != self.heard {
            self.heard = heard;
            self.streak = 0;
        }
        self.streak += n as u64;
        if self.streak < SUSTAINED {
            return;
        }
        self.streak = 0;
        // A failure here only costs the wake-ups the mark would have saved.
        let buffer = socket2::SockRef::from(src).recv_buffer_size().unwrap_or(0);
        let mark = MARK.min(buffer / BUFFER_SHARE);
        if mark < SMALLEST_MARK {
            return;
        }
        match set(src, mark) {
            Ok(()) => self.raised = true,
            Err(e) => tracing::debug!(error = %e, "SO_RCVLOWAT refused; waking on every arrival"),
        }
    }
}

/// Sets `SO_RCVLOWAT` (neither nix nor socket2 wraps it).
#[allow(unsafe_code)]
fn set(s: &TcpStream, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the option value is a plain `c_int` that lives for the call, and its size is
    // passed along; the descriptor is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The socket's current `SO_RCVLOWAT`.
    #[allow(unsafe_code)]
    pub fn mark_of(s: &TcpStream) -> usize {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` live for the call and describe a plain `c_int`.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&raw mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_RCVLOWAT: {}", io::Error::last_os_error());
        value as usize
    }
}
