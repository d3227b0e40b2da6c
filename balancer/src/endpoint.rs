//! One upstream instance: its address, live counters and keep-alive connection pool.
//!
//! An `Endpoint` outlives routing tables: the table builder hands the same `Arc` to every
//! table in which the instance stays routable, so a change elsewhere never resets its pool,
//! in-flight count or outlier state. When it stops being routable it is `retire`d: idle
//! connections are closed at once, busy ones close when their request finishes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::upstream::UpConn;
use crate::upstream_h2::{H2Body, H2Conn};

/// Milliseconds since the process started: the clock of ejection deadlines.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pub struct Endpoint {
    pub service: Arc<str>,
    pub id: Arc<str>,
    pub version: Arc<str>,
    pub addr: SocketAddr,
    /// What a sticky cookie names this instance by (`sticky::id_of`).
    pub sticky_id: u64,
    in_flight: AtomicU32,
    failures: AtomicU32,
    /// `now_ms()` deadline of the current ejection; 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// Slow start: when the ramp began and how long it lasts.
    ramp: Option<(Instant, Duration)>,
    retired: AtomicBool,
    /// Idle connections, most recently used last. The mutex is held for a push or a pop
    /// only (never across an await), like hyper-util's pool; on one worker thread it is
    /// never contended.
    idle: Mutex<VecDeque<(UpConn, Instant)>>,
    /// The shared HTTP/2 connection of an `http2` service's instance (`upstream_h2`).
    h2: Mutex<Option<H2Conn>>,
    /// Held while that connection is being opened, so that a burst of first requests
    /// waits for one connection instead of opening one each (`h2_open`).
    h2_opening: tokio::sync::Mutex<()>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Answers, errors and latencies for the status page (relaxed atomics only).
    pub stats: crate::status::RequestStats,
    /// The service's queue of requests waiting for a slot (`max_requests`), told of every
    /// request that finishes here.
    queue: Option<Arc<crate::queue::SlotQueue>>,
}

