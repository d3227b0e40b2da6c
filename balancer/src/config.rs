//! `lb.toml`: the balancer's configuration file, parsed with serde + toml.
//!
//! Every error names the file, the line and the key. Syntax and type errors come with
//! toml's own span; semantic checks (duplicates, unknown services) use `Spanned` fields so
//! they can point at the offending line too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use catalog::{Algorithm, EtcdConfig, ServiceName, Version};
use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already formatted as `file:line:column: key: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The whole `lb.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    /// Tokio worker threads; 1 runs everything on one thread (the benchmark setting).
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Workers poll for I/O without sleeping while traffic flows (HAProxy's
    /// `busy-polling`): a core each, for less wake-up latency. Read at start.
    #[serde(default)]
    pub busy_polling: bool,
    /// Log one line per request at target `access`.
    #[serde(default)]
    pub access_log: bool,
    /// On SIGTERM: how long in-flight requests may take before the process exits anyway.
    #[serde(default = "d_shutdown", with = "catalog::model::duration_str")]
    pub shutdown_timeout: Duration,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "service")]
    pub services: Vec<StaticService>,
    /// Zero-downtime self-upgrade (`[upgrade]`).
    #[serde(default)]
    pub upgrade: crate::l4config::UpgradeConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `/metrics` and `/healthz`. Loopback by default: metrics are not for the world.
    #[serde(default = "d_admin")]
    pub bind: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { bind: d_admin() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Absent: static services only, no etcd at all.
    #[serde(default)]
    pub etcd: Option<EtcdDiscovery>,
}

/// `[discovery.etcd]`: how to reach etcd, plus the key prefix.
#[derive(Debug, Clone, Deserialize)]
pub struct EtcdDiscovery {
    #[serde(default = "d_prefix")]
    pub prefix: String,
    #[serde(flatten)]
    pub etcd: EtcdConfig,
}

/// `[upstream]`: how the balancer talks to backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default = "d_connect", with = "catalog::model::duration_str")]
    pub connect_timeout: Duration,
    /// Time until the upstream's response headers arrive (504 after).
    #[serde(default = "d_response", with = "catalog::model::duration_str")]
    pub response_timeout: Duration,
    /// Idle pooled connections older than this are not reused.
    #[serde(default = "d_pool_idle", with = "catalog::model::duration_str")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "d_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// Extra attempts on another instance after a connect failure or an early reset.
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Retries allowed as a percentage of requests (plus a small floor), so a sick
    /// service is not hit with a retry storm.
    #[serde(default = "d_budget")]
    pub retry_budget_percent: u32,
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Per-service upstream options for services found in etcd (`[[upstream.service]]`).
    #[serde(default, rename = "service")]
    pub services: Vec<crate::l4config::ServiceL4>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Passive outlier ejection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive connect errors or 5xx answers that eject an instance (0 = never).
    #[serde(default = "d_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection length; the n-th ejection lasts n times as long (capped at 10×).
    #[serde(default = "d_ejection", with = "catalog::model::duration_str")]
    pub base_ejection: Duration,
    /// Never eject more than this share of a service's routable instances.
    #[serde(default = "d_max_eject")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and h2c (prior knowledge) on the same port (h2 via ALPN with `[listener.tls]`).
    Http,
    /// Raw TCP: every connection is streamed to an instance of the listener's `service`.
    Tcp,
}

