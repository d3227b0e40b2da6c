//! The pipes of the splice relay ([`super::splice`]).
//!
//! Pipes are a scarce kernel resource (two per connection, and a user gets only
//! `pipe-user-pages-soft` pages of pipe buffers before new pipes shrink to one page), so
//! they come from a small per-thread pool, are returned only when empty, and at most
//! [`MAX_PIPES`] exist at once; [`Pipes::take`] says `None` when none is left.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::OFlag;

use super::splice::SCRATCH;

/// Pipes in existence (in use or pooled), all threads together.
static PIPES: AtomicUsize = AtomicUsize::new(0);
/// Upper bound on [`PIPES`]: 1024 pipes of the default 64 KiB stay within Linux's
/// default per-user soft limit of pipe pages (16,384).
const MAX_PIPES: usize = 1024;
/// Idle pipes kept per worker thread.
const POOL_PER_THREAD: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// One pipe: what is written to `w` is read from `r`.
pub(super) struct Pipe {
    pub r: OwnedFd,
    pub w: OwnedFd,
}

impl Pipe {
    /// A pooled pipe or a new one; `None` when [`MAX_PIPES`] are out or the kernel says no.
    fn take() -> Option<Pipe> {
        if let Some(p) = POOL.with(|pool| pool.borrow_mut().pop()) {
            return Some(p);
        }
        if PIPES.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            PIPES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            // Past the per-user pipe budget the kernel makes small pipes (a page or two):
            // `splice::relay_small` parks up to `SCRATCH` bytes in an empty pipe at once, so a
            // pipe that cannot hold them is not used.
            Ok((r, w))
                if nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
                    .is_ok_and(|size| size as usize >= SCRATCH) =>
            {
                Some(Pipe { r, w })
            }
            Ok(_) => {
                PIPES.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!("pipe too small for splicing; using the buffered copy");
                None
            }
            Err(e) => {
                PIPES.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "no pipe for splicing; using the buffered copy");
                None
            }
        }
    }

    /// Back to the pool if it holds no bytes (a pipe with leftovers would leak them into
    /// the next connection); otherwise closed.
    fn give(self, empty: bool) {
        if empty {
            let refused = POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_PER_THREAD {
                    pool.push(self);
                    None
                } else {
                    Some(self)
                }
            });
            if refused.is_none() {
                return;
            }
        }
        PIPES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pipe lent to one direction of a relay; goes back to the pool (if empty) on drop.
pub(super) struct Lent {
    pub pipe: Option<Pipe>,
    /// Bytes spliced in and not yet out.
    pub held: usize,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            p.give(self.held == 0);
        }
    }
}

/// Two pipes for one connection, or `None` (use the buffered copy).
pub struct Pipes(pub(super) Lent, pub(super) Lent);

impl Pipes {
    pub fn take() -> Option<Pipes> {
        let a = Pipe::take()?;
        let Some(b) = Pipe::take() else {
            a.give(true);
            return None;
        };
        Some(Pipes(
            Lent {
                pipe: Some(a),
                held: 0,
            },
            Lent {
                pipe: Some(b),
                held: 0,
            },
        ))
    }
}
