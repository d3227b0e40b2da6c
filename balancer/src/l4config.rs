//! `lb.toml` sections of the L4 features: TLS termination, upstream TLS, PROXY protocol,
//! `tcp` listeners, self-upgrade. Kept apart from `config.rs` so the HTTP configuration
//! stays readable; `config::LbConfig::validate` calls `validate` here.

use std::collections::HashSet;
use std::path::PathBuf;

use catalog::ServiceName;
use serde::Deserialize;
use toml::Spanned;

use crate::cidr::Cidr;
use crate::config::{ConfigError, LbConfig, ListenerProtocol};

/// `[listener.tls]`: certificates chosen by SNI, the first (or the one marked `default`)
/// for clients that send no or an unknown name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    #[serde(rename = "certificate")]
    pub certificates: Vec<CertConfig>,
    /// ALPN protocols offered, in preference order. Default: `["h2", "http/1.1"]` on http
    /// listeners, none on tcp listeners.
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// Mutual TLS (`[listener.tls.client_auth]`).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Session resumption for returning clients (default on): stateless tickets (TLS 1.3:
    /// `session_tickets` after each handshake; TLS 1.2: RFC 5077), sealed under keys that
    /// rotate every 6 hours, and TLS 1.2 session IDs in a cache of 20,000 sessions. A
    /// SIGHUP that rebuilds the listener's TLS setup starts with new keys and an empty
    /// cache (each client makes one full handshake again). `false`: no tickets, no cache,
    /// every handshake a full one (HAProxy's `no-tls-tickets` with no session cache;
    /// nginx's `ssl_session_tickets off` with `ssl_session_cache off`).
    #[serde(default = "d_true")]
    pub session_resumption: bool,
    /// TLS 1.3 tickets sent after each handshake (default 2, as OpenSSL after a full
    /// handshake; OpenSSL sends 1 after a resumed one, Go's crypto/tls 1 after any). Each
    /// ticket resumes one later connection: a client that opens several at once resumes
    /// as many of them. 0: TLS 1.3 clients do not resume (TLS 1.2 session IDs still do).
    #[serde(default = "d_tickets")]
    pub session_tickets: u8,
}

/// Bounds `session_tickets`: more only costs every handshake bytes and work.
const MAX_SESSION_TICKETS: u8 = 8;

fn d_tickets() -> u8 {
    2
}

/// `[listener.tls.client_auth]`: clients must present a certificate that chains to one
/// in `ca` (mutual TLS); with `optional = true` a client without a certificate is let in
/// too, but one that presents a certificate must still be verified. `crl`: revoked client
/// certificates (PEM CRLs, one for every CA of a client's chain). Both files are read at
/// start and again on every SIGHUP.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    pub ca: Spanned<PathBuf>,
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// `[[listener.tls.certificate]]`: a PEM chain and its key, reloaded when either changes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    pub cert: Spanned<PathBuf>,
    pub key: PathBuf,
    /// SNI names served with this certificate (`*.example.com` allowed). Default: the
    /// certificate's DNS subject alternative names.
    #[serde(default)]
    pub names: Vec<String>,
    /// The certificate for clients without (or with an unknown) SNI name. Default: the first.
    #[serde(default)]
    pub default: bool,
    /// A DER OCSP response to staple (as `openssl ocsp -respout` writes it), reloaded
    /// with the certificate when the file changes.
    #[serde(default)]
    pub ocsp: Option<PathBuf>,
}

/// `[listener.proxy_protocol]`: PROXY v1/v2 headers are required from `trusted` sources and
/// rejected from everyone else.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptProxy {
    pub trusted: Vec<Spanned<String>>,
}

impl AcceptProxy {
    pub fn cidrs(&self) -> Vec<Cidr> {
        self.trusted
            .iter()
            .filter_map(|c| c.get_ref().parse().ok())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// `[service.tls]` / `[upstream.service.tls]`: TLS towards the instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM CA bundle the instances' certificates must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// `false` accepts any certificate (encryption without authentication).
    #[serde(default = "d_true")]
    pub verify: bool,
    /// Name sent as SNI and verified; default: the instance's IP address.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM certificate chain presented to instances that ask for a client certificate
    /// (mutual TLS towards the instances); goes with `key`. Re-read when the files change.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn d_true() -> bool {
    true
}

/// `[[upstream.service]]`: upstream options of a service found in etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceL4 {
    pub name: Spanned<ServiceName>,
    #[serde(default)]
    pub proxy_protocol: Option<ProxyVersion>,
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// The instances speak HTTP/2 (see `[[service]]`'s `http2`).
    #[serde(default)]
    pub http2: bool,
    /// See `[[service]]`'s `max_requests` and `queue_timeout`.
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default, with = "catalog::model::opt_duration_str")]
    pub queue_timeout: Option<std::time::Duration>,
}

