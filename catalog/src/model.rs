//! The values stored in etcd, as JSON. Field names are the wire format: change them only
//! together with DESIGN.md. Unknown fields are ignored so that an older reader keeps working
//! beside a newer writer.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::defaults;
use crate::names::{CheckerId, InstanceId, NodeName, ServiceName, Version};

/// Application protocol an instance speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

/// What the owner of an instance wants for it. Health is a separate key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Takes new requests once its health is passing.
    #[default]
    Serving,
    /// Takes no new requests; in-flight work finishes before the instance is stopped.
    Draining,
}

/// One registered endpoint of a service: `services/<svc>/instances/<id>`, written by the
/// registrar under its node lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub service: ServiceName,
    pub version: Version,
    pub node: NodeName,
    pub addr: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: InstanceState,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
    /// Replaces the service's check for this instance only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
}

fn default_weight() -> u32 {
    defaults::WEIGHT
}

impl Instance {
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr, self.port)
    }
}

/// Verdict of the health checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Critical,
}

/// A health mark: `services/<svc>/health/<id>`, written by a checker under its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    /// When the status last changed, in milliseconds since the Unix epoch.
    pub since: u64,
    pub checker: CheckerId,
    /// Probes in a row that agreed with `status` when the mark was written.
    #[serde(default)]
    pub consecutive: u32,
    /// Last probe's output (status line or error), truncated by the writer.
    #[serde(default)]
    pub output: String,
    /// `mod_revision` of the instance key the verdict is about; a mark about an older
    /// registration must not be applied to a newer one.
    pub observed_mod_rev: i64,
}

/// How an instance is probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// HTTP `GET <path>` when set; a TCP connect when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Host header of HTTP probes (the instance address when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default = "default_interval", with = "duration_str")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "duration_str")]
    pub timeout: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Accepted HTTP status codes.
    #[serde(default = "default_expect")]
    pub expect: Vec<StatusRange>,
    /// Remove an instance's registration after it has been critical this long (≥ 1 min).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration_str"
    )]
    pub deregister_after: Option<Duration>,
}

fn default_interval() -> Duration {
    defaults::CHECK_INTERVAL
}
fn default_timeout() -> Duration {
    defaults::CHECK_TIMEOUT
}
fn default_rise() -> u32 {
    defaults::RISE
}
fn default_fall() -> u32 {
    defaults::FALL
}
fn default_expect() -> Vec<StatusRange> {
    vec![StatusRange {
        low: defaults::EXPECT_LOW,
        high: defaults::EXPECT_HIGH,
    }]
}

impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            path: None,
            host: None,
            interval: default_interval(),
            timeout: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            expect: default_expect(),
            deregister_after: None,
        }
    }
}

impl CheckSpec {
    /// Whether `status` counts as a passing HTTP probe.
    pub fn accepts(&self, status: u16) -> bool {
        self.expect.iter().any(|r| r.contains(status))
    }
}

/// An inclusive range of HTTP status codes, written `"200-299"` or `"204"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| -> Result<u16, String> {
            let code: u16 = p
                .trim()
                .parse()
                .map_err(|_| format!("bad status code {p:?}"))?;
            if (100..=599).contains(&code) {
                Ok(code)
            } else {
                Err(format!("status code {code} is outside 100-599"))
            }
        };
        let (low, high) = match s.split_once('-') {
            Some((l, h)) => (parse(l)?, parse(h)?),
            None => (parse(s)?, parse(s)?),
        };
        if low > high {
            return Err(format!("status range {s:?} is reversed"));
        }
        Ok(Self { low, high })
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How a balancer picks an instance inside the chosen version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Power of two choices on in-flight requests, weighted.
    #[default]
    P2c,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest in-flight requests, weighted.
    LeastConn,
}

/// Limits a canary step must stay within, compared with the old version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryGates {
    /// Highest tolerated share of 5xx answers of the new version, 0.0..=1.0.
    pub max_error_rate: f64,
    /// Highest tolerated ratio of the new version's p99 latency to the old one's.
    pub max_p99_ratio: f64,
}

/// Operator settings of a service: `services/<svc>/config`, no lease.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ServiceConfig {
    #[serde(default)]
    pub check: CheckSpec,
    /// Share of new requests per version. Empty means every routable instance competes by
    /// weight; otherwise unlisted versions get nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub split: BTreeMap<Version, u32>,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default = "default_slow_start", with = "duration_str")]
    pub slow_start: Duration,
    #[serde(default = "default_drain_timeout", with = "duration_str")]
    pub drain_timeout: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryGates>,
}

fn default_slow_start() -> Duration {
    defaults::SLOW_START
}
fn default_drain_timeout() -> Duration {
    defaults::DRAIN_TIMEOUT
}

/// A node agent's presence: `nodes/<node>`, under the node lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub addr: IpAddr,
    pub version: String,
    /// Start time in milliseconds since the Unix epoch.
    pub started: u64,
}

/// A checker replica's presence: `checkers/<id>`, under the checker lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checker {
    pub version: String,
    /// Start time in milliseconds since the Unix epoch.
    pub started: u64,
}

/// Milliseconds since the Unix epoch, the time unit of `since` and `started`.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Durations travel as human strings (`"5s"`, `"500ms"`, `"1m 30s"`), at most
/// [`MAX_DURATION`](duration_str::MAX_DURATION) long.
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// The longest duration a value may carry (366 days). Longer ones are refused where
    /// they are read (an etcd value is then skipped, a config file names the key): every
    /// part adds durations to `Instant`s, and an addition that overflows panics.
    pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    /// A human duration of at most [`MAX_DURATION`].
    pub fn parse(s: &str) -> Result<Duration, String> {
        let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
        if d > MAX_DURATION {
            return Err(format!(
                "{s:?} is longer than the longest duration allowed (366 days)"
            ));
        }
        Ok(d)
    }
}

/// [`duration_str`] for optional fields.
pub mod opt_duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::duration_str::parse(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_defaults_and_wire_names() {
        let json = r#"{"id":"n1-web-0-8080","service":"web","version":"v1","node":"n1",
                       "addr":"127.0.0.1","port":8080}"#;
        let i: Instance = serde_json::from_str(json).unwrap();
        assert_eq!(i.weight, 100);
        assert_eq!(i.state, InstanceState::Serving);
        assert_eq!(i.protocol, Protocol::Http);
        let back = serde_json::to_value(&i).unwrap();
        assert_eq!(back["state"], "serving");
        assert_eq!(back["protocol"], "http");
        assert_eq!(back["weight"], 100);
    }

    #[test]
    fn service_config_defaults_and_round_trip() {
        let c: ServiceConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.check.rise, 2);
        assert_eq!(c.check.fall, 3);
        assert_eq!(c.check.interval, Duration::from_secs(5));
        assert_eq!(c.check.timeout, Duration::from_secs(2));
        assert!(c.check.accepts(204) && !c.check.accepts(301));
        let json = r#"{"check":{"path":"/healthz","interval":"500ms","expect":["200-299","404"]},
                       "split":{"v1":90,"v2":10},"algorithm":"round_robin","drain_timeout":"1m"}"#;
        let c: ServiceConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.check.interval, Duration::from_millis(500));
        assert!(c.check.accepts(404));
        assert_eq!(c.split[&Version::new("v2").unwrap()], 10);
        assert_eq!(c.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        let again: ServiceConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn bad_status_ranges_are_rejected() {
        for bad in ["abc", "299-200", "700", "200-"] {
            assert!(bad.parse::<StatusRange>().is_err(), "{bad}");
        }
    }
}
