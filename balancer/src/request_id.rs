//! `request_id_header = "X-Request-Id"` on a listener (HAProxy's `unique-id-header`,
//! Envoy's `x-request-id`, nginx's `$request_id`): every request carries an id to the
//! instance, in the access log and back to the client, so that one request can be followed
//! through the balancer's and the application's logs. A client's own id is kept when it is
//! 1-200 visible ASCII characters; otherwise (or without one) the balancer makes one: 128
//! random bits in hex.

use crate::h1_head::ReqHeaders;

/// A request's id: the client's, or one made here (then added upstream).
pub enum RequestId<'h> {
    Kept(&'h [u8]),
    Made(String),
}

impl RequestId<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Kept(v) => v,
            RequestId::Made(s) => s.as_bytes(),
        }
    }

    /// The id to add to the request sent upstream (`None`: the client's line carries it).
    pub fn to_add(&self) -> Option<&[u8]> {
        match self {
            RequestId::Kept(_) => None,
            RequestId::Made(s) => Some(s.as_bytes()),
        }
    }
}

/// The request's id under header `name` (lower case).
pub fn of<'h>(name: &str, headers: ReqHeaders<'h>) -> RequestId<'h> {
    let usable = |v: &&[u8]| (1..=200).contains(&v.len()) && v.iter().all(|b| b.is_ascii_graphic());
    let sent = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v)
        .filter(usable);
    match sent {
        Some(v) => RequestId::Kept(v),
        None => RequestId::Made(format!(
            "{:016x}{:016x}",
            crate::select::random_u64(),
            crate::select::random_u64()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn a_usable_client_id_is_kept_else_one_is_made() {
        let mut m = HeaderMap::new();
        m.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert!(matches!(
            of("x-request-id", ReqHeaders::Map(&m)),
            RequestId::Kept(b"abc-123")
        ));
        for bad in ["", "has space"] {
            m.insert("x-request-id", HeaderValue::from_static(bad));
            let id = of("x-request-id", ReqHeaders::Map(&m));
            assert!(id.to_add().is_some(), "{bad:?}");
        }
        let long = "a".repeat(201);
        m.insert("x-request-id", HeaderValue::from_str(&long).unwrap());
        assert!(of("x-request-id", ReqHeaders::Map(&m)).to_add().is_some());
        let none = HeaderMap::new();
        let (a, b) = (
            of("x-request-id", ReqHeaders::Map(&none)),
            of("x-request-id", ReqHeaders::Map(&none)),
        );
        assert_eq!(a.as_bytes().len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a.as_bytes(), b.as_bytes());
    }
}
