//! Pinning a request to one version of its service: `version_header` / `version_cookie`
//! on a route (nginx-ingress' canary-by-header and canary-by-cookie; an Envoy route that
//! matches a header onto one cluster). Testers reach a canary, or a version that has no
//! share of the split at all (a dark launch: deployed, registered, healthy, but given no
//! user traffic), before any user does.
//!
//! The value names the version (`X-Version: v2`, `Cookie: version=v2`); the header wins
//! over the cookie. A version the service does not have, or with no routable instance,
//! leaves the request to the split. Anyone who can set the header or cookie can pick the
//! version: set it on a route of an internal listener only if that matters.
//!
//! Cost: nothing on routes without it; on routes with it, one scan of the request's header
//! lines.

use std::sync::Arc;

use http::HeaderName;

use crate::h1_head::ReqHeaders;

/// What a route reads the requested version from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPin {
    /// Lower case (compared against raw names case-insensitively).
    header: Option<HeaderName>,
    cookie: Option<Box<str>>,
}

impl VersionPin {
    /// `None` when the route pins nothing. Names are checked by [`validate`] first.
    pub fn new(header: Option<&str>, cookie: Option<&str>) -> Option<Self> {
        let header = header.and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok());
        let cookie = cookie.map(Box::from);
        (header.is_some() || cookie.is_some()).then_some(Self { header, cookie })
    }

    /// Where requests name their version, for `--check`: `header X-Version, cookie v`.
    pub fn describe(&self) -> String {
        let header = self.header.as_ref().map(|h| format!("header {h}"));
        let cookie = self.cookie.as_ref().map(|c| format!("cookie {c}"));
        header
            .into_iter()
            .chain(cookie)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The index in `versions` of the version the request asks for, if it names one.
    pub fn version(&self, headers: ReqHeaders<'_>, versions: &[Arc<str>]) -> Option<usize> {
        let wanted = self.requested(headers)?;
        versions.iter().position(|v| v.as_bytes() == wanted)
    }

    fn requested<'h>(&self, headers: ReqHeaders<'h>) -> Option<&'h [u8]> {
        let mut from_cookie = None;
        for (name, value) in headers.iter() {
            if let Some(h) = &self.header
                && name.eq_ignore_ascii_case(h.as_str().as_bytes())
            {
                return Some(value.trim_ascii());
            }
            if from_cookie.is_none()
                && let Some(c) = &self.cookie
                && name.eq_ignore_ascii_case(b"cookie")
            {
                from_cookie = cookie_value(value, c.as_bytes());
            }
        }
        from_cookie
    }
}

/// The value of cookie `name` in a `Cookie` header value (`a=1; name=v2`), quotes removed.
pub(crate) fn cookie_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (n, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
        let v = v
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(v);
        (n == name).then_some(v)
    })
}

/// Checks a route's `version_header` and `version_cookie`: the failing key's last part
/// and why.
pub fn validate(header: Option<&str>, cookie: Option<&str>) -> Result<(), (&'static str, String)> {
    if let Some(h) = header
        && HeaderName::from_bytes(h.as_bytes()).is_err()
    {
        return Err(("version_header", format!("{h:?} is not a header name")));
    }
    if let Some(c) = cookie
        && !cookie_name_ok(c)
    {
        return Err(("version_cookie", format!("{c:?} is not a cookie name")));
    }
    Ok(())
}

/// RFC 6265: a cookie name is an HTTP token.
pub(crate) fn cookie_name_ok(name: &str) -> bool {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !name.is_empty() && name.bytes().all(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn versions() -> Vec<Arc<str>> {
        vec!["v1".into(), "v2".into()]
    }

    fn map(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in lines {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn header_then_cookie_name_the_version() {
        let pin = VersionPin::new(Some("X-Version"), Some("version")).unwrap();
        let v = |lines| pin.version(ReqHeaders::Map(&map(lines)), &versions());
        assert_eq!(v(&[("x-version", " v2 ")]), Some(1));
        assert_eq!(v(&[("cookie", "a=1; version=v2; b=2")]), Some(1));
        assert_eq!(
            v(&[("cookie", "a=1"), ("cookie", "version=\"v1\"")]),
            Some(0)
        );
        // The header wins, wherever it stands.
        assert_eq!(v(&[("cookie", "version=v2"), ("x-version", "v1")]), Some(0));
        // Unknown versions, other cookies, prefixes of the name: the split decides.
        assert_eq!(v(&[("x-version", "v9")]), None);
        assert_eq!(v(&[("cookie", "myversion=v2; versions=v2")]), None);
        assert_eq!(v(&[]), None);
    }

    #[test]
    fn raw_http1_names_match_in_any_case() {
        let mut buf =
            bytes::BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\nx-VERSION: v2\r\n\r\n"[..]);
        let parsed = crate::h1_request::parse(&mut buf, 100, 8192)
            .unwrap()
            .unwrap();
        let pin = VersionPin::new(Some("X-Version"), None).unwrap();
        assert_eq!(
            pin.version(ReqHeaders::Raw(&parsed.head), &versions()),
            Some(1)
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(VersionPin::new(None, None).is_none());
        assert!(validate(Some("X-Version"), Some("canary_v")).is_ok());
        assert_eq!(
            validate(Some("bad name"), None).unwrap_err().0,
            "version_header"
        );
        assert_eq!(validate(None, Some("a=b")).unwrap_err().0, "version_cookie");
        assert_eq!(validate(None, Some("")).unwrap_err().0, "version_cookie");
    }
}
