//! The top-level table: listeners and their routes assembled from the built services,
//! each route carrying its counters, upstream options, rate limiter and options.

use std::sync::Arc;

use crate::config;
use crate::metrics::ClassCounters;
use crate::mirror::Mirror;
use crate::sticky::Sticky;
use crate::table::{HostMatch, ListenerSettings, ListenerTable, Route, RoutingTable, TcpSettings};
use crate::version_pin::VersionPin;

use super::TableBuilder;

impl TableBuilder {
    fn class_counters(
        &mut self,
        listener: &Arc<str>,
        service: &Arc<str>,
        version: &Arc<str>,
    ) -> ClassCounters {
        let m = &self.metrics;
        self.counters
            .entry((listener.clone(), service.clone(), version.clone()))
            .or_insert_with(|| m.classes(listener, service, version))
            .clone()
    }

    /// Assembles the table every request reads.
    pub fn table(&mut self) -> RoutingTable {
        let config = self.config.clone();
        let none: Arc<str> = "none".into();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let lname: Arc<str> = l.name.get_ref().as_str().into();
            let up = &config.upstream;
            let settings = ListenerSettings {
                response_timeout: l.response_timeout.unwrap_or(up.response_timeout),
                connect_timeout: up.connect_timeout,
                max_body_bytes: l.max_body_bytes,
                forwarded_headers: l.forwarded_headers,
                request_id: (l.request_id_header.as_deref())
                    .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
                redirect_https: l.redirect_https.then_some(l.redirect_https_port),
                retries: up.retries,
                retry_budget_percent: up.retry_budget_percent,
                access_log: config.access_log,
                outlier_failures: up.outlier.consecutive_failures,
                base_ejection: up.outlier.base_ejection,
                max_ejection_percent: up.outlier.max_ejection_percent,
                tcp: TcpSettings {
                    idle_timeout: l.idle_timeout,
                    drain_timeout: l.drain_timeout,
                    bulk_batching: l.bulk_batching,
                },
            };
            let mut routes = Vec::new();
            // A tcp listener is one catch-all route to its service.
            let tcp_route = l.service.as_ref().map(|s| config::RouteConfig {
                host: None,
                path_prefix: "/".into(),
                service: s.clone(),
                version_header: None,
                version_cookie: None,
                strip_prefix: false,
                sticky_cookie: None,
                sticky_max_age: None,
                retry_on: Vec::new(),
                response_timeout: None,
                allow_sources: Vec::new(),
                rate_limit: None,
                mirror: None,
                request_headers: Default::default(),
                response_headers: Default::default(),
            });
            for (index, r) in l.routes.iter().chain(tcp_route.iter()).enumerate() {
                let sname: Arc<str> = r.service.get_ref().as_str().into();
                let service = self
                    .static_services
                    .get(&sname)
                    .or_else(|| self.etcd_services.get(&sname))
                    .cloned();
                let by_version = service
                    .as_ref()
                    .map(|s| {
                        s.versions
                            .iter()
                            .map(|v| self.class_counters(&lname, &sname, v))
                            .collect()
                    })
                    .unwrap_or_default();
                routes.push(Route {
                    checks_clients: !r.allow_sources.is_empty() || r.rate_limit.is_some(),
                    mirror: (r.mirror.as_ref())
                        .map(|c| Box::new(Mirror::new(c, self.metrics.mirrored.clone()))),
                    host: HostMatch::parse(r.host.as_deref()),
                    path_prefix: r.path_prefix.as_str().into(),
                    pin: VersionPin::new(r.version_header.as_deref(), r.version_cookie.as_deref()),
                    strip_prefix: r.strip_prefix,
                    sticky: (r.sticky_cookie.as_deref()).map(|c| Sticky::new(c, r.sticky_max_age)),
                    request_rules: r.request_headers.rules(),
                    response_timeout: r.response_timeout,
                    retry_on: r.retry_on.clone().into(),
                    allow: crate::cidr::cidrs(&r.allow_sources),
                    rate_limit: r.rate_limit.map(|c| {
                        let m = &self.metrics;
                        self.limiters.get(&lname, index, c, || {
                            m.rate_limited.with_label_values(&[&lname, &sname])
                        })
                    }),
                    response_rules: r.response_headers.rules(),
                    unpicked: self.class_counters(&lname, &sname, &none),
                    upstream: self.upstreams.get(&*sname).cloned(),
                    service_name: sname,
                    service,
                    by_version,
                });
            }
            let unrouted = self.class_counters(&lname, &none, &none);
            listeners.push(ListenerTable {
                name: lname,
                protocol: l.protocol,
                settings,
                routes,
                unrouted,
            });
        }
        self.limiters.prune();
        self.metrics.table_builds.inc();
        RoutingTable {
            listeners,
            revision: self.catalog.revision,
        }
    }
}