impl Endpoint {
    pub fn new(
        service: Arc<str>,
        id: Arc<str>,
        version: Arc<str>,
        addr: SocketAddr,
        slow_start: Option<Duration>,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            sticky_id: crate::sticky::id_of(&service, &id),
            service,
            id,
            version,
            addr,
            in_flight: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            // Bounded (as the catalog bounds it), so that the ramp's end is an `Instant`.
            ramp: slow_start.filter(|d| !d.is_zero()).map(|d| {
                (
                    Instant::now(),
                    d.min(catalog::model::duration_str::MAX_DURATION),
                )
            }),
            retired: AtomicBool::new(false),
            idle: Mutex::new(VecDeque::new()),
            h2: Mutex::new(None),
            h2_opening: tokio::sync::Mutex::new(()),
            max_idle,
            idle_timeout,
            stats: Default::default(),
            queue: None,
        }
    }

    /// The endpoint reports its freed slots to `queue` (its service's).
    pub fn with_queue(mut self, queue: Arc<crate::queue::SlotQueue>) -> Self {
        self.queue = Some(queue);
        self
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// When the slow-start ramp ends, if it has not yet.
    pub fn ramp_end(&self) -> Option<Instant> {
        self.ramp.map(|(start, len)| start + len)
    }

    /// Weight × 1024 after slow start: grows linearly from 10 % to 100 % over the ramp.
    /// (Scaled so that small weights still ramp smoothly.)
    pub fn effective_weight(&self, weight: u32, now: Instant) -> u64 {
        let w = weight as u64 * 1024;
        match self.ramp {
            Some((start, len)) => {
                let f = (now.saturating_duration_since(start).as_secs_f64() / len.as_secs_f64())
                    .clamp(0.1, 1.0);
                ((w as f64 * f) as u64).max(1)
            }
            None => w,
        }
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms < until
    }

    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    /// A connect error or 5xx. Returns the failure streak.
    pub fn record_failure(&self) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Ejects for `base` × (number of ejections so far + 1), at most 10 × `base`.
    pub fn eject(&self, base: Duration) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let len = base.saturating_mul(n.min(10));
        self.ejected_until
            .store(now_ms() + len.as_millis() as u64, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// No new requests will come: close idle connections now, busy ones on return.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.clear_idle();
    }

    /// The most recently used idle connection that `fits` (see [`UpConn::fits`]: plain
    /// connections always do for a plain service, so this is a pop) and is not older than
    /// the idle timeout, if any. Whether the upstream closed it meanwhile is not checked
    /// here (that costs a syscall): a body-less idempotent request is resent if it was,
    /// others check [`UpConn::looks_alive`] first. `now`: the request's start (one clock
    /// read per request).
    pub fn checkout(&self, now: Instant, fits: impl Fn(&UpConn) -> bool) -> Option<UpConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(i) = idle.iter().rposition(|(c, _)| fits(c)) {
            let Some((conn, since)) = idle.remove(i) else {
                break;
            };
            if now.saturating_duration_since(since) < self.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response is complete. A full pool closes its
    /// oldest connection for it. Connections that carry a PROXY header serve one client
    /// connection only: returning one also closes those whose client has left.
    /// `since`: when the connection's last exchange ended (or about: see `Lease`).
    pub fn checkin(&self, conn: UpConn, since: Instant) {
        if self.is_retired() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if conn.is_owned() {
            idle.retain(|(c, _)| !c.is_orphan());
        }
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back((conn, since));
    }

    /// Drops every idle connection: one turned out closed by the upstream, the others
    /// (opened as long ago or longer) most likely are too — a restarted instance.
    ///
    /// The HTTP/2 connection goes too: its streams in flight finish, and it closes after
    /// them (hyper closes a connection once every sender is gone).
    pub fn clear_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        drop(idle);
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(h2);
    }

    /// Opens the instance's HTTP/2 connection under `opts` (after `h2_checkout` found
    /// none) and returns a sender on it. One request at a time opens it: the others wait,
    /// then share it (or, if the opening failed, try in turn). The caller bounds the wait
    /// with its connect timeout.
    pub async fn h2_open(
        &self,
        opts: &Arc<crate::tcp::UpstreamOpts>,
    ) -> std::io::Result<hyper::client::conn::http2::SendRequest<H2Body>> {
        let _opening = self.h2_opening.lock().await;
        if let Some(send) = self.h2_checkout(opts) {
            return Ok(send);
        }
        let conn = crate::upstream_h2::open(self.addr, opts).await?;
        Ok(self.h2_keep(conn))
    }

    /// A sender on the instance's HTTP/2 connection, if one is open under `opts`.
    pub fn h2_checkout(
        &self,
        opts: &Arc<crate::tcp::UpstreamOpts>,
    ) -> Option<hyper::client::conn::http2::SendRequest<H2Body>> {
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.as_ref().filter(|c| c.fits(opts)).map(|c| c.send.clone())
    }

    /// Keeps a newly opened HTTP/2 connection for the next requests (not once retired);
    /// returns a sender on it.
    fn h2_keep(&self, conn: H2Conn) -> hyper::client::conn::http2::SendRequest<H2Body> {
        let send = conn.send.clone();
        if !self.is_retired() {
            *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        }
        send
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// An in-flight request on an endpoint; decrements the count when dropped.
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Sequentially consistent against the queue's waiter count (see `queue`); the
        // same instruction as a relaxed one on x86.
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(q) = &self.0.queue {
            q.released();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow start too long to add to an `Instant` panicked in `ramp_end` (the table
    /// builder calls it for every group).
    #[test]
    fn an_endless_slow_start_still_ends_somewhere() {
        let ep = Endpoint::new(
            "web".into(),
            "web-0".into(),
            "v1".into(),
            "127.0.0.1:80".parse().unwrap(),
            Some(Duration::MAX),
            8,
            Duration::from_secs(60),
        );
        assert!(ep.ramp_end().is_some_and(|t| t > Instant::now()));
        assert!(ep.effective_weight(10, Instant::now()) >= 1);
    }
}
