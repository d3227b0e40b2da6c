//! One request's attempts: which instances failed it, and whether it may go again —
//! to another instance (bounded by the listener's `retries` and the service's retry
//! budget) or on another connection (a stale pooled one, a refused HTTP/2 stream: free,
//! but bounded too). Shared by the HTTP/1 and HTTP/2 forward loops.

use std::sync::Arc;

use http::StatusCode;

use crate::endpoint::Endpoint;
use crate::outlier;
use crate::table::{ListenerSettings, Route, ServiceTable};

/// The attempts at one request so far: the instances that failed it (not picked again)
/// and two counts, kept apart so that a stale connection or a refused stream met first
/// does not use up the retries a crashed instance needs.
#[derive(Default)]
pub(super) struct Tries {
    pub(super) tried: Vec<usize>,
    /// Attempts that were an instance's fault: bounded by `retries` and the retry budget.
    failed: u32,
    /// Sends no instance processed (a pooled connection it had closed, an HTTP/2 stream
    /// it refused): free, but bounded too.
    stale: u32,
}

impl Tries {
    /// `ep` failed the request (connect error, reset, no answer): see [`no_answer`]; it is
    /// not picked again for this request.
    pub(super) fn instance_failed(
        &mut self,
        ep: &Arc<Endpoint>,
        svc: &ServiceTable,
        s: &ListenerSettings,
    ) {
        no_answer(ep, svc, s);
        self.tried.push(Arc::as_ptr(ep) as usize);
        self.failed += 1;
    }

    /// A connect to `ep` failed (`timed_out`, or refused / reset / TLS): counted, `last`
    /// set to what the client gets if nothing else works. Whether another instance may be
    /// tried (that retry counted).
    #[cold]
    pub(super) fn connect_failed(
        &mut self,
        ep: &Arc<Endpoint>,
        svc: &ServiceTable,
        s: &ListenerSettings,
        timed_out: bool,
        last: &mut Option<StatusCode>,
    ) -> bool {
        svc.shared.connect_errors.inc();
        *last = Some(if timed_out {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        });
        self.instance_failed(ep, svc, s);
        let retry = self.may_retry(svc, s);
        if retry {
            svc.shared.retries_connect.inc();
        }
        retry
    }

    /// `ep` answered `status`: whether the request goes to another instance for it
    /// instead (the route's `retry_on` lists it, the request may be sent again, and
    /// [`Tries::retry_answer`] allows; that retry counted).
    #[inline]
    pub(super) fn retry_status(
        &mut self,
        route: &Route,
        may_resend: bool,
        status: StatusCode,
        ep: &Arc<Endpoint>,
        svc: &ServiceTable,
        s: &ListenerSettings,
    ) -> bool {
        let retry = !route.retry_on.is_empty()
            && may_resend
            && route.retry_on.contains(&status.as_u16())
            && self.retry_answer(ep, svc, s);
        if retry {
            svc.shared.retries_status.inc();
        }
        retry
    }

    /// After an instance's failure: whether another instance may be tried. Takes a retry
    /// from the budget when it may, so ask only when the request would be sent again.
    pub(super) fn may_retry(&self, svc: &ServiceTable, s: &ListenerSettings) -> bool {
        self.failed <= s.retries && svc.shared.withdraw()
    }

    /// A pooled connection to `ep` turned out closed: the instance's idle pool goes (its
    /// other idle connections are likely closed too). Whether another connection may be
    /// tried; not charged to the instance or the budget.
    pub(super) fn stale_connection(&mut self, ep: &Endpoint, s: &ListenerSettings) -> bool {
        ep.clear_idle();
        self.resend_unprocessed(s)
    }

    /// The request reached no instance's application (a stale connection, or a stream an
    /// HTTP/2 instance refused, `upstream_h2::refused`): whether to send it again. Bounded,
    /// and not charged to the instance or the budget (neither failed).
    pub(super) fn resend_unprocessed(&mut self, s: &ListenerSettings) -> bool {
        self.stale += 1;
        self.stale <= s.retries + 2
    }

    /// `ep` answered with a status the route retries: whether another instance gets the
    /// request (one is left, within `retries` and the budget, which it takes from). The
    /// check for one left is a scan, not a pick: a pick would move round robin's cursor.
    #[cold]
    fn retry_answer(
        &mut self,
        ep: &Arc<Endpoint>,
        svc: &ServiceTable,
        s: &ListenerSettings,
    ) -> bool {
        self.tried.push(Arc::as_ptr(ep) as usize);
        self.failed += 1;
        let left = (svc.groups.iter().flat_map(|g| g.members.iter()))
            .any(|m| !self.tried.contains(&(Arc::as_ptr(&m.ep) as usize)));
        left && self.may_retry(svc, s)
    }

    /// This is the request's first attempt: nothing has failed or been sent again yet.
    pub(super) fn none_failed(&self) -> bool {
        self.failed + self.stale == 0
    }
}

/// An attempt at `ep` that got no answer (connect error, timeout, broken connection):
/// an error on the status page and a step towards ejection.
pub(super) fn no_answer(ep: &Endpoint, svc: &ServiceTable, s: &ListenerSettings) {
    ep.stats.record_failure();
    outlier::record_failure(ep, svc, s);
}
