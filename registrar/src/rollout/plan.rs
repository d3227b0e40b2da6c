//! Pure decisions of a rollout: parsing its options, the split of each canary step, and the
//! next move of a plain rolling replacement. No I/O; unit-tested.

use std::collections::BTreeMap;

/// Parses `5,25,50,100`: strictly increasing percentages in 1..=100; 100 is appended when
/// missing (a rollout always ends with all traffic on the new version).
pub fn parse_steps(s: &str) -> Result<Vec<u32>, String> {
    let mut steps = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u32 = part
            .trim_end_matches('%')
            .parse()
            .map_err(|_| format!("--steps: {part:?} is not a percentage"))?;
        if !(1..=100).contains(&n) {
            return Err(format!("--steps: {n} is outside 1..=100"));
        }
        if steps.last().is_some_and(|&last| n <= last) {
            return Err(format!(
                "--steps must increase: {n} after {}",
                steps[steps.len() - 1]
            ));
        }
        steps.push(n);
    }
    if steps.is_empty() {
        return Err("--steps: no step given".into());
    }
    if steps.last() != Some(&100) {
        steps.push(100);
    }
    Ok(steps)
}

/// Parses an error rate: `1%`, `0.5%` or a fraction such as `0.01`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?}: expected a rate such as 1% or 0.01");
    let v = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => s.trim().parse::<f64>().map_err(|_| bad())?,
    };
    if !(0.0..=1.0).contains(&v) {
        return Err(bad());
    }
    Ok(v)
}

/// The split of a canary step at `percent` % for `new`: the old versions share the rest in
/// proportion to their replica counts. Shares are relative, so they are scaled by the
/// total old replica count to stay integers.
pub fn canary_split(old: &BTreeMap<String, u32>, new: &str, percent: u32) -> BTreeMap<String, u32> {
    let total: u32 = old.values().sum::<u32>().max(1);
    let mut split: BTreeMap<String, u32> = old
        .iter()
        .filter(|(v, _)| v.as_str() != new)
        .map(|(v, n)| (v.clone(), (100 - percent) * n))
        .collect();
    split.insert(new.to_owned(), percent * total);
    split
}

/// The share of `version` in a split, in percent.
pub fn share(split: &BTreeMap<String, u32>, version: &str) -> f64 {
    let total: u32 = split.values().sum();
    if total == 0 {
        return 0.0;
    }
    f64::from(split.get(version).copied().unwrap_or(0)) * 100.0 / f64::from(total)
}

/// What a plain rolling replacement does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainMove {
    /// Start this many new replicas (then wait until they pass their checks).
    Start(u16),
    /// Drain and stop this many old replicas.
    Stop(usize),
    Done,
}

/// Never more than `max(target, old_total) + surge` replicas, never fewer serving than
/// `min(target, old_total)`: replace at most `surge` at a time. Derived from what runs now
/// (not from a counter), so an interrupted rollout resumes with the right move.
pub fn plain_next(
    running_new: u16,
    target: u16,
    remaining_old: usize,
    old_total: usize,
    surge: u16,
) -> PlainMove {
    let keep = usize::from(target).max(old_total);
    let excess = (usize::from(running_new) + remaining_old).saturating_sub(keep);
    if excess > 0 && remaining_old > 0 {
        return PlainMove::Stop(excess.min(remaining_old));
    }
    if running_new < target {
        return PlainMove::Start(surge.max(1).min(target - running_new));
    }
    if remaining_old > 0 {
        return PlainMove::Stop(remaining_old);
    }
    PlainMove::Done
}

