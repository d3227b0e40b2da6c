//! The decision after each step: compare the new version with the old one over the step's
//! window, from counter deltas of the balancers' metrics (summed over every balancer and
//! listener). Pure: no I/O, unit-tested.

use std::collections::BTreeMap;

use serde::Serialize;

use super::scrape::Sample;

const REQUESTS: &str = "balancer_requests_total";
const BUCKETS: &str = "balancer_request_duration_seconds_bucket";

/// Cumulative counts of one version: answers, 5xx answers, and duration buckets
/// (upper bound → cumulative count).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionCounts {
    pub requests: f64,
    pub errors: f64,
    pub buckets: BTreeMap<Bound, f64>,
}

/// A histogram bucket's upper bound, ordered (`+Inf` last).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Bound(pub f64);
impl Eq for Bound {}
#[allow(clippy::derive_ord_xor_partial_ord)]
impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Counts per version of one service, at one moment.
pub type Counts = BTreeMap<String, VersionCounts>;

/// Adds one balancer's samples of `service` into `into`.
pub fn accumulate(into: &mut Counts, samples: &[Sample], service: &str) {
    for s in samples {
        if s.label("service") != Some(service) || !s.value.is_finite() {
            continue;
        }
        let Some(version) = s.label("version") else {
            continue;
        };
        match s.name.as_str() {
            REQUESTS => {
                let c = into.entry(version.to_owned()).or_default();
                c.requests += s.value;
                if s.label("code") == Some("5xx") {
                    c.errors += s.value;
                }
            }
            BUCKETS => {
                let le = match s.label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => match v.parse() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                *into
                    .entry(version.to_owned())
                    .or_default()
                    .buckets
                    .entry(Bound(le))
                    .or_default() += s.value;
            }
            _ => {}
        }
    }
}

/// What happened in a window: `after - before` (counters only grow; a balancer restart
/// that resets them shows up as negative and is clamped to zero).
pub fn delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .map(|(v, a)| {
            let b = before.get(v).cloned().unwrap_or_default();
            let buckets = a
                .buckets
                .iter()
                .map(|(le, n)| {
                    (
                        *le,
                        (n - b.buckets.get(le).copied().unwrap_or(0.0)).max(0.0),
                    )
                })
                .collect();
            (
                v.clone(),
                VersionCounts {
                    requests: (a.requests - b.requests).max(0.0),
                    errors: (a.errors - b.errors).max(0.0),
                    buckets,
                },
            )
        })
        .collect()
}

impl VersionCounts {
    pub fn error_rate(&self) -> f64 {
        if self.requests > 0.0 {
            self.errors / self.requests
        } else {
            0.0
        }
    }

    /// The `q` quantile in seconds, linearly interpolated inside its bucket like
    /// Prometheus' `histogram_quantile`; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self
            .buckets
            .get(&Bound(f64::INFINITY))
            .copied()
            .or_else(|| self.buckets.values().copied().reduce(f64::max))?;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for (Bound(le), n) in &self.buckets {
            if *n >= rank {
                if le.is_infinite() {
                    // Beyond the last finite bound: report that bound.
                    return Some(prev.0);
                }
                let span = n - prev.1;
                let frac = if span > 0.0 {
                    (rank - prev.1) / span
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (*le, *n);
        }
        Some(prev.0)
    }
}

/// The limits of one rollout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Highest tolerated share of 5xx answers from the new version (0.0..=1.0).
    pub max_error_rate: f64,
    /// Highest tolerated ratio new p99 / old p99.
    pub max_p99_ratio: f64,
    /// A new p99 below this (seconds) never breaches: at sub-millisecond latencies the
    /// ratio of two p99s is noise.
    pub p99_floor: f64,
    /// Fewer answers than this from the new version in a window: not enough to judge the
    /// error rate by ratio; any 5xx then breaches only if it exceeds the rate over this many.
    pub min_requests: f64,
}

