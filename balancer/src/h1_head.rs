//! HTTP/1 heads forwarded as bytes: the request head for an upstream is encoded straight
//! from the client's headers (hop-by-hop ones left out, `X-Forwarded-*` added), and an
//! upstream's response head for an HTTP/1 client is copied line by line out of the parsed
//! buffer. No `HeaderMap` is edited on the way: no hashing, no removals, no refcounted
//! values — the hot path's user-space cost was mostly building, editing and re-encoding
//! two maps per request.

use http::header::{HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::h1_request::{RawHead, RawLines};
use crate::hop_by_hop::{eq_lowercase, is_hop_by_hop, named_in, names_no_extra_header};

/// A request's header lines as the proxy reads them: an HTTP/1 client's head as it came
/// (no map built), or an HTTP/2 request's map.
#[derive(Clone, Copy)]
pub enum ReqHeaders<'a> {
    Raw(&'a RawHead),
    Map(&'a HeaderMap),
}

impl<'a> ReqHeaders<'a> {
    /// The raw head when the own HTTP/1 server parsed the request, else the request's map.
    pub fn of(raw: Option<&'a RawHead>, map: &'a HeaderMap) -> Self {
        raw.map_or(Self::Map(map), Self::Raw)
    }

    /// About how many bytes the lines take once encoded.
    pub fn encoded_len_hint(self) -> usize {
        match self {
            Self::Raw(h) => h.byte_len(),
            Self::Map(m) => m.len() * 48,
        }
    }

    /// `(name, value)` pairs in order (names of a map are lower case, raw ones as sent).
    pub fn iter(self) -> ReqLines<'a> {
        match self {
            Self::Raw(h) => ReqLines::Raw(h.lines()),
            Self::Map(m) => ReqLines::Map(m.iter()),
        }
    }

    /// The first `Host` value.
    pub fn host(self) -> Option<&'a [u8]> {
        match self {
            Self::Raw(h) => h.host(),
            Self::Map(m) => m.get(http::header::HOST).map(HeaderValue::as_bytes),
        }
    }

    /// The declared body length: `Some(None)` for an unparsable `Content-Length` (the
    /// HTTP/1 parser refuses those; an HTTP/2 request may carry one).
    pub fn content_length(self) -> Option<Option<u64>> {
        match self {
            Self::Raw(h) => h.content_length().map(Some),
            Self::Map(m) => m
                .get(http::header::CONTENT_LENGTH)
                .map(|v| crate::upstream::parse_length(v.as_bytes())),
        }
    }

    /// `Content-Length` is on more than one line.
    fn repeated_length(self) -> bool {
        match self {
            Self::Raw(h) => h.repeated_length(),
            Self::Map(m) => m
                .get_all(http::header::CONTENT_LENGTH)
                .iter()
                .nth(1)
                .is_some(),
        }
    }

    fn connection_names_more(self) -> bool {
        match self {
            Self::Raw(h) => h.connection_names_more(),
            Self::Map(m) => m
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| !names_no_extra_header(v.as_bytes())),
        }
    }
}

/// Iterator of [`ReqHeaders::iter`].
pub enum ReqLines<'a> {
    Raw(RawLines<'a>),
    Map(http::header::Iter<'a, HeaderValue>),
}

impl<'a> Iterator for ReqLines<'a> {
    type Item = (&'a [u8], &'a [u8]);

    // Inlined into each caller: with a second caller (`version_pin`) LLVM outlined it, and
    // the request head's encoding paid ~75 instructions a request for the calls
    // (`bench/balancer-callgrind.sh`).
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Raw(l) => l.next(),
            Self::Map(m) => m.next().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        }
    }
}

/// A response head for an HTTP/1 client, encoded as it goes out: the status line, then
/// the upstream's end-to-end header lines. Written while the upstream's head is parsed, so
/// that the buffer becomes the client's write buffer as it is (the framing lines and the
/// body bytes at hand are appended).
#[derive(Debug, Default)]
pub struct Lines {
    pub bytes: Vec<u8>,
    /// Where the header lines start (after the status line).
    pub status_len: usize,
    /// A `Content-Length` line is among them.
    pub has_length: bool,
}