/// `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: Spanned<String>,
    pub bind: SocketAddr,
    #[serde(default = "d_protocol")]
    pub protocol: ListenerProtocol,
    /// Time a client has to send a request head (also closes idle keep-alive connections).
    #[serde(default = "d_header_timeout", with = "catalog::model::duration_str")]
    pub header_read_timeout: Duration,
    /// Overrides `upstream.response_timeout` for this listener.
    #[serde(default, with = "catalog::model::opt_duration_str")]
    pub response_timeout: Option<Duration>,
    /// Request head larger than this → 431.
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: usize,
    /// More header lines than this → 431.
    #[serde(default = "d_max_headers")]
    pub max_headers: usize,
    /// A header carrying each request's id to the instance, the access log and the client
    /// (see `request_id`), e.g. `X-Request-Id`. Default: none.
    #[serde(default)]
    pub request_id_header: Option<String>,
    /// At most this many client connections open at once; more wait in the listen backlog
    /// (see `conn_limit`). Default: no limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Request body larger than this → 413.
    #[serde(default = "d_max_body")]
    pub max_body_bytes: u64,
    /// Add `X-Forwarded-For/-Proto/-Host` (and `-Client-Cert` for a client certificate) to
    /// requests sent upstream (the client's own `X-Forwarded-For` list is extended, its
    /// `-Proto` and `-Client-Cert` dropped). `false`: the client's headers go as they came,
    /// as with HAProxy without `option forwardfor`.
    #[serde(default = "d_true")]
    pub forwarded_headers: bool,
    /// Answer every request with a redirect to the same host and target over HTTPS (see
    /// `proxy/redirect.rs`); such a listener has no routes.
    #[serde(default)]
    pub redirect_https: bool,
    /// The port in the redirect's `Location` (443: none written).
    #[serde(default = "d_https_port")]
    pub redirect_https_port: u16,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// `tcp` listeners: the service every connection goes to.
    #[serde(default)]
    pub service: Option<Spanned<ServiceName>>,
    /// `tcp` listeners: a connection with no byte in either direction for this long is closed.
    #[serde(default = "d_idle", with = "catalog::model::duration_str")]
    pub idle_timeout: Duration,
    /// `tcp` listeners: on shutdown or self-upgrade, established connections may go on for
    /// this long (capped by `shutdown_timeout`), then they are closed.
    #[serde(default = "d_drain", with = "catalog::model::duration_str")]
    pub drain_timeout: Duration,
    /// `tcp` listeners: once a connection has streamed 1 MiB one way without a pause, wake
    /// per batch of up to 256 KiB instead of per arrival (`SO_RCVLOWAT`): less CPU per MiB
    /// and more bulk throughput, for up to ~2 ms more on the last bytes of each long burst.
    #[serde(default)]
    pub bulk_batching: bool,
    /// TLS termination (`[listener.tls]`).
    #[serde(default)]
    pub tls: Option<crate::l4config::ListenerTls>,
    /// Accept PROXY protocol v1/v2 headers from a front load balancer (`[listener.proxy_protocol]`).
    #[serde(default)]
    pub proxy_protocol: Option<crate::l4config::AcceptProxy>,
    /// Client networks (`10.0.0.0/8`, or an address) whose connections are served; others
    /// are closed at once, before any TLS handshake. Empty: every client.
    #[serde(default)]
    pub allow_sources: Vec<Spanned<String>>,
}

/// `[[listener.route]]`: first match wins, in file order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact host (`api.example.com`) or suffix wildcard (`*.example.com`); absent = any.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "d_prefix_path")]
    pub path_prefix: String,
    pub service: Spanned<ServiceName>,
    /// A request header naming the version to send the request to (see `version_pin`).
    #[serde(default)]
    pub version_header: Option<String>,
    /// A cookie naming the version to send the request to (see `version_pin`).
    #[serde(default)]
    pub version_cookie: Option<String>,
    /// Forward the path without `path_prefix` (see `strip_prefix`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Keep a client on the instance that first answered it, by this cookie (see `sticky`).
    #[serde(default)]
    pub sticky_cookie: Option<String>,
    /// How long the sticky cookie lasts (`Max-Age`); default: the browser session.
    #[serde(default, with = "catalog::model::opt_duration_str")]
    pub sticky_max_age: Option<Duration>,
    /// Answer statuses (400-599) after which an idempotent request without a body goes to
    /// another instance (Envoy's `retriable_status_codes`, HAProxy's `retry-on`), within
    /// the listener's `retries` and the service's retry budget.
    #[serde(default)]
    pub retry_on: Vec<u16>,
    /// Overrides the listener's response timeout for this route (a slow report endpoint, a
    /// long poll).
    #[serde(default, with = "catalog::model::opt_duration_str")]
    pub response_timeout: Option<Duration>,
    /// Client networks whose requests this route serves; others get 403. Empty: every
    /// client.
    #[serde(default)]
    pub allow_sources: Vec<Spanned<String>>,
    /// Requests per second per client (`rate_limit`); over it: 429.
    #[serde(default)]
    pub rate_limit: Option<crate::rate_limit::RateLimitConfig>,
    /// A share of the route's GET/HEAD requests copied to one version (`mirror`).
    #[serde(default)]
    pub mirror: Option<crate::mirror::MirrorConfig>,
    /// `[listener.route.request_headers]`: rules for the lines sent to the instance.
    #[serde(default)]
    pub request_headers: HeaderRulesConfig,
    /// `[listener.route.response_headers]`: rules for the lines of the instance's answer.
    #[serde(default)]
    pub response_headers: HeaderRulesConfig,
}

