//! Streaming bytes both ways between a client and an upstream, with half-close, an idle
//! timeout and a drain deadline.
//!
//! The bytes move either by `splice(2)` between two plain sockets (`super::splice`, zero
//! copy) or by the buffered [`copy`] (`tokio::io::copy_bidirectional`: TLS on either side,
//! or no pipe to spare). Both pass an EOF on as a half-close and keep the other direction
//! going. Both count the client's bytes in a [`Meter`], which also stamps the last
//! activity, so the idle check is one atomic load per timer tick, not per read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::server::until_true;

use crate::endpoint::now_ms;

/// Per-direction buffer: large enough for bulk transfers to take few syscalls.
const BUF: usize = 32 * 1024;

/// Counts bytes from and to the client and remembers when the last one moved. Borrows
/// the listener's counters (no reference counting per connection).
pub struct Meter<'c> {
    bytes_in: &'c IntCounter,
    bytes_out: &'c IntCounter,
    /// Milliseconds ([`now_ms`]) of the last byte moved: read by the idle check.
    pub last: AtomicU64,
    total_in: AtomicU64,
    total_out: AtomicU64,
}

impl<'c> Meter<'c> {
    pub fn new(bytes_in: &'c IntCounter, bytes_out: &'c IntCounter) -> Self {
        Self {
            bytes_in,
            bytes_out,
            last: AtomicU64::new(now_ms()),
            total_in: AtomicU64::new(0),
            total_out: AtomicU64::new(0),
        }
    }

    /// A meter whose counters are registered nowhere (unit tests).
    #[cfg(test)]
    pub fn detached() -> Meter<'static> {
        let c = || {
            &*Box::leak(Box::new(
                IntCounter::new("bytes", "bytes").expect("valid counter"),
            ))
        };
        Meter::new(c(), c())
    }

    /// `n` bytes came from the client.
    pub fn read(&self, n: u64) {
        self.bytes_in.inc_by(n);
        self.total_in.fetch_add(n, Ordering::Relaxed);
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    /// `n` bytes went to the client.
    pub fn wrote(&self, n: u64) {
        self.bytes_out.inc_by(n);
        self.total_out.fetch_add(n, Ordering::Relaxed);
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    /// (bytes from the client, bytes to the client).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.total_in.load(Ordering::Relaxed),
            self.total_out.load(Ordering::Relaxed),
        )
    }
}

/// A client stream whose reads and writes are counted in a [`Meter`].
pub struct Metered<'m, S> {
    pub inner: S,
    pub meter: &'m Meter<'m>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            me.meter.read(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            me.meter.wrote(n as u64);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The buffered copy both ways (any stream types: TLS, or when no pipe is available).
pub async fn copy<C, U>(client: &mut Metered<'_, C>, upstream: &mut U) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(client, upstream, BUF, BUF)
        .await
        .map(|_| ())
}

/// Why a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed (or one failed).
    Done,
    IdleTimeout,
    DrainDeadline,
}

/// Drives `relay` (the bytes moving both ways) until it ends, nothing moves for `idle`
/// (per `meter`), or `drain` has passed since `shutdown` turned true.
pub async fn pump<F>(
    mut relay: Pin<&mut F>,
    meter: &Meter<'_>,
    idle: Duration,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> End
where
    F: Future<Output = io::Result<()>>,
{
    let last = &meter.last;
    let idle_ms = idle.as_millis() as u64;
    let mut check = tokio::time::Instant::now() + idle;
    let mut drain_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut relay => return End::Done,
            _ = tokio::time::sleep_until(check) => {
                let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= idle_ms {
                    return End::IdleTimeout;
                }
                check = tokio::time::Instant::now() + Duration::from_millis(idle_ms - quiet);
            }
            _ = until_true(&mut shutdown), if drain_at.is_none() => {
                drain_at = Some(tokio::time::Instant::now() + drain);
            }
            _ = async { tokio::time::sleep_until(drain_at.unwrap_or_else(tokio::time::Instant::now)).await }, if drain_at.is_some() => {
                return End::DrainDeadline;
            }
        }
    }
}