impl Lines {
    /// Starts with the status line (`version` is the client's, the reason the canonical
    /// one); `capacity`: room for what follows it.
    pub fn with_status(capacity: usize, version: Version, status: StatusCode) -> Self {
        let mut bytes = Vec::with_capacity(capacity + 48);
        put_status_line(&mut bytes, version, status);
        Self {
            status_len: bytes.len(),
            bytes,
            has_length: false,
        }
    }

    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        put(&mut self.bytes, name, value);
    }

    /// The header lines without the status line.
    pub fn header_lines(&self) -> &[u8] {
        &self.bytes[self.status_len..]
    }
}

/// `HTTP/1.x NNN Reason\r\n`: HTTP/1.0 for an HTTP/1.0 client, else HTTP/1.1.
pub fn put_status_line(out: &mut Vec<u8>, version: Version, status: StatusCode) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one header line `name: value`.
pub fn put(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The request target for the upstream hop, in origin form (RFC 9112 §3.2.1): an
/// absolute-form target (`http://host?q`, from a client that speaks to us as a proxy, or
/// an HTTP/2 request) loses its scheme and authority, and an empty path becomes `/`.
pub fn origin_form(uri: &http::Uri) -> std::borrow::Cow<'_, str> {
    match uri.path_and_query().map(|p| p.as_str()) {
        Some(t) if t.starts_with('/') || t == "*" => t.into(),
        Some(t) => format!("/{t}").into(),
        None => "/".into(),
    }
}

/// What the balancer adds to a forwarded request.
pub struct Forwarded<'a> {
    /// Add `X-Forwarded-*` (the listener's `forwarded_headers`); when false the client's
    /// own `X-Forwarded-*` lines pass unchanged.
    pub add: bool,
    /// The client's IP (X-Forwarded-For).
    pub peer_ip: &'a HeaderValue,
    /// The client connection is TLS (X-Forwarded-Proto).
    pub tls: bool,
    /// The client's verified certificate (X-Forwarded-Client-Cert).
    pub client_cert: Option<&'a HeaderValue>,
    /// The request's authority when it has no `Host` header (HTTP/2).
    pub authority: Option<&'a str>,
    /// An upgrade request: `Upgrade` is kept, `Connection: upgrade` sent.
    pub upgrade: bool,
    /// The body goes upstream chunked.
    pub chunked: bool,
    /// What route and listener options change (`None` on most requests: one pointer
    /// instead of their fields keeps this struct and its callers' futures small).
    pub rewrite: Option<&'a Rewrite<'a>>,
}

/// The request head changes of route and listener options.
#[derive(Default)]
pub struct Rewrite<'a> {
    /// The path prefix a `strip_prefix` route removed (X-Forwarded-Prefix).
    pub prefix: Option<&'a str>,
    /// The route's `request_headers` rules.
    pub rules: Option<&'a crate::header_rules::HeaderRules>,
    /// A request id the balancer made (`request_id_header`): name and value.
    pub request_id: Option<(&'a [u8], &'a [u8])>,
}

impl Rewrite<'_> {
    /// A client line of this name does not go (a rule replaces or removes it, or it is
    /// an unusable request id the balancer replaced).
    fn drops(&self, name: &[u8]) -> bool {
        self.rules.is_some_and(|r| r.drops(name))
            || self.request_id.is_some_and(|(n, _)| eq_lowercase(name, n))
    }
}

