//! Which checker probes which instance: rendezvous (highest random weight) hashing.
//!
//! Every replica sees the same set of live checkers (the `checkers/` prefix) and computes
//! the same owner for every instance, without talking to the others. When a checker joins
//! or leaves, only the instances it gains or loses move. The hash must be identical across
//! processes, builds and versions, so it is spelled out here (FNV-1a, then a SplitMix64
//! finaliser for avalanche) rather than taken from `std`'s randomly keyed hasher.

use catalog::CheckerId;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `checker` for the instance named `item` (e.g. `<svc>/<id>`).
pub fn score(checker: &str, item: &str) -> u64 {
    let h = fnv1a(FNV_OFFSET, checker.as_bytes());
    // A separator byte that no DNS label contains keeps ("ab","c") apart from ("a","bc").
    let h = fnv1a(h, b"\xff");
    splitmix(fnv1a(h, item.as_bytes()))
}

/// The checker that owns `item`: the highest score, ties broken by the smaller id.
pub fn owner<'a>(
    item: &str,
    checkers: impl IntoIterator<Item = &'a CheckerId>,
) -> Option<&'a CheckerId> {
    checkers
        .into_iter()
        .map(|c| (score(c.as_str(), item), c))
        .max_by(|(sa, ca), (sb, cb)| sa.cmp(sb).then_with(|| cb.cmp(ca)))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ids(names: &[&str]) -> Vec<CheckerId> {
        names.iter().map(|n| CheckerId::new(*n).unwrap()).collect()
    }

    #[test]
    fn the_hash_is_fixed() {
        // Replicas of different builds must agree: pin the function's output.
        assert_eq!(
            score("hc-1", "web/n1-web-0-80"),
            score("hc-1", "web/n1-web-0-80")
        );
        assert_eq!(score("", ""), splitmix(fnv1a(FNV_OFFSET, b"\xff")));
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    #[test]
    fn spreads_evenly_and_moves_only_the_dead_checkers_items() {
        let three = ids(&["hc-a", "hc-b", "hc-c"]);
        let items: Vec<String> = (0..3000).map(|i| format!("web/n{i}-web-0-80")).collect();
        let before: Vec<&CheckerId> = items.iter().map(|i| owner(i, &three).unwrap()).collect();
        let mut counts = BTreeMap::new();
        for o in &before {
            *counts.entry(o.as_str()).or_insert(0) += 1;
        }
        for (c, n) in &counts {
            assert!((800..1200).contains(n), "{c} owns {n} of 3000");
        }
        let two = ids(&["hc-a", "hc-c"]);
        for (item, old) in items.iter().zip(&before) {
            let new = owner(item, &two).unwrap();
            if old.as_str() != "hc-b" {
                assert_eq!(new, *old, "{item} moved although its owner lives");
            }
        }
        // Order of the checker list does not matter.
        let reversed: Vec<CheckerId> = three.iter().rev().cloned().collect();
        for (item, old) in items.iter().zip(&before) {
            assert_eq!(owner(item, &reversed).unwrap(), *old);
        }
    }

    #[test]
    fn no_checkers_no_owner() {
        assert_eq!(owner("web/x", &Vec::<CheckerId>::new()), None);
    }
}
