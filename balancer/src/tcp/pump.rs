//! Streaming bytes both ways between a client and an upstream, with half-close, an idle
//! timeout and a drain deadline.
//!
//! `tokio::io::copy_bidirectional` does the work (one task, two reused buffers; on EOF
//! from one side it shuts down writing towards the other and keeps the other direction
//! going). The client side is wrapped in [`Metered`], which counts bytes and stamps the
//! last activity, so the idle check is one atomic load per timer tick, not per read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::endpoint::now_ms;

/// Per-direction buffer: large enough for bulk transfers to take few syscalls.
const BUF: usize = 32 * 1024;

/// Counts bytes and remembers when the last one moved.
pub struct Metered<S> {
    pub inner: S,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub last: Arc<AtomicU64>,
    pub total_in: u64,
    pub total_out: u64,
}

impl<S> Metered<S> {
    pub fn new(inner: S, bytes_in: IntCounter, bytes_out: IntCounter) -> Self {
        Self {
            inner,
            bytes_in,
            bytes_out,
            last: Arc::new(AtomicU64::new(now_ms())),
            total_in: 0,
            total_out: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
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
            me.bytes_in.inc_by(n);
            me.total_in += n;
            me.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
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
            me.bytes_out.inc_by(n as u64);
            me.total_out += n as u64;
            me.last.store(now_ms(), Ordering::Relaxed);
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

/// Why a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed (or one failed).
    Done,
    IdleTimeout,
    DrainDeadline,
}

/// Streams until both directions end, nothing moves for `idle`, or `drain` has passed
/// since `shutdown` turned true.
pub async fn pump<C, U>(
    client: &mut Metered<C>,
    upstream: &mut U,
    idle: Duration,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let last = client.last.clone();
    let copy = tokio::io::copy_bidirectional_with_sizes(client, upstream, BUF, BUF);
    tokio::pin!(copy);
    let idle_ms = idle.as_millis() as u64;
    let mut check = tokio::time::Instant::now() + idle;
    let mut drain_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut copy => return End::Done,
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

/// Resolves once the flag is true (or its sender is gone); holds no borrow across awaits.
pub(crate) async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
