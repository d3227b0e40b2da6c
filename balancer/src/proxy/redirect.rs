//! `redirect_https = true` on a listener (Traefik's entry-point redirection, HAProxy's
//! `http-request redirect scheme https`, nginx's `return 301 https://$host$request_uri`):
//! every request is answered with a redirect to the same host and target over HTTPS,
//! `301` for GET and HEAD, `308` (method and body kept) for the rest. A request whose host
//! is not a plain name or IP literal gets 400: the `Location` is built from it.

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use super::plain;
use crate::body::RespBody;

/// The answer to a request for `host` (its port already removed) and `target` (origin
/// form), sent to `https://host[:port]target`.
pub(super) fn to_https(host: &str, target: &str, port: u16, method: &Method) -> Response<RespBody> {
    if !plain_host(host) {
        return plain(StatusCode::BAD_REQUEST, "bad or missing host\n", true);
    }
    let location = match port {
        443 => format!("https://{host}{target}"),
        p => format!("https://{host}:{p}{target}"),
    };
    // The target was parsed as a URI and the host checked: always a valid value.
    let Ok(location) = HeaderValue::try_from(location) else {
        return plain(StatusCode::BAD_REQUEST, "bad target\n", true);
    };
    let mut r = Response::new(RespBody::empty());
    *r.status_mut() = if matches!(*method, Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    r.headers_mut().insert(header::LOCATION, location);
    r
}

/// A DNS name or IPv4 address (letters, digits, `.`, `-`), or a bracketed IPv6 literal.
fn plain_host(host: &str) -> bool {
    let name = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            !v6.is_empty()
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => !host.is_empty() && host.bytes().all(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(r: &Response<RespBody>) -> &str {
        r.headers()[header::LOCATION].to_str().unwrap()
    }

    #[test]
    fn same_host_and_target_over_https() {
        let r = to_https("example.test", "/a/b?c=1", 443, &Method::GET);
        assert_eq!(r.status(), 301);
        assert_eq!(location(&r), "https://example.test/a/b?c=1");
        let r = to_https("[::1]", "/", 8443, &Method::POST);
        assert_eq!(r.status(), 308);
        assert_eq!(location(&r), "https://[::1]:8443/");
        assert_eq!(to_https("10.0.0.1", "/", 443, &Method::HEAD).status(), 301);
    }

    #[test]
    fn a_host_that_is_not_a_name_is_refused() {
        for bad in ["", "evil.test/x", "a@b", "a b", "[]", "[::1", "x\u{e9}"] {
            assert_eq!(
                to_https(bad, "/", 443, &Method::GET).status(),
                400,
                "{bad:?}"
            );
        }
    }
}
