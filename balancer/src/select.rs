//! Picking an instance: the version split first, then an instance by weight with the
//! service's algorithm. Lock-free: reads the table, atomics in endpoints, a thread-local RNG.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::Instant;

use catalog::Algorithm;

use crate::endpoint::now_ms;
use crate::table::{Group, Member, ServiceTable};

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9);
    let addr = &t as *const u64 as u64;
    (t ^ addr.rotate_left(32)) | 1
}

/// 64 random bits (xorshift64*; statistical quality is plenty for balancing and request
/// ids; never for secrets).
pub fn random_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A uniform number in `0..n` (`n` below 2^32).
pub fn random_below(n: u64) -> u64 {
    ((random_u64() >> 32) * n) >> 32
}

/// What a request asks of the pick beyond the split (both usually absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted {
    /// The version the request names (`version_pin`), an index into `ServiceTable::versions`.
    pub version: Option<usize>,
    /// The instance its sticky cookie names (`sticky`).
    pub instance: Option<u64>,
}

/// Picks an instance that is not in `tried`, preferring instances that are not ejected.
/// `None` when the service has no instance left to try.
/// `want`: the instance the request's sticky cookie names, if it is routable, untried, not
/// ejected and of the version the request names (if any); else that version's instances;
/// else, or once those have nothing left to try, the split decides.
/// `now`: the request's start (slow-start ramps are read against it).
pub fn pick<'a>(
    svc: &'a ServiceTable,
    want: Wanted,
    tried: &[usize],
    now: Instant,
) -> Option<&'a Member> {
    if svc.groups.is_empty() {
        return None;
    }
    let usable = |m: &Member, ms: &mut Option<u64>, ejection: bool| {
        if tried.contains(&(std::sync::Arc::as_ptr(&m.ep) as usize)) {
            return false;
        }
        // An instance at its `max_requests` takes no more (see `queue`).
        if let Some(l) = &svc.limit
            && m.ep.in_flight() >= l.max
        {
            return false;
        }
        if ejection && m.ep.ejected_until() != 0 {
            let t = *ms.get_or_insert_with(now_ms);
            return !m.ep.is_ejected(t);
        }
        true
    };
    let mut ms = None;
    if let Some(m) = want.instance.and_then(|id| svc.by_sticky_id.get(&id))
        && want.version.is_none_or(|v| m.version == v)
        && usable(m, &mut ms, true)
    {
        return Some(m);
    }
    let group = match want.version.and_then(|v| svc.version_groups.get(v)) {
        Some(g) if !g.members.is_empty() => g,
        _ => {
            let g = if svc.shares.is_empty() {
                0
            } else {
                let total = *svc.shares.last().unwrap_or(&0);
                let r = random_below(total);
                svc.shares.partition_point(|s| *s <= r)
            };
            &svc.groups[g.min(svc.groups.len() - 1)]
        }
    };
    for _ in 0..3 {
        let m = pick_in_group(group, svc.algorithm, now);
        if usable(m, &mut ms, true) {
            return Some(m);
        }
    }
    // Rare path (retries, ejections): scan the chosen group, then the whole service.
    let all = || std::iter::once(group).chain(svc.groups.iter());
    for ejection in [true, false] {
        if let Some(m) = all()
            .flat_map(|g| g.members.iter())
            .find(|m| usable(m, &mut ms, ejection))
        {
            return Some(m);
        }
    }
    None
}

fn weight(m: &Member, group: &Group, now: Instant) -> u64 {
    if group.ramp_until.is_some_and(|t| now < t) {
        m.ep.effective_weight(m.weight, now)
    } else {
        m.weight as u64
    }
}

/// A member drawn with probability proportional to its (effective) weight.
fn weighted_draw(group: &Group, now: Instant) -> usize {
    if group.members.len() == 1 {
        return 0;
    }
    if group.ramp_until.is_some_and(|t| now < t) {
        let total: u64 = group
            .members
            .iter()
            .map(|m| m.ep.effective_weight(m.weight, now))
            .sum();
        let mut r = random_below(total.max(1));
        for (i, m) in group.members.iter().enumerate() {
            let w = m.ep.effective_weight(m.weight, now);
            if r < w {
                return i;
            }
            r -= w;
        }
        return group.members.len() - 1;
    }
    let r = random_below(group.total.max(1));
    group
        .cumulative
        .partition_point(|c| *c <= r)
        .min(group.members.len() - 1)
}