/// `set` / `remove` header rules (see `header_rules`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    /// Name → value: replaces every line of that name with one.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Names whose lines are dropped.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderRulesConfig {
    pub fn rules(&self) -> Option<crate::header_rules::HeaderRules> {
        crate::header_rules::HeaderRules::new(
            self.set.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            self.remove.iter().map(String::as_str),
        )
    }
}

/// `[[service]]`: a service defined in the file, usable with no etcd at all.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticService {
    pub name: Spanned<ServiceName>,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default = "d_zero", with = "catalog::model::duration_str")]
    pub slow_start: Duration,
    #[serde(default)]
    pub split: BTreeMap<Version, u32>,
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<StaticEndpoint>,
    /// Send a PROXY protocol header (`"v1"` / `"v2"`) on every upstream connection.
    #[serde(default)]
    pub proxy_protocol: Option<crate::l4config::ProxyVersion>,
    /// TLS to the instances (`[service.tls]`).
    #[serde(default)]
    pub tls: Option<crate::l4config::UpstreamTls>,
    /// The instances speak HTTP/2 (gRPC): prior knowledge (h2c), or ALPN `h2` over
    /// `[service.tls]`; one multiplexed connection per instance.
    #[serde(default)]
    pub http2: bool,
    /// Active health checks of the endpoints (`[service.check]`, see `static_check`).
    #[serde(default)]
    pub check: Option<crate::static_check::StaticCheck>,
    /// Requests in flight per instance at most; more wait (`queue`).
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// How long a request waits for an instance below `max_requests`; default: the
    /// upstream connect timeout.
    #[serde(default, with = "catalog::model::opt_duration_str")]
    pub queue_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    pub addr: Spanned<SocketAddr>,
    #[serde(default = "d_weight")]
    pub weight: u32,
    #[serde(default = "d_version")]
    pub version: Version,
}

fn d_shutdown() -> Duration {
    Duration::from_secs(30)
}
fn d_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9100))
}
fn d_prefix() -> String {
    catalog::defaults::PREFIX.to_owned()
}
fn d_connect() -> Duration {
    Duration::from_secs(1)
}
fn d_response() -> Duration {
    Duration::from_secs(30)
}
fn d_pool_idle() -> Duration {
    Duration::from_secs(50)
}
fn d_max_idle() -> usize {
    256
}
fn d_retries() -> u32 {
    2
}
fn d_budget() -> u32 {
    20
}
fn d_consecutive() -> u32 {
    5
}
fn d_ejection() -> Duration {
    Duration::from_secs(10)
}
fn d_max_eject() -> u32 {
    50
}
fn d_protocol() -> ListenerProtocol {
    ListenerProtocol::Http
}
fn d_idle() -> Duration {
    Duration::from_secs(300)
}
fn d_drain() -> Duration {
    Duration::from_secs(30)
}
fn d_header_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_max_header_bytes() -> usize {
    64 * 1024
}
fn d_max_headers() -> usize {
    100
}
fn d_https_port() -> u16 {
    443
}
fn d_true() -> bool {
    true
}
fn d_max_body() -> u64 {
    64 * 1024 * 1024
}
fn d_prefix_path() -> String {
    "/".to_owned()
}
fn d_zero() -> Duration {
    Duration::ZERO
}
fn d_weight() -> u32 {
    catalog::defaults::WEIGHT
}
fn d_version() -> Version {
    Version::new("v1").expect("valid version")
}

