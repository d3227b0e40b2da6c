//! A route's `rate_limit`: requests per second per client, with a burst (a token bucket
//! per client address: Traefik's `rateLimit`, HAProxy's `http_req_rate` stick tables,
//! nginx's `limit_req`). A request over the limit gets 429 with `Retry-After` and never
//! reaches an instance.
//!
//! Clients are told apart by their address (the real client: the one a trusted PROXY
//! header announces); an IPv6 client by its /64, the block one host usually holds, so that
//! walking through its own addresses does not buy it new buckets. The buckets are kept in
//! shards behind short mutexes (held for one lookup, never across an await) and bounded:
//! a full shard first drops the buckets that have refilled (a client that came back would
//! get a full one anyway), then, if it must, the half seen longest ago.
//!
//! A limiter belongs to (listener, route) and lives across routing-table swaps while its
//! settings stay ([`Limiters`]): an etcd change or a SIGHUP that leaves the route's limit
//! alone does not hand every client a fresh burst.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde::Deserialize;

/// `rate_limit = { per_second = 100, burst = 200 }` on a route.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second a client may keep up.
    pub per_second: f64,
    /// Requests a client may send at once after a pause (the bucket's size); default:
    /// one second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimitConfig {
    /// The bucket size.
    pub fn burst(&self) -> f64 {
        match self.burst {
            Some(b) => f64::from(b),
            None => self.per_second.ceil().max(1.0),
        }
    }

    /// Why the settings cannot work, if they cannot: (key, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err((
                "per_second",
                format!("{} must be more than 0", self.per_second),
            ));
        }
        if self.burst == Some(0) {
            return Err(("burst", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Shards of buckets; a power of two.
const SHARDS: usize = 16;
/// Buckets kept per shard at most (65,536 clients in all).
const PER_SHARD: usize = 4096;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    config: RateLimitConfig,
    rate: f64,
    burst: f64,
    shards: Box<[Mutex<HashMap<IpAddr, Bucket>>]>,
    /// `balancer_rate_limited_total{listener,service}`.
    limited: IntCounter,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig, limited: IntCounter) -> Self {
        Self {
            rate: config.per_second,
            burst: config.burst(),
            config,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            limited,
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Takes a token for a request from `ip` at `now`; over the limit, how long until a
    /// token is there (counted as limited).
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(ip);
        let mut shard = self.shards[shard_of(&key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !shard.contains_key(&key) && shard.len() >= PER_SHARD {
            self.make_room(&mut shard, now);
        }
        let b = shard.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - b.tokens;
        drop(shard);
        self.limited.inc();
        Err(Duration::from_secs_f64(missing / self.rate))
    }

    /// A full shard: drop the buckets that have refilled; if that leaves it more than
    /// three quarters full, keep only the half seen last. Either way the next sweep is at
    /// least a quarter of a shard's new clients away, so a flood of new clients costs a
    /// bounded amount of work per request.
    #[cold]
    fn make_room(&self, shard: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let refill = Duration::from_secs_f64(self.burst / self.rate);
        shard.retain(|_, b| now.saturating_duration_since(b.at) < refill);
        if shard.len() > PER_SHARD * 3 / 4 {
            let mut ages: Vec<(Instant, IpAddr)> = shard.iter().map(|(k, b)| (b.at, *k)).collect();
            let cut = ages.len() - PER_SHARD / 2;
            ages.select_nth_unstable(cut);
            for (_, k) in &ages[..cut] {
                shard.remove(k);
            }
        }
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// What tells clients apart: the address, an IPv6 one cut to its /64 (IPv4-mapped ones
/// count as IPv4).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
        v4 => v4,
    }
}

fn shard_of(key: &IpAddr) -> usize {
    // The low bits of the address spread clients of one network over the shards.
    let low = match key {
        IpAddr::V4(v4) => u32::from(*v4) as usize,
        IpAddr::V6(v6) => (u128::from(*v6) >> 64) as usize,
    };
    (low ^ (low >> 8)) & (SHARDS - 1)
}

/// The limiters of the current routes, by (listener, route index), kept across table
/// builds while a route's settings stay the same.
#[derive(Default)]
pub struct Limiters {
    by_route: HashMap<(Arc<str>, usize), Arc<RateLimiter>>,
    /// The routes asked for since the last [`Limiters::prune`].
    used: std::collections::HashSet<(Arc<str>, usize)>,
}

impl Limiters {
    /// The limiter of route `index` of `listener` under `config`: the one it had if its
    /// settings did not change, else a new one (`counter` makes its metric).
    pub fn get(
        &mut self,
        listener: &Arc<str>,
        index: usize,
        config: RateLimitConfig,
        counter: impl FnOnce() -> IntCounter,
    ) -> Arc<RateLimiter> {
        self.used.insert((listener.clone(), index));
        let slot = self.by_route.entry((listener.clone(), index));
        match slot {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if *o.get().config() != config {
                    o.insert(Arc::new(RateLimiter::new(config, counter())));
                }
                o.get().clone()
            }
            std::collections::hash_map::Entry::Vacant(v) => v
                .insert(Arc::new(RateLimiter::new(config, counter())))
                .clone(),
        }
    }

    /// After a table build: the limiters of routes that were not asked for go.
    pub fn prune(&mut self) {
        let used = std::mem::take(&mut self.used);
        self.by_route.retain(|k, _| used.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32) -> RateLimiter {
        let config = RateLimitConfig {
            per_second,
            burst: Some(burst),
        };
        RateLimiter::new(config, IntCounter::new("t", "t").unwrap())
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = limiter(10.0, 3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(ip, t0).is_ok());
        }
        let wait = l.check(ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Another client has its own bucket.
        assert!(l.check("10.0.0.2".parse().unwrap(), t0).is_ok());
        // 100 ms later one token is back, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check(ip, t1).is_ok());
        assert!(l.check(ip, t1).is_err());
        // A long pause refills to the burst, no further.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.check(ip, t2).is_ok());
        }
        assert!(l.check(ip, t2).is_err());
        assert_eq!(l.limited.get(), 3);
    }

    #[test]
    fn an_ipv6_host_is_one_client_across_its_64() {
        let l = limiter(1.0, 1);
        let t0 = Instant::now();
        assert!(l.check("2001:db8:1:2::1".parse().unwrap(), t0).is_ok());
        assert!(
            l.check("2001:db8:1:2:ffff::9".parse().unwrap(), t0)
                .is_err()
        );
        assert!(l.check("2001:db8:1:3::1".parse().unwrap(), t0).is_ok());
        // An IPv4-mapped client is its IPv4 address.
        assert!(l.check("192.0.2.1".parse().unwrap(), t0).is_ok());
        assert!(l.check("::ffff:192.0.2.1".parse().unwrap(), t0).is_err());
    }

    #[test]
    fn the_buckets_stay_bounded() {
        let l = limiter(1.0, 5);
        let t0 = Instant::now();
        for i in 0..(SHARDS * PER_SHARD + 10_000) as u32 {
            let _ = l.check(IpAddr::V4(i.into()), t0);
        }
        assert!(l.clients() <= SHARDS * PER_SHARD, "{}", l.clients());
        // The client seen last still has its (empty) bucket: no new burst for it.
        let last = IpAddr::V4(((SHARDS * PER_SHARD + 10_000 - 1) as u32).into());
        for _ in 0..4 {
            let _ = l.check(last, t0);
        }
        assert!(l.check(last, t0).is_err());
    }

    #[test]
    fn settings_are_checked() {
        let bad = |per_second, burst| RateLimitConfig { per_second, burst }.check();
        assert_eq!(bad(0.0, None).unwrap_err().0, "per_second");
        assert_eq!(bad(f64::NAN, None).unwrap_err().0, "per_second");
        assert_eq!(bad(1.0, Some(0)).unwrap_err().0, "burst");
        assert!(bad(0.5, None).is_ok());
        assert_eq!(
            RateLimitConfig {
                per_second: 2.5,
                burst: None
            }
            .burst(),
            3.0
        );
    }

    #[test]
    fn a_limiter_outlives_table_builds_while_its_settings_stay() {
        let mut ls = Limiters::default();
        let name: Arc<str> = "web".into();
        let c = RateLimitConfig {
            per_second: 1.0,
            burst: None,
        };
        let counter = || IntCounter::new("t", "t").unwrap();
        let a = ls.get(&name, 0, c, counter);
        assert!(Arc::ptr_eq(&a, &ls.get(&name, 0, c, counter)));
        let c2 = RateLimitConfig {
            per_second: 2.0,
            ..c
        };
        let b = ls.get(&name, 0, c2, counter);
        assert!(!Arc::ptr_eq(&a, &b));
        ls.prune();
        // A build without the route drops its limiter.
        ls.prune();
        assert!(!Arc::ptr_eq(&b, &ls.get(&name, 0, c2, counter)));
    }
}