/// `a` carries less load per unit of weight than `b` (ties go to `a`).
fn lighter(a: &Member, b: &Member, group: &Group, now: Instant) -> bool {
    let (la, lb) = (a.ep.in_flight() as u64, b.ep.in_flight() as u64);
    la * weight(b, group, now) <= lb * weight(a, group, now)
}

fn pick_in_group(group: &Group, algorithm: Algorithm, now: Instant) -> &Member {
    let n = group.members.len();
    match algorithm {
        Algorithm::P2c => {
            let a = &group.members[weighted_draw(group, now)];
            if n == 1 {
                return a;
            }
            let mut j = weighted_draw(group, now);
            if std::ptr::eq(&group.members[j], a) {
                j = weighted_draw(group, now);
            }
            let b = &group.members[j];
            if lighter(a, b, group, now) { a } else { b }
        }
        Algorithm::LeastConn => {
            let start = weighted_draw(group, now);
            let mut best = &group.members[start];
            for k in 1..n {
                let m = &group.members[(start + k) % n];
                if !lighter(best, m, group, now) {
                    best = m;
                }
            }
            best
        }
        Algorithm::RoundRobin => {
            let len = group.rr_order.len().max(1);
            let ramping = group.ramp_until.is_some_and(|t| now < t);
            for _ in 0..8 {
                let i = group.cursor.fetch_add(1, Ordering::Relaxed) % len;
                let m = &group.members[*group.rr_order.get(i).unwrap_or(&0) as usize];
                // Slow start: skip a ramping member with the probability it lacks.
                if !ramping
                    || random_below(m.weight.max(1) as u64) < m.ep.effective_weight(m.weight, now)
                {
                    return m;
                }
            }
            &group.members[weighted_draw(group, now)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::table::{Group, ServiceShared};
    use std::sync::Arc;
    use std::time::Duration;

    fn ep(i: usize, ramp: Option<Duration>) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            "s".into(),
            format!("i{i}").into(),
            "v1".into(),
            ([127, 0, 0, 1], 1000 + i as u16).into(),
            ramp,
            8,
            Duration::from_secs(60),
        ))
    }

    fn service(algorithm: Algorithm, weights: &[u32], ramp: Option<Duration>) -> ServiceTable {
        let members: Vec<Member> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Member {
                ep: ep(i, if i == 0 { ramp } else { None }),
                weight: *w,
                version: 0,
            })
            .collect();
        ServiceTable {
            name: "s".into(),
            algorithm,
            versions: vec!["v1".into()],
            version_groups: vec![Group::new(Vec::clone(&members))],
            by_sticky_id: members
                .iter()
                .map(|m| (m.ep.sticky_id, m.clone()))
                .collect(),
            groups: vec![Group::new(members)],
            shares: vec![],
            panic: false,
            limit: None,
            shared: Arc::new(ServiceShared::unregistered()),
        }
    }

    fn shares(svc: &ServiceTable, n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; svc.groups[0].members.len()];
        for _ in 0..n {
            let m = pick(svc, Wanted::default(), &[], Instant::now()).unwrap();
            let i = svc.groups[0]
                .members
                .iter()
                .position(|x| Arc::ptr_eq(&x.ep, &m.ep))
                .unwrap();
            counts[i] += 1;
        }
        counts.iter().map(|c| *c as f64 / n as f64).collect()
    }

    #[test]
    fn every_algorithm_honours_weights_when_idle() {
        for alg in [Algorithm::P2c, Algorithm::RoundRobin, Algorithm::LeastConn] {
            let s = shares(&service(alg, &[1, 2, 7], None), 20_000);
            for (got, want) in s.iter().zip([0.1, 0.2, 0.7]) {
                assert!((got - want).abs() < 0.02, "{alg:?}: {s:?}");
            }
        }
    }

    #[test]
    fn p2c_avoids_the_busy_instance() {
        let svc = service(Algorithm::P2c, &[1, 1], None);
        let busy = svc.groups[0].members[0].ep.clone();
        let _guards: Vec<_> = (0..10).map(|_| busy.start_request()).collect();
        let s = shares(&svc, 2000);
        // Only a draw of the busy instance twice picks it: ~25 %.
        assert!(s[0] < 0.35, "{s:?}");
    }

    #[test]
    fn slow_start_ramps_a_new_instance() {
        let svc = service(Algorithm::P2c, &[1, 1], Some(Duration::from_secs(100)));
        let s = shares(&svc, 5000);
        assert!(s[0] < 0.15, "{s:?}");
    }

    #[test]
    fn tried_and_ejected_instances_are_skipped() {
        let svc = service(Algorithm::RoundRobin, &[1, 1, 1], None);
        let m = &svc.groups[0].members;
        m[1].ep.eject(Duration::from_secs(60));
        let tried = [Arc::as_ptr(&m[0].ep) as usize];
        for _ in 0..50 {
            let p = pick(&svc, Wanted::default(), &tried, Instant::now()).unwrap();
            assert!(Arc::ptr_eq(&p.ep, &m[2].ep));
        }
        let tried = [
            Arc::as_ptr(&m[0].ep) as usize,
            Arc::as_ptr(&m[2].ep) as usize,
        ];
        // Only the ejected one is left: better than nothing.
        assert!(Arc::ptr_eq(
            &pick(&svc, Wanted::default(), &tried, Instant::now())
                .unwrap()
                .ep,
            &m[1].ep
        ));
        let all: Vec<_> = m.iter().map(|x| Arc::as_ptr(&x.ep) as usize).collect();
        assert!(pick(&svc, Wanted::default(), &all, Instant::now()).is_none());
    }

    #[test]
    fn a_sticky_instance_is_kept_while_it_can_serve() {
        let svc = service(Algorithm::RoundRobin, &[1, 1, 1], None);
        let m = &svc.groups[0].members;
        let want = Wanted {
            version: None,
            instance: Some(m[2].ep.sticky_id),
        };
        let now = Instant::now();
        for _ in 0..20 {
            assert!(Arc::ptr_eq(
                &pick(&svc, want, &[], now).unwrap().ep,
                &m[2].ep
            ));
        }
        // Tried (a retry), ejected, of another version than the one named, or unknown:
        // the usual pick.
        let tried = [Arc::as_ptr(&m[2].ep) as usize];
        assert!(!Arc::ptr_eq(
            &pick(&svc, want, &tried, now).unwrap().ep,
            &m[2].ep
        ));
        let other_version = Wanted {
            version: Some(1),
            ..want
        };
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&svc, other_version, &[], now).unwrap())
            .collect();
        assert!(picks.iter().any(|p| !Arc::ptr_eq(&p.ep, &m[2].ep)));
        m[2].ep.eject(Duration::from_secs(60));
        assert!(!Arc::ptr_eq(
            &pick(&svc, want, &[], now).unwrap().ep,
            &m[2].ep
        ));
        let unknown = Wanted {
            version: None,
            instance: Some(7),
        };
        assert!(pick(&svc, unknown, &[], now).is_some());
    }

    fn pinned(version: usize) -> Wanted {
        Wanted {
            version: Some(version),
            instance: None,
        }
    }

    #[test]
    fn a_pinned_version_is_picked_even_without_a_share() {
        // Split: v1 only; v2 is deployed (a dark launch) but has no share.
        let mut svc = service(Algorithm::P2c, &[1, 1], None);
        let dark = Member {
            ep: ep(9, None),
            weight: 1,
            version: 1,
        };
        svc.versions.push("v2".into());
        svc.version_groups.push(Group::new(vec![dark.clone()]));
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(pick(&svc, Wanted::default(), &[], now).unwrap().version, 0);
            assert!(Arc::ptr_eq(
                &pick(&svc, pinned(1), &[], now).unwrap().ep,
                &dark.ep
            ));
        }
        // Once the pinned version has nothing left to try, the split decides.
        let tried = [Arc::as_ptr(&dark.ep) as usize];
        assert_eq!(pick(&svc, pinned(1), &tried, now).unwrap().version, 0);
        // A version with no member (or out of range) leaves the request to the split.
        svc.version_groups[1] = Group::new(Vec::new());
        assert_eq!(pick(&svc, pinned(1), &[], now).unwrap().version, 0);
        assert_eq!(pick(&svc, pinned(7), &[], now).unwrap().version, 0);
    }
}
