//! The semantic checks of `lb.toml` that serde cannot make (duplicates, unknown services,
//! limits, route options), each error pointing at the file, line and key.

use std::collections::HashSet;

use crate::config::{ConfigError, LbConfig};

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

impl LbConfig {
    pub(crate) fn validate(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let err = |span: std::ops::Range<usize>, key: &str, msg: String| {
            let (l, c) = line_col(text, span.start);
            ConfigError::Invalid(format!("{origin}:{l}:{c}: {key}: {msg}"))
        };
        let mut services = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let key = format!("service[{i}].name");
            if !services.insert(s.name.get_ref().clone()) {
                return Err(err(
                    s.name.span(),
                    &key,
                    format!("service {} is defined twice", s.name.get_ref()),
                ));
            }
            if s.endpoints.is_empty() {
                return Err(err(
                    s.name.span(),
                    &key,
                    format!("service {} has no [[service.endpoint]]", s.name.get_ref()),
                ));
            }
            if !s.split.is_empty() && s.split.values().all(|v| *v == 0) {
                return Err(err(
                    s.name.span(),
                    &format!("service[{i}].split"),
                    "every version has share 0; nothing could be routed".into(),
                ));
            }
            if s.max_requests == Some(0) {
                let key = format!("service[{i}].max_requests");
                return Err(err(s.name.span(), &key, "must be at least 1".into()));
            }
            if let Some(Err((k, m))) = s.check.as_ref().map(|c| c.check()) {
                return Err(err(s.name.span(), &format!("service[{i}].check.{k}"), m));
            }
            let mut addrs = HashSet::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                if !addrs.insert(*e.addr.get_ref()) {
                    return Err(err(
                        e.addr.span(),
                        &format!("service[{i}].endpoint[{j}].addr"),
                        format!("endpoint {} is listed twice", e.addr.get_ref()),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listener[{i}].name");
            let name = l.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(
                    l.name.span(),
                    &key,
                    format!("listener name {name:?} must be letters, digits, - or _"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(err(
                    l.name.span(),
                    &key,
                    format!("listener {name} is defined twice"),
                ));
            }
            if !binds.insert(l.bind) {
                return Err(err(
                    l.name.span(),
                    &format!("listener[{i}].bind"),
                    format!("{} is used by two listeners", l.bind),
                ));
            }
            if l.max_header_bytes < 8192 {
                return Err(err(
                    l.name.span(),
                    &format!("listener[{i}].max_header_bytes"),
                    "must be at least 8192".into(),
                ));
            }
            if let Some(h) = &l.request_id_header
                && let Err(m) = crate::header_rules::check(h, None, true)
            {
                return Err(err(
                    l.name.span(),
                    &format!("listener[{i}].request_id_header"),
                    m,
                ));
            }
            if l.max_connections == Some(0) {
                return Err(err(
                    l.name.span(),
                    &format!("listener[{i}].max_connections"),
                    "must be at least 1 (leave it out for no limit)".into(),
                ));
            }
            if l.redirect_https {
                let why = if l.protocol != crate::config::ListenerProtocol::Http {
                    Some("only an http listener can redirect")
                } else if l.tls.is_some() {
                    Some("a TLS listener would redirect its clients to itself")
                } else if !l.routes.is_empty() {
                    Some(
                        "it answers every request with the redirect: its routes would never be used",
                    )
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(err(
                        l.name.span(),
                        &format!("listener[{i}].redirect_https"),
                        why.into(),
                    ));
                }
            }
            for (j, r) in l.routes.iter().enumerate() {
                for (table, rules, request) in [
                    ("request_headers", &r.request_headers, true),
                    ("response_headers", &r.response_headers, false),
                ] {
                    let named = rules.set.iter().map(|(n, v)| ("set", n, Some(v.as_str())));
                    let removed = rules.remove.iter().map(|n| ("remove", n, None));
                    for (key, name, value) in named.chain(removed) {
                        crate::header_rules::check(name, value, request).map_err(|m| {
                            err(
                                r.service.span(),
                                &format!("listener[{i}].route[{j}].{table}.{key}"),
                                m,
                            )
                        })?;
                    }
                }
                if let Some(Err((k, m))) = r.mirror.as_ref().map(|l| l.check()) {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].mirror.{k}"),
                        m,
                    ));
                }
                if let Some(Err((k, m))) = r.rate_limit.as_ref().map(|l| l.check()) {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].rate_limit.{k}"),
                        m,
                    ));
                }
                if let Some(code) = r.retry_on.iter().find(|c| !(400..=599).contains(*c)) {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].retry_on"),
                        format!("{code}: only 4xx and 5xx answers can be retried"),
                    ));
                }
                if r.sticky_max_age.is_some() && r.sticky_cookie.is_none() {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].sticky_max_age"),
                        "needs `sticky_cookie`".into(),
                    ));
                }
                if let Some(c) = &r.sticky_cookie
                    && !crate::version_pin::cookie_name_ok(c)
                {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].sticky_cookie"),
                        format!("{c:?} is not a cookie name"),
                    ));
                }
                crate::version_pin::validate(
                    r.version_header.as_deref(),
                    r.version_cookie.as_deref(),
                )
                .map_err(|(k, m)| {
                    err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].{k}"),
                        m,
                    )
                })?;
                if !r.path_prefix.starts_with('/') {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].path_prefix"),
                        format!("{:?} must start with /", r.path_prefix),
                    ));
                }
                // Without etcd, a route can only lead to a service of this file.
                if self.discovery.etcd.is_none() && !services.contains(r.service.get_ref()) {
                    return Err(err(
                        r.service.span(),
                        &format!("listener[{i}].route[{j}].service"),
                        format!(
                            "no [[service]] named {} and no [discovery.etcd] to find it in",
                            r.service.get_ref()
                        ),
                    ));
                }
            }
        }
        crate::l4config::validate(self, &err)?;
        if let Some(etcd) = &self.discovery.etcd {
            // `EtcdConfig` is flattened, which defeats its deny_unknown_fields: check here.
            const KNOWN: [&str; 7] = [
                "prefix",
                "endpoints",
                "username",
                "password",
                "tls",
                "dial_timeout",
                "request_timeout",
            ];
            let doc: toml::Table = toml::from_str(text).unwrap_or_default();
            let keys = doc
                .get("discovery")
                .and_then(|d| d.get("etcd"))
                .and_then(|e| e.as_table());
            for key in keys.into_iter().flat_map(|t| t.keys()) {
                if !KNOWN.contains(&key.as_str()) {
                    let section = text.find("[discovery.etcd]").unwrap_or(0);
                    let at = text[section..]
                        .find(key.as_str())
                        .map_or(section, |i| section + i);
                    return Err(err(
                        at..at,
                        &format!("discovery.etcd.{key}"),
                        format!("unknown field, expected one of {}", KNOWN.join(", ")),
                    ));
                }
            }
            catalog::Keyspace::new(&etcd.prefix).map_err(|e| {
                ConfigError::Invalid(format!("{origin}: discovery.etcd.prefix: {e}"))
            })?;
        }
        Ok(())
    }
}