/// How the balancer talks to a service's instances: `[[service]]` or
/// `[[upstream.service]]` options.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceUpstream<'a> {
    pub proxy: Option<ProxyVersion>,
    pub tls: Option<&'a UpstreamTls>,
    pub http2: bool,
}

/// `[upgrade]`: `balancer upgrade` / SIGUSR2.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// Unix socket the running balancer listens on for `balancer upgrade` (absent: SIGUSR2
    /// only).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// File holding the pid of the process that serves; rewritten by the new process once
    /// it is ready.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Time the new process has to report ready before the upgrade is abandoned.
    #[serde(default = "d_ready", with = "catalog::model::duration_str")]
    pub ready_timeout: std::time::Duration,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        Self {
            socket: None,
            pid_file: None,
            ready_timeout: d_ready(),
        }
    }
}

fn d_ready() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl LbConfig {
    /// Upstream PROXY / TLS / HTTP/2 options of `service`: its `[[service]]` entry, else
    /// its `[[upstream.service]]` entry.
    pub fn service_l4(&self, service: &str) -> ServiceUpstream<'_> {
        if let Some(s) = self
            .services
            .iter()
            .find(|s| s.name.get_ref().as_str() == service)
        {
            return ServiceUpstream {
                proxy: s.proxy_protocol,
                tls: s.tls.as_ref(),
                http2: s.http2,
            };
        }
        match self
            .upstream
            .services
            .iter()
            .find(|s| s.name.get_ref().as_str() == service)
        {
            Some(s) => ServiceUpstream {
                proxy: s.proxy_protocol,
                tls: s.tls.as_ref(),
                http2: s.http2,
            },
            None => ServiceUpstream::default(),
        }
    }

    /// `max_requests` of `service` (its `[[service]]`, else its `[[upstream.service]]`),
    /// with its queue timeout.
    pub fn service_limit(&self, service: &str) -> Option<crate::table::SlotLimit> {
        let named = |n: &Spanned<ServiceName>| n.get_ref().as_str() == service;
        let (max, timeout) = match self.services.iter().find(|s| named(&s.name)) {
            Some(s) => (s.max_requests, s.queue_timeout),
            None => {
                let s = self.upstream.services.iter().find(|s| named(&s.name))?;
                (s.max_requests, s.queue_timeout)
            }
        };
        Some(crate::table::SlotLimit {
            max: max?,
            queue_timeout: timeout.unwrap_or(self.upstream.connect_timeout),
        })
    }

    /// Services reached by `tcp` listeners (their etcd instances must be `protocol = tcp`).
    pub fn tcp_services(&self) -> HashSet<String> {
        self.listeners
            .iter()
            .filter(|l| l.protocol == ListenerProtocol::Tcp)
            .filter_map(|l| l.service.as_ref().map(|s| s.get_ref().as_str().to_owned()))
            .collect()
    }
}

