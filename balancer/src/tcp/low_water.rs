//! Low-water marks on the sockets of a bulk relay direction.
//!
//! **The unsent mark (always).** Once a direction turns bulk, its destination gets
//! `TCP_NOTSENT_LOWAT` = [`UNSENT`]: the kernel takes no more from us while that much is
//! queued and not yet sent. Without it, a fast relay fills the destination's send buffer
//! (a MiB and more) whenever the receiver's window is shut, and every later window update
//! then sends from that backlog in the *receiver's* context. On loopback, where the
//! receiving side is the load generator, that put our transmit work on its saturated
//! core; our sockets were window-limited a third of the time, HAProxy's (which copies
//! 16 KiB at a time) far less. With the mark, what is sent is sent from our write, and the
//! bytes wait in our pipe instead. It never delays a byte the receiver has room for, and
//! HTTP/2 servers use the same option to keep their queues short. Figures:
//! balancer/PERF-LOG.md, "Round 8".
//!
//! **The receive mark (`bulk_batching`).** Waking once per batch of a sustained bulk
//! stream, not per arrival, with `SO_RCVLOWAT`.
//!
//! Without it, every write the sender makes while the relay sleeps wakes the relay's
//! thread, and the relay moves a few dozen KiB and sleeps again, about ten times per MiB.
//! Each wake-up costs the core that made the arrival (on loopback, the sender's) an
//! inter-processor interrupt, and the read it triggers sends a window update that wakes
//! the sender in turn. With the mark set, the kernel wakes the relay only once the mark is
//! queued (or at the FIN, an error, a nearly closed window), so each wake-up splices
//! several pipe-fuls. Figures: balancer/PERF-LOG.md, "Round 8".
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
//! (balancer/PERF-LOG.md, "Round 8"), which is why it is a listener option, off by
//! default: for relays of many concurrent bulk streams (backups, replication, downloads),
//! not for interactive protocols.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

/// Unsent bytes a bulk direction's destination may hold (`TCP_NOTSENT_LOWAT`).
const UNSENT: usize = 16 * 1024;

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
                set(src, RCVLOWAT, 1)?;
                src.readable().await
            }
        }
    }

    /// Counts `n` bytes spliced from `src`, `heard` telling the bytes moved the other way
    /// so far (read only with `bulk_batching` on); raises the mark once the stream is
    /// sustained.
    pub(super) fn spliced(&mut self, src: &TcpStream, n: usize, heard: impl Fn() -> u64) {
        if !self.enabled || self.raised {
            return;
        }
        let heard = heard();
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
        match set(src, RCVLOWAT, mark) {
            Ok(()) => self.raised = true,
            Err(e) => tracing::debug!(error = %e, "SO_RCVLOWAT refused; waking on every arrival"),
        }
    }
}

/// A direction turned bulk: its destination queues at most [`UNSENT`] unsent bytes. A
/// failure only loses the gain, so it is logged and ignored.
pub(super) fn limit_unsent(dst: &TcpStream) {
    if let Err(e) = set(dst, NOTSENT_LOWAT, UNSENT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT refused");
    }
}

/// A socket option of `c_int` value: (level, name).
type IntOpt = (libc::c_int, libc::c_int);
const RCVLOWAT: IntOpt = (libc::SOL_SOCKET, libc::SO_RCVLOWAT);
const NOTSENT_LOWAT: IntOpt = (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT);

/// Sets an integer socket option (neither nix nor socket2 wraps these two).
#[allow(unsafe_code)]
fn set(s: &TcpStream, (level, name): IntOpt, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the option value is a plain `c_int` that lives for the call, and its size is
    // passed along; the descriptor is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
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
    pub fn mark_of(s: &TcpStream) -> usize {
        get(s, RCVLOWAT)
    }

    /// The socket's current `TCP_NOTSENT_LOWAT` (0: none).
    pub fn unsent_of(s: &TcpStream) -> usize {
        get(s, NOTSENT_LOWAT)
    }

    #[allow(unsafe_code)]
    fn get(s: &TcpStream, (level, name): IntOpt) -> usize {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` live for the call and describe a plain `c_int`.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&raw mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        value as usize
    }
}