/// Encodes the request head for the upstream hop: `METHOD target HTTP/1.1`, the client's
/// end-to-end headers in their order, then `Connection: upgrade` (upgrades),
/// `X-Forwarded-For` (the client's list plus its IP), `X-Forwarded-Proto`,
/// `X-Forwarded-Host` (unless the client sent one), `X-Forwarded-Client-Cert` (mutual TLS;
/// the client's own is dropped), `X-Forwarded-Prefix` (a `strip_prefix` route; the
/// client's own is dropped) — these only if `fwd.add` —,
/// `Host` (from the authority when the client sent none) and `Transfer-Encoding: chunked`
/// if asked.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: ReqHeaders<'_>,
    fwd: &Forwarded<'_>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let connection = || {
        headers
            .iter()
            .filter(|(n, _)| eq_lowercase(n, b"connection"))
            .map(|(_, v)| v)
    };
    let connection_names_more = headers.connection_names_more();
    let mut prev_xff: Option<&[u8]> = None;
    let host = headers.host();
    let mut has_xfh = false;
    // Only a head with several length lines needs each name compared.
    let repeated_length = headers.repeated_length();
    let mut length_sent = false;
    for (name, value) in headers.iter() {
        let keep_upgrade = fwd.upgrade && eq_lowercase(name, b"upgrade");
        if !keep_upgrade
            && (is_hop_by_hop(name) || (connection_names_more && named_in(connection(), name)))
        {
            continue;
        }
        // The `X-Forwarded-*` lines, told apart by one length check and one compare of
        // their common start (most lines are ruled out by the first).
        let forwarded =
            (name.len() >= 15 && eq_lowercase(&name[..12], b"x-forwarded-")).then(|| &name[12..]);
        if let Some(kind) = forwarded {
            if fwd.add && eq_lowercase(kind, b"for") {
                prev_xff.get_or_insert(value);
                continue;
            }
            // What only the balancer may say: the client's own lines are dropped (a client
            // certificate claimed by the client itself would otherwise reach the instance).
            if fwd.add
                && (eq_lowercase(kind, b"proto")
                    || eq_lowercase(kind, b"client-cert")
                    || (fwd.rewrite.is_some_and(|r| r.prefix.is_some())
                        && eq_lowercase(kind, b"prefix")))
            {
                continue;
            }
            has_xfh |= eq_lowercase(kind, b"host");
        }
        if let Some(r) = fwd.rewrite
            && r.drops(name)
        {
            continue;
        }
        // One length line: identical duplicates were accepted as one (RFC 9110 §8.6), and
        // passing both on would leave the next hop to choose (nginx refuses the request).
        if repeated_length && eq_lowercase(name, b"content-length") {
            if length_sent {
                continue;
            }
            length_sent = true;
        }
        put(out, name, value);
    }
    if fwd.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if fwd.add {
        out.extend_from_slice(b"x-forwarded-for: ");
        // A previous list that is not visible ASCII is replaced, not extended.
        if let Some(prev) =
            prev_xff.filter(|v| v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
        {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(fwd.peer_ip.as_bytes());
        out.extend_from_slice(if fwd.tls {
            b"\r\nx-forwarded-proto: https\r\n"
        } else {
            b"\r\nx-forwarded-proto: http\r\n"
        });
        if let Some(c) = fwd.client_cert {
            put(out, b"x-forwarded-client-cert", c.as_bytes());
        }
        if let Some(p) = fwd.rewrite.and_then(|r| r.prefix) {
            put(out, b"x-forwarded-prefix", p.as_bytes());
        }
    }
    if let Some(h) = host.or(fwd.authority.map(str::as_bytes)) {
        if fwd.add && !has_xfh {
            put(out, b"x-forwarded-host", h);
        }
        let host_set = fwd
            .rewrite
            .and_then(|r| r.rules)
            .is_some_and(|r| r.sets_host());
        if host.is_none() && !host_set {
            put(out, b"host", h);
        }
    }
    if let Some(rw) = fwd.rewrite {
        if let Some(r) = rw.rules {
            r.put_set(out);
        }
        if let Some((n, v)) = rw.request_id {
            put(out, n, v);
        }
    }
    if fwd.chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::header_map as map;

    fn encode(h: &HeaderMap, fwd: &Forwarded<'_>) -> String {
        let mut out = Vec::new();
        encode_request(&mut out, &Method::GET, "/a?b", ReqHeaders::Map(h), fwd);
        let from_map = String::from_utf8(out).unwrap();
        // The same lines as an HTTP/1 client's raw head encode the same way.
        let mut raw = String::from("GET /a?b HTTP/1.1\r\n");
        for (n, v) in h {
            raw += &format!("{n}:  {}\r\n", v.to_str().unwrap());
        }
        raw += "\r\n";
        let parsed = crate::h1_request::parse(&mut raw.as_str().into(), 100, 8192)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::GET,
            "/a?b",
            ReqHeaders::Raw(&parsed.head),
            fwd,
        );
        assert_eq!(String::from_utf8(out).unwrap(), from_map);
        from_map
    }

    fn fwd(ip: &HeaderValue) -> Forwarded<'_> {
        Forwarded {
            add: true,
            peer_ip: ip,
            tls: false,
            client_cert: None,
            authority: None,
            upgrade: false,
            chunked: false,
            rewrite: None,
        }
    }

    #[test]
    fn targets_go_upstream_in_origin_form() {
        for (uri, want) in [
            ("http://a.example?y", "/?y"),
            ("http://a.example", "/"),
            ("https://a.example:8443/x/y?z", "/x/y?z"),
            ("/p?q", "/p?q"),
            ("*", "*"),
        ] {
            assert_eq!(origin_form(&uri.parse().unwrap()), want, "{uri}");
        }
    }

    #[test]
    fn a_repeated_length_goes_upstream_once() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let h = map(&[
            ("content-length", "5"),
            ("x-a", "1"),
            ("content-length", "5"),
        ]);
        let out = encode(
            &h,
            &Forwarded {
                add: false,
                ..fwd(&ip)
            },
        );
        assert_eq!(
            out,
            "GET /a?b HTTP/1.1\r\ncontent-length: 5\r\nx-a: 1\r\n\r\n"
        );
    }

    #[test]
    fn request_loses_hop_headers_and_gains_forwarded_ones() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let h = map(&[
            ("host", "a.example:8080"),
            ("connection", "keep-alive"),
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("X-Forwarded-Client-Cert", "Hash=forged"),
            ("x-kept", "1"),
        ]);
        assert_eq!(
            encode(&h, &fwd(&ip)),
            "GET /a?b HTTP/1.1\r\nhost: a.example:8080\r\nx-kept: 1\r\n\
             x-forwarded-for: 1.2.3.4, 10.0.0.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: a.example:8080\r\n\r\n"
        );
    }

    #[test]
    fn upgrade_keeps_upgrade_and_h2_authority_becomes_host() {
        let ip = HeaderValue::from_static("::1");
        let h = map(&[
            ("connection", "Upgrade, x-drop"),
            ("upgrade", "websocket"),
            ("x-drop", "1"),
            ("x-forwarded-host", "front"),
        ]);
        let cert = HeaderValue::from_static("Hash=ab12;Subject=\"CN=client\"");
        let f = Forwarded {
            tls: true,
            client_cert: Some(&cert),
            authority: Some("b.example"),
            upgrade: true,
            chunked: true,
            ..fwd(&ip)
        };
        assert_eq!(
            encode(&h, &f),
            "GET /a?b HTTP/1.1\r\nupgrade: websocket\r\nx-forwarded-host: front\r\n\
             connection: upgrade\r\nx-forwarded-for: ::1\r\nx-forwarded-proto: https\r\n\
             x-forwarded-client-cert: Hash=ab12;Subject=\"CN=client\"\r\nhost: b.example\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn without_forwarded_headers_the_clients_pass_unchanged() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("connection", "keep-alive"),
            ("x-kept", "1"),
        ]);
        // HTTP/2 without `host`: the authority still becomes `Host`, nothing else is added.
        let f = Forwarded {
            add: false,
            authority: Some("b.example"),
            ..fwd(&ip)
        };
        assert_eq!(
            encode(&h, &f),
            "GET /a?b HTTP/1.1\r\nx-forwarded-for: 1.2.3.4\r\nx-forwarded-proto: https\r\n\
             x-kept: 1\r\nhost: b.example\r\n\r\n"
        );
    }

    #[test]
    fn a_stripped_prefix_is_forwarded_in_place_of_the_clients() {
        let ip = HeaderValue::from_static("::1");
        let h = map(&[("x-forwarded-prefix", "/forged"), ("x-a", "1")]);
        let rw = Rewrite {
            prefix: Some("/api"),
            ..Rewrite::default()
        };
        let f = Forwarded {
            rewrite: Some(&rw),
            ..fwd(&ip)
        };
        assert_eq!(
            encode(&h, &f),
            "GET /a?b HTTP/1.1\r\nx-a: 1\r\nx-forwarded-for: ::1\r\nx-forwarded-proto: http\r\n\
             x-forwarded-prefix: /api\r\n\r\n"
        );
    }
}
