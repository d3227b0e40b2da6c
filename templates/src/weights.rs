//! Turning instance weights and a version split into per-server weights a proxy that knows
//! nothing of versions (HAProxy, nginx) can use, following DESIGN.md's rules:
//!
//! - no split: every routed instance competes by its `weight`;
//! - with a split: each listed version gets its share (normalised over the listed versions
//!   that have an instance able to take traffic), unlisted versions and split-0 versions get
//!   none, and inside a version the instance weights divide the version's share;
//! - if no listed version can take traffic, fall back to "every instance by weight".
//!
//! An instance's share of new requests is `split_share(version) × weight / Σ weights in version`;
//! its proxy weight is that share scaled so that the largest is 256 (HAProxy's maximum),
//! never rounded down to 0 when the share is positive.

use std::collections::BTreeMap;

/// The largest server weight HAProxy accepts.
pub const MAX_PROXY_WEIGHT: u32 = 256;

/// Share of new requests of each member (`(version, weight)`), summing to 1 unless nothing
/// can take traffic (then all 0).
pub fn shares(members: &[(&str, u32)], split: &BTreeMap<String, u32>) -> Vec<f64> {
    let by_weight = |keep: &dyn Fn(&str) -> bool| -> Vec<f64> {
        let total: u64 = members
            .iter()
            .filter(|(v, _)| keep(v))
            .map(|(_, w)| u64::from(*w))
            .sum();
        members
            .iter()
            .map(|(v, w)| {
                if total == 0 || !keep(v) {
                    0.0
                } else {
                    f64::from(*w) / total as f64
                }
            })
            .collect()
    };
    if split.is_empty() {
        return by_weight(&|_| true);
    }
    let mut version_weight: BTreeMap<&str, u64> = BTreeMap::new();
    for (v, w) in members {
        *version_weight.entry(v).or_default() += u64::from(*w);
    }
    // Versions that are listed, have a positive share and an instance that takes traffic.
    let live: BTreeMap<&str, u32> = split
        .iter()
        .filter(|(v, s)| **s > 0 && version_weight.get(v.as_str()).is_some_and(|w| *w > 0))
        .map(|(v, s)| (v.as_str(), *s))
        .collect();
    let split_total: u64 = live.values().map(|s| u64::from(*s)).sum();
    if split_total == 0 {
        return by_weight(&|_| true);
    }
    members
        .iter()
        .map(|(v, w)| match live.get(v) {
            Some(s) => {
                let version_share = f64::from(*s) / split_total as f64;
                version_share * f64::from(*w) / version_weight[v] as f64
            }
            None => 0.0,
        })
        .collect()
}

/// Integer proxy weights (0..=256) proportional to `shares`. Without a split, the
/// operators' own weights are kept as they are when they fit, so the rendered file reads
/// like the catalog.
pub fn proxy_weights(shares: &[f64], raw: &[u32], split_active: bool) -> Vec<u32> {
    if !split_active && raw.iter().all(|w| *w <= MAX_PROXY_WEIGHT) {
        return raw.to_vec();
    }
    let max = shares.iter().copied().fold(0.0_f64, f64::max);
    shares
        .iter()
        .map(|s| {
            if *s <= 0.0 || max <= 0.0 {
                0
            } else {
                ((s / max * f64::from(MAX_PROXY_WEIGHT)).round() as u32).clamp(1, MAX_PROXY_WEIGHT)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(v, s)| (v.to_string(), *s)).collect()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn no_split_is_by_weight() {
        let s = shares(&[("v1", 100), ("v1", 300), ("v2", 0)], &BTreeMap::new());
        assert!(close(&s, &[0.25, 0.75, 0.0]), "{s:?}");
        assert_eq!(proxy_weights(&s, &[100, 300, 0], false), vec![85, 256, 0]);
        assert_eq!(proxy_weights(&s, &[100, 200, 0], false), vec![100, 200, 0]);
    }

    #[test]
    fn split_is_share_times_weight_normalised_per_version() {
        // v1 has three instances, v2 one: v2's single server must still get 10 %.
        let members = [("v1", 100), ("v1", 100), ("v1", 100), ("v2", 100)];
        let s = shares(&members, &split(&[("v1", 90), ("v2", 10)]));
        assert!(close(&s, &[0.3, 0.3, 0.3, 0.1]), "{s:?}");
        assert_eq!(proxy_weights(&s, &[100; 4], true), vec![256, 256, 256, 85]);
    }

    #[test]
    fn unlisted_and_zero_versions_get_nothing() {
        let members = [("v1", 100), ("v2", 100), ("v3", 100)];
        let s = shares(&members, &split(&[("v1", 100), ("v2", 0)]));
        assert!(close(&s, &[1.0, 0.0, 0.0]), "{s:?}");
    }

    #[test]
    fn listed_version_without_instances_gives_its_share_to_the_others() {
        let s = shares(&[("v1", 100)], &split(&[("v1", 50), ("v2", 50)]));
        assert!(close(&s, &[1.0]), "{s:?}");
    }

    #[test]
    fn falls_back_to_weights_when_no_listed_version_can_serve() {
        let s = shares(&[("v1", 100), ("v1", 300)], &split(&[("v9", 100)]));
        assert!(close(&s, &[0.25, 0.75]), "{s:?}");
    }

    #[test]
    fn tiny_positive_share_is_never_zero() {
        let s = shares(&[("v1", 100), ("v2", 1)], &split(&[("v1", 999), ("v2", 1)]));
        assert_eq!(proxy_weights(&s, &[100, 1], true), vec![256, 1]);
    }

    #[test]
    fn all_zero_weights_route_nothing() {
        let s = shares(&[("v1", 0)], &BTreeMap::new());
        assert_eq!(proxy_weights(&s, &[0], true), vec![0]);
    }
}
