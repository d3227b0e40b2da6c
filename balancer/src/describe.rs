//! `balancer --check`: what a routing table would route, in words.

use std::fmt::Write as _;

use crate::table::{HostMatch, Route, RoutingTable, ServiceTable};

/// One line per route, then one per routable instance with its version, weight and split
/// share; versions that the split gives no share are listed after, with how requests can
/// still reach them.
pub fn describe(table: &RoutingTable) -> String {
    let mut out = String::new();
    for l in &table.listeners {
        if let Some(port) = l.settings.redirect_https {
            let _ = writeln!(
                out,
                "listener {}: every request redirected to https (port {port})",
                l.name
            );
        }
        for r in &l.routes {
            let host = match &r.host {
                HostMatch::Any => "*".to_owned(),
                HostMatch::Exact(h) => h.clone(),
                HostMatch::Suffix(s) => format!("*{s}"),
            };
            let _ = write!(
                out,
                "listener {} host {} path {} -> service {}{}",
                l.name,
                host,
                r.path_prefix,
                r.service_name,
                options(r)
            );
            match &r.service {
                None => out.push_str(": UNKNOWN SERVICE (no instances; requests get 503)\n"),
                Some(s) => service(&mut out, r, s),
            }
        }
    }
    out
}

/// A route's options, as ` [..., ...]` (empty without any).
fn options(r: &Route) -> String {
    let mut o = Vec::new();
    if r.upstream.as_ref().is_some_and(|u| u.http2) {
        o.push("HTTP/2 to the instances".to_owned());
    }
    if r.strip_prefix {
        o.push("prefix stripped".to_owned());
    }
    if let Some(m) = &r.mirror {
        o.push(format!(
            "{}% of GET/HEAD mirrored to {}",
            m.percent, m.version
        ));
    }
    if let Some(l) = &r.rate_limit {
        let c = l.config();
        o.push(format!(
            "{}/s per client, burst {}",
            c.per_second,
            c.burst()
        ));
    }
    if let Some(a) = &r.allow {
        let nets: Vec<String> = a.iter().map(|c| c.to_string()).collect();
        o.push(format!("clients from {} only", nets.join(", ")));
    }
    if let Some(s) = &r.sticky {
        o.push(format!("sticky by cookie {}", s.name()));
    }
    if let Some(p) = &r.pin {
        o.push(format!("version named by {}", p.describe()));
    }
    if !r.retry_on.is_empty() {
        o.push(format!("retry on {:?}", r.retry_on));
    }
    if let Some(t) = r.response_timeout {
        o.push(format!("response timeout {t:?}"));
    }
    if r.request_rules.is_some() {
        o.push("request header rules".to_owned());
    }
    if r.response_rules.is_some() {
        o.push("response header rules".to_owned());
    }
    if o.is_empty() {
        String::new()
    } else {
        format!(" [{}]", o.join(", "))
    }
}

fn service(out: &mut String, r: &Route, s: &ServiceTable) {
    let _ = writeln!(
        out,
        ": {} routable instance(s){}",
        s.member_count(),
        if s.panic { " [panic mode]" } else { "" }
    );
    for (gi, g) in s.groups.iter().enumerate() {
        for m in &g.members {
            let share = if s.shares.is_empty() {
                String::new()
            } else {
                let prev = if gi == 0 { 0 } else { s.shares[gi - 1] };
                format!(" (split share {})", s.shares[gi] - prev)
            };
            let _ = writeln!(
                out,
                "    {} {} version {} weight {}{share}",
                m.ep.id, m.ep.addr, s.versions[m.version], m.weight
            );
        }
    }
    let in_split = |v: usize| {
        s.groups
            .iter()
            .any(|g| g.members.iter().any(|m| m.version == v))
    };
    for (v, g) in s.version_groups.iter().enumerate() {
        if in_split(v) {
            continue;
        }
        let reach = match &r.pin {
            Some(p) => format!("only requests naming it ({})", p.describe()),
            None => "no requests on this route".to_owned(),
        };
        for m in &g.members {
            let _ = writeln!(
                out,
                "    {} {} version {} weight {} (no split share: {reach})",
                m.ep.id, m.ep.addr, s.versions[v], m.weight
            );
        }
    }
}
