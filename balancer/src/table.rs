//! The routing table: everything a request needs, immutable, swapped as one `Arc`.
//!
//! A request does one `ArcSwap::load`, then only reads this structure and bumps atomics in
//! the endpoints and metric handles it points to. Listener settings, routes, services,
//! endpoints, weights and metric handles all live here and change together.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use catalog::Algorithm;
use prometheus::IntCounter;

use crate::endpoint::Endpoint;
use crate::metrics::ClassCounters;

#[derive(Default)]
pub struct RoutingTable {
    pub listeners: Vec<ListenerTable>,
    /// etcd revision the table reflects (0 without etcd).
    pub revision: i64,
}

impl RoutingTable {
    pub fn listener(&self, name: &str) -> Option<&ListenerTable> {
        self.listeners.iter().find(|l| &*l.name == name)
    }
}

/// Per-listener settings that may change on reload without rebinding.
#[derive(Clone)]
pub struct ListenerSettings {
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_body_bytes: u64,
    /// Add `X-Forwarded-*` headers upstream (`forwarded_headers`).
    pub forwarded_headers: bool,
    /// The header of each request's id, lower case (`request_id_header`).
    pub request_id: Option<http::HeaderName>,
    /// Answer every request with a redirect to HTTPS on this port (`redirect_https`).
    pub redirect_https: Option<u16>,
    pub retries: u32,
    pub retry_budget_percent: u32,
    pub access_log: bool,
    pub outlier_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    /// What a `tcp` listener's connections stream with (read once per connection).
    pub tcp: TcpSettings,
}

/// A `tcp` listener's streaming settings; a SIGHUP changes them for new connections.
#[derive(Debug, Clone, Copy)]
pub struct TcpSettings {
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub bulk_batching: bool,
}

pub struct ListenerTable {
    pub name: Arc<str>,
    /// Connections accepted for the other protocol (by the loop a reload replaced) find
    /// no routes here for them: they are closed, not sent to the wrong kind of service.
    pub protocol: crate::config::ListenerProtocol,
    pub settings: ListenerSettings,
    pub routes: Vec<Route>,
    /// Answers of requests that matched no route.
    pub unrouted: ClassCounters,
}

impl ListenerTable {
    /// The first route matching `path` and the request's host (port stripped). `host` is
    /// asked for (the `Host` header looked up) only if a candidate route names a host.
    pub fn route<'h>(&self, host: impl Fn() -> &'h str, path: &str) -> Option<&Route> {
        let mut known: Option<&str> = None;
        self.routes.iter().find(|r| {
            path.starts_with(&*r.path_prefix)
                && (matches!(r.host, HostMatch::Any)
                    || r.host.matches(known.get_or_insert_with(&host)))
        })
    }
}

