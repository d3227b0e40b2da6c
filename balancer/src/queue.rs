//! A service's `max_requests`: requests in flight per instance at most (HAProxy's `maxconn`
//! on a `server` line, Envoy's circuit-breaker `max_requests` per host). The pick skips
//! instances at their limit; when every instance of the service is, the request waits in
//! the service's queue for a slot, up to `queue_timeout` (HAProxy's `timeout queue`), then
//! gets 503. An instance is never sent more than it is known to take, and a burst above
//! the fleet's capacity waits briefly instead of failing at once.
//!
//! The wake-up: a request that finishes on an instance of the service (`InFlight` drops)
//! notifies one waiter, if any waits. A waiter registers before it looks again, and both
//! sides use sequentially consistent operations on the two counters (the instance's
//! in-flight count and the queue's waiters), so a slot freed while a request decides to
//! wait is never missed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use prometheus::IntCounter;
use tokio::sync::Notify;

use crate::select::{self, Wanted};
use crate::table::{Member, ServiceTable};

/// The waiters of one service; kept across routing-table swaps (in `ServiceShared`), and
/// shared by its endpoints, which report freed slots to it.
pub struct SlotQueue {
    waiting: AtomicUsize,
    freed: Notify,
    /// `balancer_queued_requests_total{service}`.
    pub queued: IntCounter,
    /// `balancer_queue_timeouts_total{service}`.
    pub timeouts: IntCounter,
}

impl SlotQueue {
    pub fn new(queued: IntCounter, timeouts: IntCounter) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            queued,
            timeouts,
        }
    }

    /// A request on an instance of the service finished (called after its in-flight
    /// count went down).
    #[inline]
    pub fn released(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }
}

/// Why [`wait_for_slot`] found no instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every instance has been tried already: nothing to wait for.
    Exhausted,
    /// No instance got below its limit within `queue_timeout` (counted).
    TimedOut,
}

impl NoSlot {
    /// What the client gets if no other attempt answers: 503 after a timed-out wait (see
    /// `proxy::forward::unanswered`); nothing of its own when there was nothing to wait for.
    pub fn answer(self) -> Option<http::StatusCode> {
        (self == NoSlot::TimedOut).then_some(http::StatusCode::SERVICE_UNAVAILABLE)
    }
}

/// [`wait_for_slot`], boxed and built out of line: the request path only pays for it when
/// a pick found nothing (then `Exhausted` at once for a service without `max_requests`).
#[cold]
#[inline(never)]
pub fn wait_boxed<'a>(
    svc: &'a ServiceTable,
    want: Wanted,
    tried: &'a [usize],
    start: Instant,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<&'a Member, NoSlot>> + Send + 'a>> {
    Box::pin(wait_for_slot(svc, want, tried, start))
}

/// After a pick found nothing on a service with `max_requests`: waits for an instance
/// below its limit, until `start + queue_timeout`.
pub async fn wait_for_slot<'a>(
    svc: &'a ServiceTable,
    want: Wanted,
    tried: &[usize],
    start: Instant,
) -> Result<&'a Member, NoSlot> {
    let Some(limit) = svc.limit.as_ref() else {
        return Err(NoSlot::Exhausted);
    };
    let untried = |m: &Member| !tried.contains(&(std::sync::Arc::as_ptr(&m.ep) as usize));
    if !(svc.groups.iter().flat_map(|g| g.members.iter())).any(untried) {
        return Err(NoSlot::Exhausted);
    }
    let q = &svc.shared.queue;
    let deadline = tokio::time::Instant::from_std(start + limit.queue_timeout);
    q.queued.inc();
    q.waiting.fetch_add(1, Ordering::SeqCst);
    let picked = loop {
        let notified = q.freed.notified();
        tokio::pin!(notified);
        // Registered before looking again: a slot freed from here on wakes this waiter.
        notified.as_mut().enable();
        if let Some(m) = select::pick(svc, want, tried, start) {
            break Ok(m);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            q.timeouts.inc();
            break Err(NoSlot::TimedOut);
        }
    };
    q.waiting.fetch_sub(1, Ordering::SeqCst);
    picked
}
