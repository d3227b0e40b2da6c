//! `strip_prefix = true` on a route (Traefik's StripPrefix middleware, HAProxy's
//! `http-request replace-path`, Envoy's `prefix_rewrite` to `/`): the instance gets the
//! path without the route's `path_prefix`, and the prefix in `X-Forwarded-Prefix` (with
//! `forwarded_headers`), so an application mounted at `/` can serve under `/api` and still
//! build its own links.

use std::borrow::Cow;

/// `target` (origin form: path and query) without `prefix`, which the route matched on
/// its path. The result always starts with `/`: `/api` stripped from `/api/users?a=1`
/// leaves `/users?a=1`, from `/api` or `/api?a=1` leaves `/` or `/?a=1`, from `/apix`
/// (routes match byte prefixes) leaves `/x`.
pub fn strip<'t>(target: &'t str, prefix: &str) -> Cow<'t, str> {
    let Some(rest) = target.strip_prefix(prefix) else {
        // The route matched the path, so this is `*` or a target it did not match.
        return Cow::Borrowed(target);
    };
    if rest.starts_with('/') {
        Cow::Borrowed(rest)
    } else {
        Cow::Owned(format!("/{rest}"))
    }
}

/// The value of `X-Forwarded-Prefix` for a route's `path_prefix`: without its trailing
/// slash (`/api/` → `/api`), so that an application appends its own paths to it.
pub fn forwarded(prefix: &str) -> &str {
    match prefix.strip_suffix('/') {
        Some("") | None => prefix,
        Some(p) => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_goes_and_a_slash_always_leads() {
        assert_eq!(strip("/api/users?a=1", "/api"), "/users?a=1");
        assert_eq!(strip("/api/users", "/api/"), "/users");
        assert_eq!(strip("/api", "/api"), "/");
        assert_eq!(strip("/api?a=1", "/api"), "/?a=1");
        assert_eq!(strip("/apix", "/api"), "/x");
        assert_eq!(strip("/", "/"), "/");
        assert_eq!(strip("/a/b", "/"), "/a/b");
        assert!(matches!(strip("/api/x", "/api"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_forwarded_prefix_has_no_trailing_slash() {
        assert_eq!(forwarded("/api/"), "/api");
        assert_eq!(forwarded("/api"), "/api");
        assert_eq!(forwarded("/"), "/");
    }
}