pub enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    pub fn parse(host: Option<&str>) -> Self {
        match host {
            None | Some("*") | Some("") => HostMatch::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

pub struct Route {
    pub host: HostMatch,
    pub path_prefix: Box<str>,
    pub service_name: Arc<str>,
    /// `None` while the service is unknown (not static, not in etcd): 503.
    pub service: Option<Arc<ServiceTable>>,
    /// Indexed like `service.versions`.
    pub by_version: Vec<ClassCounters>,
    /// Answers that reached no instance.
    pub unpicked: ClassCounters,
    /// The service's PROXY header / TLS towards its instances; `None`: plain TCP.
    pub upstream: Option<Arc<crate::tcp::UpstreamOpts>>,
    /// Where a request may name the version it wants (`version_header`/`version_cookie`).
    pub pin: Option<crate::version_pin::VersionPin>,
    /// The instance gets the path without `path_prefix` (`strip_prefix`).
    pub strip_prefix: bool,
    /// Clients are kept on the instance that first answered them (`sticky_cookie`).
    pub sticky: Option<crate::sticky::Sticky>,
    /// Answer statuses sent again to another instance (`retry_on`; idempotent requests
    /// without a body only).
    pub retry_on: Box<[u16]>,
    /// Overrides the listener's response timeout (`response_timeout` on the route).
    pub response_timeout: Option<Duration>,
    /// The client networks it serves (`allow_sources`); `None`: every client.
    pub allow: Option<Box<[crate::cidr::Cidr]>>,
    /// Requests per second per client (`rate_limit`).
    pub rate_limit: Option<Arc<crate::rate_limit::RateLimiter>>,
    /// `allow` or `rate_limit` is set: the client is checked before anything else.
    pub checks_clients: bool,
    /// A share of its GET/HEAD requests copied to one version (`mirror`).
    pub mirror: Option<Box<crate::mirror::Mirror>>,
    /// `request_headers` / `response_headers` rules (`header_rules`).
    pub request_rules: Option<crate::header_rules::HeaderRules>,
    pub response_rules: Option<crate::header_rules::HeaderRules>,
}

/// State of a service that survives table swaps.
pub struct ServiceShared {
    /// Retry tokens in tenths: each request adds `budget_percent / 10` tenths, each retry
    /// costs 10; capped so an idle service cannot save up a storm.
    retry_tokens: AtomicI64,
    pub connect_errors: IntCounter,
    pub retries_connect: IntCounter,
    pub retries_reset: IntCounter,
    /// Retries of a route's `retry_on` answers.
    pub retries_status: IntCounter,
    pub ejections: IntCounter,
    /// Requests waiting for an instance below its `max_requests`.
    pub queue: Arc<crate::queue::SlotQueue>,
}

const TOKEN_CAP: i64 = 1000;

impl ServiceShared {
    /// With counters registered nowhere (unit tests).
    #[cfg(test)]
    pub fn unregistered() -> Self {
        let c = || IntCounter::new("x", "x").unwrap();
        Self::new(
            c(),
            c(),
            c(),
            c(),
            c(),
            crate::queue::SlotQueue::new(c(), c()),
        )
    }

    pub fn new(
        connect_errors: IntCounter,
        retries_connect: IntCounter,
        retries_reset: IntCounter,
        retries_status: IntCounter,
        ejections: IntCounter,
        queue: crate::queue::SlotQueue,
    ) -> Self {
        Self {
            // A floor of 10 retries so a quiet service can still retry.
            retry_tokens: AtomicI64::new(100),
            connect_errors,
            retries_connect,
            retries_reset,
            retries_status,
            ejections,
            queue: Arc::new(queue),
        }
    }

    pub fn deposit(&self, percent: u32) {
        let add = percent as i64 / 10;
        if add > 0 && self.retry_tokens.load(Ordering::Relaxed) < TOKEN_CAP {
            self.retry_tokens.fetch_add(add, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget.
    pub fn withdraw(&self) -> bool {
        self.retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= 10).then_some(t - 10)
            })
            .is_ok()
    }
}

#[derive(Clone)]
pub struct Member {
    pub ep: Arc<Endpoint>,
    pub weight: u32,
    /// Index into `ServiceTable::versions`.
    pub version: usize,
}

/// Instances that compete by weight: one version of a split, or the whole service.
pub struct Group {
    pub members: Vec<Member>,
    /// Running sums of static weights, for weighted random draws.
    pub cumulative: Vec<u64>,
    pub total: u64,
    /// Smooth weighted round-robin order (member indices), walked by `cursor`.
    pub rr_order: Vec<u32>,
    pub cursor: AtomicUsize,
    /// Until then some member is in slow start and weights are computed per pick.
    pub ramp_until: Option<Instant>,
}

pub struct ServiceTable {
    pub name: Arc<str>,
    pub algorithm: Algorithm,
    pub versions: Vec<Arc<str>>,
    pub groups: Vec<Group>,
    /// Running sums of the groups' split shares; empty when there is one group.
    pub shares: Vec<u64>,
    /// Indexed like `versions`: each version's members as one group, whether the split
    /// gives it a share or not (empty for a version without a routable member), for
    /// requests pinned to a version.
    pub version_groups: Vec<Group>,
    /// Every routable member by its sticky id, for requests whose cookie names one.
    pub by_sticky_id: HashMap<u64, Member>,
    /// Routing to all serving instances because none passed (or no checker is alive).
    pub panic: bool,
    /// `max_requests` per instance and how long a request waits for one (`queue`).
    pub limit: Option<SlotLimit>,
    pub shared: Arc<ServiceShared>,
}

/// A service's `max_requests` and `queue_timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotLimit {
    pub max: u32,
    pub queue_timeout: Duration,
}

impl ServiceTable {
    pub fn member_count(&self) -> usize {
        self.groups.iter().map(|g| g.members.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

impl Group {
    pub fn new(members: Vec<Member>) -> Self {
        let mut cumulative = Vec::with_capacity(members.len());
        let mut total = 0u64;
        for m in &members {
            total += m.weight as u64;
            cumulative.push(total);
        }
        let rr_order = smooth_wrr_order(&members.iter().map(|m| m.weight).collect::<Vec<_>>());
        let ramp_until = members.iter().filter_map(|m| m.ep.ramp_end()).max();
        Self {
            members,
            cumulative,
            total,
            rr_order,
            cursor: AtomicUsize::new(0),
            ramp_until,
        }
    }
}

/// nginx's smooth weighted round robin, unrolled once into a fixed order. Weights are
/// divided by their gcd and the order is capped at 4096 picks (weights are scaled down
/// proportionally beyond that), so building stays cheap.
pub fn smooth_wrr_order(weights: &[u32]) -> Vec<u32> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let g = weights
        .iter()
        .filter(|w| **w > 0)
        .fold(0u64, |g, w| gcd(g, *w as u64));
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|x| *x as u64 / g).collect();
    let mut total: u64 = w.iter().sum();
    if total > 4096 {
        w = w
            .iter()
            .map(|x| {
                if *x == 0 {
                    0
                } else {
                    (x * 4096 / total).max(1)
                }
            })
            .collect();
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        order.push(best as u32);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrr_order_is_smooth_and_proportional() {
        let order = smooth_wrr_order(&[5, 1, 1]);
        assert_eq!(order, vec![0, 0, 1, 0, 2, 0, 0]);
        let order = smooth_wrr_order(&[100, 200, 700]);
        assert_eq!(order.len(), 10);
        assert_eq!(order.iter().filter(|i| **i == 2).count(), 7);
        assert!(smooth_wrr_order(&[0, 0]).is_empty());
    }

    #[test]
    fn host_matching() {
        assert!(HostMatch::parse(Some("*.ex.com")).matches("a.EX.com"));
        assert!(!HostMatch::parse(Some("*.ex.com")).matches("ex.com"));
        assert!(HostMatch::parse(Some("Ex.com")).matches("ex.com"));
        assert!(HostMatch::parse(None).matches("anything"));
    }

    #[test]
    fn retry_budget_is_bounded() {
        let s = ServiceShared::unregistered();
        let mut granted = 0;
        while s.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10);
        for _ in 0..50 {
            s.deposit(20);
        }
        // 50 requests at 20 % earn 10 retries.
        assert!(s.withdraw());
        let mut more = 0;
        while s.withdraw() {
            more += 1;
        }
        assert_eq!(more, 9);
    }
}
