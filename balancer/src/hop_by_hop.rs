//! Which header lines of an HTTP/1 head are hop-by-hop (RFC 9110 §7.6.1): the fixed
//! list, and the names a `Connection` line adds. Byte-level and allocation-free, as they
//! run per header line on both heads of every forwarded request.

/// Hop-by-hop header names (RFC 9110 §7.6.1 and the usual non-standard ones), never
/// forwarded as they are. `name` in any case.
#[inline]
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // By length, then first letter: most names are ruled out without a comparison, and
    // a name that could match is compared with one candidate (called per header line).
    let Some(&first) = name.first() else {
        return false;
    };
    let candidate: &[u8] = match (name.len(), first.to_ascii_lowercase()) {
        (2, b't') => b"te",
        (7, b't') => b"trailer",
        (7, b'u') => b"upgrade",
        (10, b'c') => b"connection",
        (10, b'k') => b"keep-alive",
        (16, b'p') => b"proxy-connection",
        (17, b't') => b"transfer-encoding",
        (18, b'p') => b"proxy-authenticate",
        (19, b'p') => b"proxy-authorization",
        _ => return false,
    };
    eq_lowercase(name, candidate)
}

/// `name` equals `lower` (all lower case) ignoring ASCII case. Cheaper than
/// `eq_ignore_ascii_case`, which lowers both sides.
#[inline]
pub fn eq_lowercase(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower)
            .all(|(a, b)| a.to_ascii_lowercase() == *b)
}

/// A `Connection` value whose tokens name no extra header to remove: the usual
/// `keep-alive` / `close`, and `upgrade` (handled by the caller).
pub fn names_no_extra_header(v: &[u8]) -> bool {
    // The usual whole values first (once per message with a `Connection` line).
    if eq_lowercase(v, b"keep-alive") || eq_lowercase(v, b"close") {
        return true;
    }
    v.split(|&c| c == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty()
            || eq_lowercase(t, b"keep-alive")
            || eq_lowercase(t, b"close")
            || eq_lowercase(t, b"upgrade")
    })
}

/// `name` is one of the tokens of the `Connection` values `connection`.
pub fn named_in<'a>(connection: impl Iterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    connection
        .flat_map(|v| v.split(|&c| c == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
}

/// `name` is listed by one of the `Connection` lines among `headers` (a response head).
pub fn named_by_connection(headers: &[httparse::Header<'_>], name: &[u8]) -> bool {
    named_in(
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .map(|h| h.value),
        name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_in_any_case() {
        assert!(is_hop_by_hop(b"Keep-Alive") && is_hop_by_hop(b"TRANSFER-ENCODING"));
        assert!(!is_hop_by_hop(b"content-length") && !is_hop_by_hop(b"tee"));
        assert!(names_no_extra_header(b"Keep-Alive, Upgrade"));
        assert!(!names_no_extra_header(b"close, x-a"));
        assert!(names_no_extra_header(b"CLOSE") && names_no_extra_header(b"keep-alive"));
        assert!(!names_no_extra_header(b"keep-alivex") && !names_no_extra_header(b"x-a"));
    }

    #[test]
    fn eq_lowercase_ignores_the_case_of_the_name_only() {
        assert!(eq_lowercase(b"Content-LENGTH", b"content-length"));
        assert!(eq_lowercase(b"", b""));
        assert!(!eq_lowercase(b"content-lengthx", b"content-length"));
        assert!(!eq_lowercase(b"content_length", b"content-length"));
        // Only letters fold: '-' is not '\r' nor 'M'.
        assert!(!eq_lowercase(b"keep\ralive", b"keep-alive"));
        assert!(!eq_lowercase(b"keepMalive", b"keep-alive"));
    }

    #[test]
    fn hop_by_hop_is_exactly_the_list() {
        const LIST: [&str; 9] = [
            "te",
            "trailer",
            "upgrade",
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "proxy-authenticate",
            "proxy-authorization",
        ];
        for name in LIST {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
            assert!(
                is_hop_by_hop(name.to_ascii_uppercase().as_bytes()),
                "{name}"
            );
            // Every single-byte change of a listed name (same length, same first letter
            // or not) is not hop-by-hop.
            for i in 0..name.len() {
                let mut other = name.as_bytes().to_vec();
                other[i] = b'q';
                assert!(
                    !is_hop_by_hop(&other),
                    "{}",
                    String::from_utf8_lossy(&other)
                );
            }
        }
        for name in [
            "",
            "t",
            "host",
            "content-type",
            "x-backend",
            "proxy-connectio",
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }
}