/// Checks the L4 parts of a parsed file; `err(span, key, message)` formats file:line:key.
pub(crate) fn validate(
    c: &LbConfig,
    err: &dyn Fn(std::ops::Range<usize>, &str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let static_names: HashSet<&str> = c
        .services
        .iter()
        .map(|s| s.name.get_ref().as_str())
        .collect();
    let mut http_services = HashSet::new();
    for l in &c.listeners {
        if l.protocol == ListenerProtocol::Http {
            http_services.extend(l.routes.iter().map(|r| r.service.get_ref().as_str()));
        }
    }
    for (i, l) in c.listeners.iter().enumerate() {
        let at = l.name.span();
        match l.protocol {
            ListenerProtocol::Tcp => {
                let Some(svc) = &l.service else {
                    return Err(err(
                        at,
                        &format!("listener[{i}].service"),
                        "a tcp listener needs `service = \"<name>\"`".into(),
                    ));
                };
                if !l.routes.is_empty() {
                    return Err(err(
                        at,
                        &format!("listener[{i}].route"),
                        "a tcp listener has no routes (it sends everything to `service`)".into(),
                    ));
                }
                let name = svc.get_ref().as_str();
                if c.discovery.etcd.is_none() && !static_names.contains(name) {
                    return Err(err(
                        svc.span(),
                        &format!("listener[{i}].service"),
                        format!(
                            "no [[service]] named {name} and no [discovery.etcd] to find it in"
                        ),
                    ));
                }
                if http_services.contains(name) {
                    return Err(err(
                        svc.span(),
                        &format!("listener[{i}].service"),
                        format!(
                            "service {name} is also routed by an http listener; a service is either tcp or http"
                        ),
                    ));
                }
            }
            ListenerProtocol::Http => {
                if let Some(svc) = &l.service {
                    return Err(err(
                        svc.span(),
                        &format!("listener[{i}].service"),
                        "only tcp listeners take `service`; http listeners use [[listener.route]]"
                            .into(),
                    ));
                }
                if l.bulk_batching {
                    return Err(err(
                        at,
                        &format!("listener[{i}].bulk_batching"),
                        "only tcp listeners take `bulk_batching`".into(),
                    ));
                }
            }
        }
        if l.idle_timeout.is_zero() {
            return Err(err(
                at,
                &format!("listener[{i}].idle_timeout"),
                "must be more than 0".into(),
            ));
        }
        if let Some(tls) = &l.tls {
            if tls.certificates.is_empty() {
                return Err(err(
                    at,
                    &format!("listener[{i}].tls.certificate"),
                    "at least one [[listener.tls.certificate]] is needed".into(),
                ));
            }
            if tls.session_tickets > MAX_SESSION_TICKETS {
                return Err(err(
                    at,
                    &format!("listener[{i}].tls.session_tickets"),
                    format!("{} is more than {MAX_SESSION_TICKETS}", tls.session_tickets),
                ));
            }
            if tls.certificates.iter().filter(|c| c.default).count() > 1 {
                return Err(err(
                    at,
                    &format!("listener[{i}].tls.certificate"),
                    "only one certificate can be `default = true`".into(),
                ));
            }
            for p in tls.alpn.iter().flatten() {
                if p.is_empty() || p.len() > 255 {
                    return Err(err(
                        at,
                        &format!("listener[{i}].tls.alpn"),
                        format!("{p:?} is not a valid ALPN protocol id"),
                    ));
                }
            }
        }
        for (j, t) in l.allow_sources.iter().enumerate() {
            if let Err(e) = t.get_ref().parse::<Cidr>() {
                return Err(err(
                    t.span(),
                    &format!("listener[{i}].allow_sources[{j}]"),
                    e,
                ));
            }
        }
        for (k, r) in l.routes.iter().enumerate() {
            for (j, t) in r.allow_sources.iter().enumerate() {
                if let Err(e) = t.get_ref().parse::<Cidr>() {
                    let key = format!("listener[{i}].route[{k}].allow_sources[{j}]");
                    return Err(err(t.span(), &key, e));
                }
            }
        }
        if let Some(pp) = &l.proxy_protocol {
            for (j, t) in pp.trusted.iter().enumerate() {
                if let Err(e) = t.get_ref().parse::<Cidr>() {
                    return Err(err(
                        t.span(),
                        &format!("listener[{i}].proxy_protocol.trusted[{j}]"),
                        e,
                    ));
                }
            }
        }
    }
    let tls_ok = |t: &UpstreamTls, table: String, at: std::ops::Range<usize>| {
        if t.verify && t.ca.is_none() {
            return Err(err(
                at,
                &format!("{table}.ca"),
                "set `ca` (a PEM bundle to verify instances with) or `verify = false`".into(),
            ));
        }
        match (&t.cert, &t.key) {
            (Some(_), None) => Err(err(
                at,
                &format!("{table}.key"),
                "`cert` needs `key`, the private key of the client certificate".into(),
            )),
            (None, Some(_)) => Err(err(
                at,
                &format!("{table}.cert"),
                "`key` needs `cert`, the client certificate chain".into(),
            )),
            _ => Ok(()),
        }
    };
    let tcp = c.tcp_services();
    // One HTTP/2 connection carries many clients' requests: a PROXY header could name
    // only one of them, and a tcp listener does not speak HTTP at all.
    let http2_ok = |name: &str, proxy: bool, table: String, at: std::ops::Range<usize>| {
        if proxy {
            return Err(err(
                at,
                &format!("{table}.http2"),
                "`http2` shares one connection among clients: it cannot go with `proxy_protocol`"
                    .into(),
            ));
        }
        if tcp.contains(name) {
            return Err(err(
                at,
                &format!("{table}.http2"),
                format!("service {name} is reached by a tcp listener, which does not speak HTTP"),
            ));
        }
        Ok(())
    };
    for (i, s) in c.services.iter().enumerate() {
        if let Some(t) = &s.tls {
            tls_ok(t, format!("service[{i}].tls"), s.name.span())?;
        }
        if s.http2 {
            let name = s.name.get_ref().as_str();
            http2_ok(
                name,
                s.proxy_protocol.is_some(),
                format!("service[{i}]"),
                s.name.span(),
            )?;
        }
    }
    let mut seen = HashSet::new();
    for (i, s) in c.upstream.services.iter().enumerate() {
        let name = s.name.get_ref().as_str();
        if !seen.insert(name) || static_names.contains(name) {
            return Err(err(
                s.name.span(),
                &format!("upstream.service[{i}].name"),
                format!("{name} already has options (in [[service]] or [[upstream.service]])"),
            ));
        }
        if let Some(t) = &s.tls {
            tls_ok(t, format!("upstream.service[{i}].tls"), s.name.span())?;
        }
        if s.max_requests == Some(0) {
            let key = format!("upstream.service[{i}].max_requests");
            return Err(err(s.name.span(), &key, "must be at least 1".into()));
        }
        if s.http2 {
            let table = format!("upstream.service[{i}]");
            http2_ok(name, s.proxy_protocol.is_some(), table, s.name.span())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = r#"
[[listener]]
name = "db"
bind = "127.0.0.1:5432"
protocol = "tcp"
service = "pg"

[[service]]
name = "pg"
proxy_protocol = "v2"
  [[service.endpoint]]
  addr = "127.0.0.1:5433"
"#;

    /// `http2` needs an HTTP service whose connections carry no PROXY header.
    #[test]
    fn http2_is_refused_on_tcp_services_and_with_a_proxy_header() {
        let tcp = TCP.replace("proxy_protocol = \"v2\"", "http2 = true");
        let e = LbConfig::parse(&tcp, "lb.toml").unwrap_err().to_string();
        assert!(
            e.contains("service[0].http2") && e.contains("tcp listener"),
            "{e}"
        );
        let both = TCP
            .replace(
                "protocol = \"tcp\"\nservice = \"pg\"\n",
                "  [[listener.route]]\n  service = \"pg\"\n",
            )
            .replace("proxy_protocol", "http2 = true\nproxy_protocol");
        let e = LbConfig::parse(&both, "lb.toml").unwrap_err().to_string();
        assert!(
            e.contains("service[0].http2") && e.contains("proxy_protocol"),
            "{e}"
        );
        let ok = both.replace("proxy_protocol = \"v2\"\n", "");
        let c = LbConfig::parse(&ok, "lb.toml").unwrap();
        assert!(c.service_l4("pg").http2);
    }

    #[test]
    fn tcp_listener_parses_and_needs_a_service() {
        let c = LbConfig::parse(TCP, "lb.toml").unwrap();
        assert_eq!(c.listeners[0].protocol, ListenerProtocol::Tcp);
        assert_eq!(c.service_l4("pg").proxy, Some(ProxyVersion::V2));
        assert!(c.tcp_services().contains("pg"));
        let bad = TCP.replace("service = \"pg\"\n", "");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:3:"), "{e}");
        assert!(e.contains("listener[0].service"), "{e}");
        let bad = TCP.replace("service = \"pg\"\n", "service = \"nope\"\n");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:6:"), "{e}");
    }

    #[test]
    fn bulk_batching_is_for_tcp_listeners() {
        let c = LbConfig::parse(TCP, "lb.toml").unwrap();
        assert!(!c.listeners[0].bulk_batching, "off by default");
        let on = TCP.replace(
            "service = \"pg\"\n",
            "service = \"pg\"\nbulk_batching = true\n",
        );
        assert!(LbConfig::parse(&on, "lb.toml").unwrap().listeners[0].bulk_batching);
        let http = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:80\"\nbulk_batching = true\n";
        let e = LbConfig::parse(http, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:2:"), "{e}");
        assert!(e.contains("listener[0].bulk_batching"), "{e}");
    }

    #[test]
    fn bad_cidr_and_upstream_tls_are_named() {
        let bad = TCP.replace(
            "service = \"pg\"\n",
            "service = \"pg\"\n[listener.proxy_protocol]\ntrusted = [\"10.0.0.0/99\"]\n",
        );
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:8:"), "{e}");
        assert!(e.contains("listener[0].proxy_protocol.trusted[0]"), "{e}");
        let bad = TCP.replace("proxy_protocol = \"v2\"", "tls = { sni = \"db\" }");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.contains("service[0].tls.ca"), "{e}");
        let bad = TCP.replace(
            "proxy_protocol = \"v2\"",
            "tls = { verify = false, cert = \"c.pem\" }",
        );
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.contains("service[0].tls.key"), "{e}");
        assert!(e.contains("`cert` needs `key`"), "{e}");
        let bad = TCP.replace(
            "proxy_protocol = \"v2\"",
            "tls = { verify = false, key = \"k.pem\" }",
        );
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.contains("service[0].tls.cert"), "{e}");
        let bad = TCP.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v3\"");
        let e = LbConfig::parse(&bad, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:10:"), "{e}");
    }
}