impl LbConfig {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: LbConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let (l, c) = crate::config_check::line_col(text, s.start);
                    let key = text
                        .lines()
                        .nth(l - 1)
                        .and_then(|line| line.split('=').next())
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(|k| format!(" (at `{k}`)"))
                        .unwrap_or_default();
                    format!("{origin}:{l}:{c}{key}")
                })
                .unwrap_or_else(|| origin.to_owned());
            ConfigError::Invalid(format!("{at}: {}", e.message().trim()))
        })?;
        config.validate(text, origin)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[admin]
bind = "127.0.0.1:9200"

[[listener]]
name = "web"
bind = "127.0.0.1:8080"
  [[listener.route]]
  host = "*.example.com"
  path_prefix = "/api"
  service = "api"

[[service]]
name = "api"
split = { v1 = 90, v2 = 10 }
  [[service.endpoint]]
  addr = "127.0.0.1:8081"
  weight = 7
  version = "v2"
"#;

    #[test]
    fn parses_a_full_file_with_defaults() {
        let c = LbConfig::parse(GOOD, "lb.toml").unwrap();
        assert_eq!(c.admin.bind.port(), 9200);
        assert_eq!(c.listeners[0].routes[0].path_prefix, "/api");
        assert_eq!(c.services[0].endpoints[0].weight, 7);
        assert_eq!(c.upstream.retries, 2);
        assert_eq!(c.listeners[0].max_headers, 100);
    }

    #[test]
    fn type_errors_name_file_line_and_key() {
        let bad = GOOD.replace("weight = 7", "weight = \"heavy\"");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:18:"), "{e}");
        assert!(e.contains("weight"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let bad = GOOD.replace("path_prefix", "path_prefx");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:10:"), "{e}");
        assert!(e.contains("path_prefx"), "{e}");
    }

    #[test]
    fn route_to_unknown_service_without_etcd_is_an_error() {
        let bad = GOOD.replace("service = \"api\"", "service = \"nope\"");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:11:"), "{e}");
        assert!(e.contains("listener[0].route[0].service"), "{e}");
    }

    #[test]
    fn etcd_section_takes_prefix_and_etcd_fields() {
        let text = format!(
            "{GOOD}\n[discovery.etcd]\nendpoints = [\"http://127.0.0.1:1\"]\nprefix = \"/x\"\ndial_timeout = \"2s\"\n"
        );
        let c = LbConfig::parse(&text, "lb.toml").unwrap();
        let e = c.discovery.etcd.unwrap();
        assert_eq!(e.prefix, "/x");
        assert_eq!(e.etcd.dial_timeout, Duration::from_secs(2));
        let bad = text.replace("dial_timeout", "dial_timeuot");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("lb.toml:24:1: discovery.etcd.dial_timeuot"),
            "{e}"
        );
        assert!(e.contains("dial_timeuot"), "{e}");
    }

    #[test]
    fn the_example_file_is_valid() {
        let c = LbConfig::parse(include_str!("../lb.example.toml"), "lb.example.toml").unwrap();
        assert_eq!(c.listeners[0].routes.len(), 2);
        assert!(c.discovery.etcd.is_some());
    }

    #[test]
    fn duplicate_listener_is_an_error() {
        let text = format!("{GOOD}\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:8081\"\n");
        let e = LbConfig::parse(&text, "lb.toml").unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");
    }
}
