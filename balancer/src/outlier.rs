//! Passive outlier ejection, one rule for every protocol: an instance that fails
//! `outlier_failures` times in a row (connect errors; for HTTP also 5xx and resets) is
//! ejected for a growing period, unless that would take more than `max_ejection_percent`
//! of its service out — a service never ejects itself into having no backends.

use crate::endpoint::{Endpoint, now_ms};
use crate::table::{ListenerSettings, ServiceTable};

/// Counts a failure of `ep` and ejects it when the streak is long enough, unless too much
/// of the service is already ejected.
pub fn record_failure(ep: &Endpoint, svc: &ServiceTable, s: &ListenerSettings) {
    let streak = ep.record_failure();
    if s.outlier_failures == 0 || streak < s.outlier_failures {
        return;
    }
    let now = now_ms();
    let total = svc.member_count();
    let ejected = svc
        .groups
        .iter()
        .flat_map(|g| g.members.iter())
        .filter(|m| m.ep.is_ejected(now))
        .count();
    if ((ejected + 1) * 100) as u64 <= total as u64 * s.max_ejection_percent as u64 {
        ep.eject(s.base_ejection);
        svc.shared.ejections.inc();
        tracing::warn!(service = %ep.service, instance = %ep.id, streak, "outlier ejected");
    }
}
