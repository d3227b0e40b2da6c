//! Header rules of the proxy path that work on `http` types: hop-by-hop stripping for
//! responses kept as a `HeaderMap`, the upgrade test, the routing host, idempotency.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

use crate::h1_head;
use crate::hop_by_hop;
use crate::upstream;

/// Removes hop-by-hop headers (the names of [`hop_by_hop::is_hop_by_hop`], the one list for
/// both paths), including those the `Connection` header names (responses to HTTP/2 clients
/// and 101s; HTTP/1 heads are filtered as bytes, see [`h1_head`]).
///
/// One scan over the names finds which hop-by-hop headers are present (at most nine, kept
/// in a fixed array), and only those are removed; nothing is allocated unless `Connection`
/// names extra headers.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut present: [Option<HeaderName>; 9] = Default::default();
    for (slot, n) in present.iter_mut().zip(
        h.keys()
            .filter(|n| hop_by_hop::is_hop_by_hop(n.as_str().as_bytes())),
    ) {
        *slot = Some(n.clone());
    }
    if present.iter().flatten().any(|n| n == header::CONNECTION) {
        let conn = h.get_all(header::CONNECTION);
        if !conn
            .iter()
            .all(|v| hop_by_hop::names_no_extra_header(v.as_bytes()))
        {
            // Rare: the header names extra hop-by-hop headers.
            let named: Vec<HeaderName> = conn
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("").split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .filter(|n| !(keep_upgrade && n == header::UPGRADE))
                .collect();
            for n in named {
                h.remove(n);
            }
        }
    }
    for n in present.into_iter().flatten() {
        if keep_upgrade && (n == header::UPGRADE || n == header::CONNECTION) {
            continue;
        }
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// An HTTP/1.1 `Upgrade` request (the HTTP/1 parser decides the same from the raw head).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| upstream::has_token(v.as_bytes(), "upgrade"))
}

/// Host of the request without port, from `Host` or the URI authority (HTTP/2).
pub(super) fn host_of<'a>(headers: h1_head::ReqHeaders<'a>, uri: &'a http::Uri) -> &'a str {
    let raw = headers
        .host()
        .and_then(|h| std::str::from_utf8(h).ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    match raw.rsplit_once(':') {
        // IPv6 literals keep their brackets: `[::1]:80` → `[::1]`.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    }
}

pub(super) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::header_map as map;

    #[test]
    fn strips_hop_by_hop_and_headers_named_by_every_connection_line() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive"),
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|n| n.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-kept"]);
    }

    #[test]
    fn plain_keep_alive_response_loses_only_its_hop_headers() {
        let mut h = map(&[
            ("server", "nginx"),
            ("content-length", "100"),
            ("connection", "keep-alive"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("content-length") && h.contains_key("server"));
    }

    #[test]
    fn upgrade_keeps_upgrade_and_says_connection_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, x-drop"),
            ("upgrade", "websocket"),
            ("x-drop", "1"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(!h.contains_key("x-drop"));
    }
}
