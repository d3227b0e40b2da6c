//! Header rules of a route (`[listener.route.request_headers]` and
//! `[listener.route.response_headers]`: `set` and `remove`), as Traefik's headers
//! middleware, Envoy's `request_headers_to_add`/`_remove` or HAProxy's `http-request
//! set-header` / `http-response del-header` do: add a security header (HSTS, CSP) to every
//! answer, hide `Server`, tell an instance which environment it serves, rewrite `Host`.
//!
//! `set` replaces every line of that name with one; `remove` drops them. Request rules
//! apply to the client's lines (the `X-Forwarded-*` lines the balancer adds are its own,
//! and cannot be named); response rules apply to instances' answers and to the balancer's
//! own answers on the route (502, 503, 504, 413, 400: an HSTS header is on every answer),
//! not to those given before a route is known (404 no route, a listener's redirect).
//! Framing and hop-by-hop headers cannot be named: the balancer owns them. Routes without
//! rules pay one branch.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::h1_head::{self, Lines};
use crate::hop_by_hop;

/// One direction's rules, checked and lower-cased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// Why a rule cannot be: the message for the config error.
pub fn check(name: &str, value: Option<&str>, request: bool) -> Result<(), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    let owned = [
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "trailer",
    ];
    if owned.contains(&n.as_str()) || hop_by_hop::is_hop_by_hop(n.as_str().as_bytes()) {
        return Err(format!(
            "{name} is the balancer's to write (framing, hop-by-hop)"
        ));
    }
    if request && n.as_str().starts_with("x-forwarded-") {
        return Err(format!(
            "{name} is the balancer's to write (see `forwarded_headers`)"
        ));
    }
    if let Some(v) = value {
        HeaderValue::from_str(v).map_err(|_| format!("{v:?} is not a header value"))?;
    }
    Ok(())
}

impl HeaderRules {
    /// `None` without any rule. Names and values are checked by [`check`] first; one
    /// that does not parse is left out.
    pub fn new<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
    ) -> Option<Self> {
        let set: Vec<_> = set
            .into_iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        let remove: Vec<_> = remove
            .into_iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        (!set.is_empty() || !remove.is_empty()).then_some(Self { set, remove })
    }

    /// A line of this name goes (removed, or replaced by a `set`); `name` in any case.
    pub fn drops(&self, name: &[u8]) -> bool {
        let named = |n: &HeaderName| hop_by_hop::eq_lowercase(name, n.as_str().as_bytes());
        self.remove.iter().any(named) || self.set.iter().any(|(n, _)| named(n))
    }

    /// A `set` rule gives `Host`.
    pub fn sets_host(&self) -> bool {
        self.set.iter().any(|(n, _)| n == http::header::HOST)
    }

    /// Writes the `set` lines.
    pub fn put_set(&self, out: &mut Vec<u8>) {
        for (n, v) in &self.set {
            h1_head::put(out, n.as_str().as_bytes(), v.as_bytes());
        }
    }

    /// Applies the rules to an answer's headers.
    pub fn apply(&self, answer: &mut Answer<'_>) {
        match answer {
            Answer::Lines(lines) => {
                retain_lines(lines, |name| !self.drops(name));
                self.put_set(&mut lines.bytes);
            }
            Answer::Map(map) => {
                for n in &self.remove {
                    map.remove(n);
                }
                for (n, v) in &self.set {
                    map.insert(n.clone(), v.clone());
                }
            }
        }
    }
}

/// An answer's headers as the client will get them: an HTTP/1 client's lines (bytes), or
/// a map (an HTTP/2 client's, a 101's, the balancer's own answers).
pub enum Answer<'a> {
    Lines(&'a mut Lines),
    Map(&'a mut HeaderMap),
}

impl Answer<'_> {
    /// One line `name: value` in place of any of that name (`name` lower case).
    pub fn set(&mut self, name: &HeaderName, value: &HeaderValue) {
        match self {
            Answer::Lines(lines) => {
                let n = name.as_str().as_bytes();
                retain_lines(lines, |line| !hop_by_hop::eq_lowercase(line, n));
                h1_head::put(&mut lines.bytes, n, value.as_bytes());
            }
            Answer::Map(map) => {
                map.insert(name.clone(), value.clone());
            }
        }
    }

    /// One more line `name: value`.
    pub fn append(&mut self, name: &HeaderName, value: HeaderValue) {
        match self {
            Answer::Lines(lines) => lines.push(name.as_str().as_bytes(), value.as_bytes()),
            Answer::Map(map) => {
                map.append(name.clone(), value);
            }
        }
    }
}

/// Keeps the header lines whose name `keep` accepts (any case).
fn retain_lines(lines: &mut Lines, keep: impl Fn(&[u8]) -> bool) {
    let start = lines.status_len;
    let kept: Vec<u8> = lines.bytes[start..]
        .split_inclusive(|b| *b == b'\n')
        .filter(|line| keep(line.split(|b| *b == b':').next().unwrap_or(line)))
        .flatten()
        .copied()
        .collect();
    lines.bytes.truncate(start);
    lines.bytes.extend_from_slice(&kept);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{StatusCode, Version};

    fn rules() -> HeaderRules {
        HeaderRules::new(
            [("Strict-Transport-Security", "max-age=63072000")],
            ["server", "X-Powered-By"],
        )
        .unwrap()
    }

    #[test]
    fn lines_lose_removed_and_replaced_headers_and_gain_the_set_ones() {
        let mut l = Lines::with_status(64, Version::HTTP_11, StatusCode::OK);
        for (n, v) in [
            ("Server", "nginx"),
            ("Content-Type", "text/plain"),
            ("strict-transport-security", "max-age=1"),
            ("X-Powered-By", "php"),
            ("X-Kept", "1"),
        ] {
            l.push(n.as_bytes(), v.as_bytes());
        }
        rules().apply(&mut Answer::Lines(&mut l));
        assert_eq!(
            String::from_utf8(l.header_lines().to_vec()).unwrap(),
            "Content-Type: text/plain\r\nX-Kept: 1\r\nstrict-transport-security: max-age=63072000\r\n"
        );
        assert!(l.bytes.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn maps_too() {
        let mut m = HeaderMap::new();
        m.append("server", HeaderValue::from_static("nginx"));
        m.append(
            "strict-transport-security",
            HeaderValue::from_static("max-age=1"),
        );
        m.append(
            "strict-transport-security",
            HeaderValue::from_static("max-age=2"),
        );
        m.append("x-kept", HeaderValue::from_static("1"));
        rules().apply(&mut Answer::Map(&mut m));
        assert!(m.get("server").is_none());
        let hsts: Vec<_> = m.get_all("strict-transport-security").iter().collect();
        assert_eq!(hsts, ["max-age=63072000"]);
        assert_eq!(m["x-kept"], "1");
    }

    #[test]
    fn what_the_balancer_writes_cannot_be_named() {
        assert!(check("X-Env", Some("prod"), true).is_ok());
        assert!(check("Host", Some("internal"), true).is_ok());
        for owned in [
            "Content-Length",
            "transfer-encoding",
            "Connection",
            "Keep-Alive",
            "TE",
        ] {
            assert!(check(owned, None, false).is_err(), "{owned}");
        }
        assert!(check("X-Forwarded-For", None, true).is_err());
        assert!(check("X-Forwarded-For", None, false).is_ok());
        assert!(check("bad name", None, true).is_err());
        assert!(check("X-Ok", Some("line\nbreak"), true).is_err());
        assert!(HeaderRules::new([], []).is_none());
    }
}
