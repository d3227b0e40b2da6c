//! Per-instance request counters and a lock-free latency histogram, bumped on the request
//! path (two or three relaxed atomic adds per answer, no lock, no allocation) and read once
//! a second by the status sampler, which turns counter deltas into req/s, error rate and p99.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets: exact below 16 µs, then 4 per power of two (≤ 19 % wide) up to ~2^31 µs
/// (36 min); anything longer lands in the last bucket.
const SUB: u32 = 4;
const LINEAR: u64 = 16;
pub const BUCKETS: usize = (LINEAR as usize) + ((31 - 4 + 1) * SUB as usize);

/// Bucket index of a latency in microseconds.
fn bucket_of(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // ≥ 4
    let sub = ((us >> (exp - 2)) & (SUB as u64 - 1)) as u32;
    let i = LINEAR as usize + ((exp - 4) * SUB + sub) as usize;
    i.min(BUCKETS - 1)
}

/// Upper bound (µs) of a bucket: what a quantile falling in it reports.
fn bucket_upper(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64 + 1;
    }
    let j = (i - LINEAR as usize) as u32;
    let exp = j / SUB + 4;
    let sub = (j % SUB) as u64;
    ((SUB as u64 + sub + 1) << (exp - 2)) - 1
}

/// Counters of one endpoint. Attempts = answers + failures (connect error, timeout,
/// connection broken before an answer); errors = failures + 5xx answers.
pub struct RequestStats {
    /// When counting began (all counters zero): the sampler's first baseline, so requests
    /// between an endpoint's creation and its first sample are not lost.
    created: Instant,
    attempts: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for RequestStats {
    fn default() -> Self {
        Self {
            created: Instant::now(),
            attempts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RequestStats {
    /// An answer from the instance after `latency` (request start → response head).
    #[inline]
    pub fn record_answer(&self, status: u16, latency: Duration) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt that got no answer (connect error, timeout, broken connection).
    #[inline]
    pub fn record_failure(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn created(&self) -> Instant {
        self.created
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            attempts: self.attempts.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Counter values at one moment, or (after `delta`) the change over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsSnapshot {
    pub attempts: u64,
    pub errors: u64,
    pub buckets: Vec<u64>,
}

impl StatsSnapshot {
    /// `self - earlier`; `None` when a counter went backwards (a new endpoint object).
    pub fn delta(&self, earlier: &StatsSnapshot) -> Option<StatsSnapshot> {
        if self.attempts < earlier.attempts || self.errors < earlier.errors {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, now) in self.buckets.iter().enumerate() {
            let before = earlier.buckets.get(i).copied().unwrap_or(0);
            buckets.push(now.checked_sub(before)?);
        }
        Some(StatsSnapshot {
            attempts: self.attempts - earlier.attempts,
            errors: self.errors - earlier.errors,
            buckets,
        })
    }

    /// Adds another window's counts (aggregating instances into a version or service).
    pub fn add(&mut self, other: &StatsSnapshot) {
        self.attempts += other.attempts;
        self.errors += other.errors;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    /// The `q` quantile of the recorded latencies (bucket upper bound), if any were.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_upper(i)));
            }
        }
        None
    }

    /// Errors / attempts, 0 without attempts.
    pub fn error_ratio(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            self.errors as f64 / self.attempts as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bounded() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1_000,
            12_345,
            1 << 20,
            1 << 31,
            u64::MAX,
        ] {
            let i = bucket_of(us);
            assert!(i >= last, "bucket of {us}");
            assert!(i < BUCKETS);
            last = i;
            if us < (1 << 31) {
                // The upper bound really is above the value, and at most ~25 % above.
                let up = bucket_upper(i);
                assert!(up >= us, "{us} -> {i} upper {up}");
                assert!(
                    up as f64 <= (us as f64 * 1.26).max(us as f64 + 1.0),
                    "{us}: {up}"
                );
            }
        }
    }

    #[test]
    fn p99_of_a_window() {
        let s = RequestStats::default();
        let before = s.snapshot();
        for _ in 0..990 {
            s.record_answer(200, Duration::from_millis(2));
        }
        for _ in 0..10 {
            s.record_answer(503, Duration::from_millis(300));
        }
        s.record_failure();
        let d = s.snapshot().delta(&before).unwrap();
        assert_eq!(d.attempts, 1001);
        assert_eq!(d.errors, 11);
        let p50 = d.quantile(0.5).unwrap();
        assert!(p50 >= Duration::from_millis(2) && p50 < Duration::from_micros(2500));
        let p99 = d.quantile(0.99).unwrap();
        assert!(p99 >= Duration::from_millis(2) && p99 < Duration::from_micros(2500));
        let p999 = d.quantile(0.999).unwrap();
        assert!(p999 >= Duration::from_millis(300) && p999 < Duration::from_millis(380));
        // A fresh endpoint (counters restarted) is not a negative delta.
        assert!(
            RequestStats::default()
                .snapshot()
                .delta(&s.snapshot())
                .is_none()
        );
    }
}