/// The lowest replica indexes not used by any container name `<service>-<version>-<i>`.
pub fn free_indexes(used: &[String], service: &str, version: &str, n: u16) -> Vec<u16> {
    let prefix = format!("{service}-{version}-");
    let taken: Vec<u16> = used
        .iter()
        .filter_map(|name| name.strip_prefix(&prefix)?.parse().ok())
        .collect();
    (0..=u16::MAX)
        .filter(|i| !taken.contains(i))
        .take(usize::from(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_end_at_100() {
        assert_eq!(parse_steps("5,25,50,100").unwrap(), vec![5, 25, 50, 100]);
        assert_eq!(parse_steps("10%, 50").unwrap(), vec![10, 50, 100]);
        assert_eq!(parse_steps("100").unwrap(), vec![100]);
        for bad in ["", "0,50", "50,25", "5,5", "101", "x"] {
            assert!(parse_steps(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("1%").unwrap(), 0.01);
        assert_eq!(parse_rate("0.5 %").unwrap(), 0.005);
        assert_eq!(parse_rate("0.02").unwrap(), 0.02);
        for bad in ["", "2", "-1%", "x%", "150%"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canary_split_gives_the_step_share_to_the_new_version() {
        let old: BTreeMap<String, u32> = [("v1".to_string(), 4)].into();
        let s = canary_split(&old, "v2", 5);
        assert_eq!(share(&s, "v2"), 5.0);
        assert_eq!(share(&s, "v1"), 95.0);
        let s = canary_split(&old, "v2", 0);
        assert_eq!(share(&s, "v2"), 0.0);
        assert_eq!(share(&canary_split(&old, "v2", 100), "v2"), 100.0);
        // Two old versions share the rest by replica count.
        let old: BTreeMap<String, u32> = [("v0".to_string(), 1), ("v1".to_string(), 3)].into();
        let s = canary_split(&old, "v2", 20);
        assert_eq!(share(&s, "v2"), 20.0);
        assert_eq!(share(&s, "v0"), 20.0);
        assert_eq!(share(&s, "v1"), 60.0);
    }

    /// Plays a plain rollout to the end; returns the moves and the peak replica count.
    fn play(target: u16, old: usize, surge: u16) -> (Vec<PlainMove>, usize, usize) {
        let (mut new, mut rem, mut peak, mut low) = (0u16, old, old, old);
        let mut moves = Vec::new();
        loop {
            let m = plain_next(new, target, rem, old, surge);
            moves.push(m);
            match m {
                PlainMove::Start(n) => new += n,
                PlainMove::Stop(n) => rem -= n,
                PlainMove::Done => break,
            }
            peak = peak.max(usize::from(new) + rem);
            low = low.min(usize::from(new) + rem);
            assert!(moves.len() < 100);
        }
        (moves, peak, low)
    }

    #[test]
    fn plain_rollout_replaces_one_surge_at_a_time() {
        use PlainMove::*;
        let (m, peak, low) = play(4, 4, 1);
        assert_eq!(
            m,
            [
                Start(1),
                Stop(1),
                Start(1),
                Stop(1),
                Start(1),
                Stop(1),
                Start(1),
                Stop(1),
                Done
            ]
        );
        assert_eq!((peak, low), (5, 4));
        let (_, peak, low) = play(4, 4, 2);
        assert_eq!((peak, low), (6, 4));
        // Scaling down (2 new for 4 old) and up (4 new for 2 old) on the way.
        let (_, peak, low) = play(2, 4, 1);
        assert_eq!((peak, low), (5, 2));
        let (_, peak, low) = play(4, 2, 1);
        assert_eq!((peak, low), (5, 2));
    }

    #[test]
    fn plain_rollout_resumes_after_an_interruption() {
        // Interrupted after a start, before its stop: the stop comes first.
        assert_eq!(plain_next(2, 4, 3, 4, 1), PlainMove::Stop(1));
        assert_eq!(plain_next(4, 4, 0, 4, 1), PlainMove::Done);
    }

    #[test]
    fn free_indexes_skip_names_in_use() {
        let used = vec!["web-v2-0".to_string(), "web-v2-2".into(), "web-v1-1".into()];
        assert_eq!(free_indexes(&used, "web", "v2", 3), vec![1, 3, 4]);
    }
}
