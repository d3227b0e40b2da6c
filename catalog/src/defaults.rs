//! Every default of the catalog, in one place, so that the registrar, the checker, the
//! balancer and the renderer can never disagree about what an absent field means.

use std::time::Duration;

/// Weight of an instance that does not say otherwise. 0 means "no new traffic".
pub const WEIGHT: u32 = 100;
/// Consecutive passing probes before an instance is marked passing.
pub const RISE: u32 = 2;
/// Consecutive failing probes before an instance is marked critical.
pub const FALL: u32 = 3;
/// Time between two probes of one instance.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Time a probe may take before it counts as a failure.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a draining instance keeps its in-flight work before it is stopped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Ramp-up time of a newly passing instance; zero disables slow start.
pub const SLOW_START: Duration = Duration::ZERO;
/// Key prefix under which wharf keeps everything in etcd.
pub const PREFIX: &str = "/wharf/v1";
/// TTL asked for node-agent and checker leases (etcd may grant more).
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// Lowest status code a default HTTP check accepts.
pub const EXPECT_LOW: u16 = 200;
/// Highest status code a default HTTP check accepts.
pub const EXPECT_HIGH: u16 = 299;