/// What the gate saw in one window.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Observation {
    pub new_requests: u64,
    pub new_errors: u64,
    pub new_error_rate: f64,
    pub old_requests: u64,
    pub old_error_rate: f64,
    pub new_p99_ms: Option<f64>,
    pub old_p99_ms: Option<f64>,
}

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Breach(String),
}

/// Judges the new version against the old ones over one window.
pub fn judge(window: &Counts, new: &str, limits: &Limits) -> (Verdict, Observation) {
    let empty = VersionCounts::default();
    let n = window.get(new).unwrap_or(&empty);
    let mut old = VersionCounts::default();
    for (v, c) in window {
        if v != new && v != "none" {
            old.requests += c.requests;
            old.errors += c.errors;
            for (le, k) in &c.buckets {
                *old.buckets.entry(*le).or_default() += k;
            }
        }
    }
    let obs = Observation {
        new_requests: n.requests as u64,
        new_errors: n.errors as u64,
        new_error_rate: n.error_rate(),
        old_requests: old.requests as u64,
        old_error_rate: old.error_rate(),
        new_p99_ms: n.quantile(0.99).map(|s| s * 1e3),
        old_p99_ms: old.quantile(0.99).map(|s| s * 1e3),
    };
    let rate = n.errors / n.requests.max(limits.min_requests).max(1.0);
    if n.errors > 0.0 && rate > limits.max_error_rate {
        return (
            Verdict::Breach(format!(
                "error rate of {new} is {:.2} % ({} of {} answers were 5xx; limit {:.2} %, old versions {:.2} %)",
                n.error_rate() * 100.0,
                obs.new_errors,
                obs.new_requests,
                limits.max_error_rate * 100.0,
                obs.old_error_rate * 100.0
            )),
            obs,
        );
    }
    if let (Some(np), Some(op)) = (n.quantile(0.99), old.quantile(0.99))
        && n.requests >= limits.min_requests
        && old.requests >= limits.min_requests
        && np > limits.p99_floor
        && np > op * limits.max_p99_ratio
    {
        return (
            Verdict::Breach(format!(
                "p99 of {new} is {:.1} ms, {:.2}× the old versions' {:.1} ms (limit {:.2}×)",
                np * 1e3,
                np / op.max(1e-9),
                op * 1e3,
                limits.max_p99_ratio
            )),
            obs,
        );
    }
    (Verdict::Pass, obs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::scrape::parse;

    const LIMITS: Limits = Limits {
        max_error_rate: 0.01,
        max_p99_ratio: 1.5,
        p99_floor: 0.005,
        min_requests: 50.0,
    };

    fn page(v1: (u64, u64), v2: (u64, u64), v2_slow: bool) -> Vec<Sample> {
        // 90 % of v1 under 1 ms, the rest under 10 ms; v2 the same or 10× slower.
        let b = |v: &str, n: u64, slow: bool| {
            let (fast_le, slow_le) = if slow {
                ("0.01", "0.1")
            } else {
                ("0.001", "0.01")
            };
            format!(
                "balancer_request_duration_seconds_bucket{{listener=\"web\",service=\"web\",version=\"{v}\",le=\"{fast_le}\"}} {}\n\
                 balancer_request_duration_seconds_bucket{{listener=\"web\",service=\"web\",version=\"{v}\",le=\"{slow_le}\"}} {n}\n\
                 balancer_request_duration_seconds_bucket{{listener=\"web\",service=\"web\",version=\"{v}\",le=\"+Inf\"}} {n}\n",
                n * 9 / 10
            )
        };
        let text = format!(
            "balancer_requests_total{{listener=\"web\",service=\"web\",version=\"v1\",code=\"2xx\"}} {}\n\
             balancer_requests_total{{listener=\"web\",service=\"web\",version=\"v1\",code=\"5xx\"}} {}\n\
             balancer_requests_total{{listener=\"web\",service=\"web\",version=\"v2\",code=\"2xx\"}} {}\n\
             balancer_requests_total{{listener=\"web\",service=\"web\",version=\"v2\",code=\"5xx\"}} {}\n\
             balancer_requests_total{{listener=\"web\",service=\"other\",version=\"v2\",code=\"5xx\"}} 999\n{}{}",
            v1.0,
            v1.1,
            v2.0,
            v2.1,
            b("v1", v1.0 + v1.1, false),
            b("v2", v2.0 + v2.1, v2_slow)
        );
        parse(&text).unwrap()
    }

    fn window(before: &[Sample], after: &[Sample]) -> Counts {
        let (mut b, mut a) = (Counts::new(), Counts::new());
        accumulate(&mut b, before, "web");
        accumulate(&mut a, after, "web");
        delta(&b, &a)
    }

    #[test]
    fn a_healthy_canary_passes() {
        let w = window(
            &page((1000, 0), (0, 0), false),
            &page((10_000, 1), (500, 0), false),
        );
        let (v, obs) = judge(&w, "v2", &LIMITS);
        assert_eq!(v, Verdict::Pass);
        assert_eq!(obs.new_requests, 500);
        assert_eq!(obs.old_requests, 9001);
    }

    #[test]
    fn ten_percent_errors_breach() {
        let w = window(
            &page((0, 0), (0, 0), false),
            &page((900, 0), (90, 10), false),
        );
        let (v, obs) = judge(&w, "v2", &LIMITS);
        assert!(
            matches!(v, Verdict::Breach(ref r) if r.contains("error rate")),
            "{v:?}"
        );
        assert!((obs.new_error_rate - 0.1).abs() < 1e-9);
        // Other services' errors are not counted.
        assert_eq!(obs.new_errors, 10);
    }

    #[test]
    fn errors_before_the_window_do_not_count() {
        let w = window(
            &page((0, 0), (100, 50), false),
            &page((900, 0), (1100, 50), false),
        );
        assert_eq!(judge(&w, "v2", &LIMITS).0, Verdict::Pass);
    }

    #[test]
    fn a_slow_canary_breaches_the_p99_ratio() {
        let w = window(
            &page((0, 0), (0, 0), false),
            &page((1000, 0), (1000, 0), true),
        );
        let (v, obs) = judge(&w, "v2", &LIMITS);
        assert!(
            matches!(v, Verdict::Breach(ref r) if r.contains("p99")),
            "{v:?}"
        );
        let (n, o) = (obs.new_p99_ms.unwrap(), obs.old_p99_ms.unwrap());
        assert!(n > 5.0 * o, "{n} vs {o}");
    }

    #[test]
    fn few_answers_neither_breach_on_one_error_nor_on_latency() {
        // One 5xx in 10 answers is 10 %, but over fewer than min_requests it counts as 1/50.
        let w = window(&page((0, 0), (0, 0), false), &page((1000, 0), (9, 1), true));
        assert!(matches!(judge(&w, "v2", &LIMITS).0, Verdict::Breach(_)));
        let lenient = Limits {
            max_error_rate: 0.05,
            ..LIMITS
        };
        assert_eq!(judge(&w, "v2", &lenient).0, Verdict::Pass);
        // No traffic at all: nothing to judge, no breach.
        let w = window(
            &page((0, 0), (0, 0), false),
            &page((1000, 0), (0, 0), false),
        );
        assert_eq!(judge(&w, "v2", &LIMITS).0, Verdict::Pass);
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let mut c = VersionCounts::default();
        for (le, n) in [(0.001, 0.0), (0.01, 100.0), (f64::INFINITY, 100.0)] {
            c.buckets.insert(Bound(le), n);
        }
        let p50 = c.quantile(0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        assert_eq!(VersionCounts::default().quantile(0.99), None);
    }

    #[test]
    fn counter_resets_clamp_to_zero() {
        let w = window(
            &page((1000, 5), (1000, 5), false),
            &page((10, 0), (10, 0), false),
        );
        assert_eq!(w["v2"].requests, 0.0);
        assert_eq!(w["v2"].errors, 0.0);
    }
}
