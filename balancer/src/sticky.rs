//! Sticky sessions: `sticky_cookie = "<name>"` on a route (HAProxy's `cookie … insert`,
//! Traefik's sticky cookie, nginx's `sticky cookie`). The first answer to a client sets a
//! cookie naming the instance that served it; the client's next requests go to that
//! instance while it stays routable (and the request is not pinned to another version),
//! else as usual, and the answer then names the new instance. During a canary, a client
//! thus stays on the version it first got.
//!
//! The cookie's value is the first 64 bits of SHA-256 over the service and instance id, in
//! hex: the same in every balancer of a fleet and across restarts (a client keeps its
//! instance whichever balancer it reaches), and it shows no address. A session cookie
//! (`Path=/; HttpOnly; SameSite=Lax`, `Secure` over TLS), or one that lasts
//! `sticky_max_age` (`Max-Age`), set only when the request did not already name the
//! instance that answered.

use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::h1_head::ReqHeaders;
use crate::version_pin::cookie_value;

/// The id a sticky cookie carries for instance `id` of `service`.
pub fn id_of(service: &str, id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(service.as_bytes())
        .chain_update([0])
        .chain_update(id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A route's sticky cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sticky {
    name: Box<str>,
    /// `Max-Age` in seconds; `None`: a session cookie.
    max_age: Option<u64>,
}

impl Sticky {
    /// `name` is checked by [`crate::version_pin::cookie_name_ok`] first.
    pub fn new(name: &str, max_age: Option<std::time::Duration>) -> Self {
        Self {
            name: name.into(),
            max_age: max_age.map(|d| d.as_secs()),
        }
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instance id the request's cookie names, if it carries a well-formed one.
    pub fn requested(&self, headers: ReqHeaders<'_>) -> Option<u64> {
        let value = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"))
            .find_map(|(_, v)| cookie_value(v, self.name.as_bytes()))?;
        if value.len() != 16 {
            return None;
        }
        u64::from_str_radix(std::str::from_utf8(value).ok()?, 16).ok()
    }

    /// The `Set-Cookie` value naming instance `id`; `secure` for a TLS client.
    pub fn set_cookie(&self, id: u64, secure: bool) -> HeaderValue {
        let secure = if secure { "; Secure" } else { "" };
        let max_age = self
            .max_age
            .map(|s| format!("; Max-Age={s}"))
            .unwrap_or_default();
        let v = format!(
            "{}={id:016x}; Path=/; HttpOnly; SameSite=Lax{max_age}{secure}",
            self.name
        );
        // The name is a checked token and the rest is ASCII.
        HeaderValue::try_from(v).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn ids_are_stable_and_tell_instances_and_services_apart() {
        assert_eq!(id_of("web", "web-1"), id_of("web", "web-1"));
        assert_ne!(id_of("web", "web-1"), id_of("web", "web-2"));
        assert_ne!(id_of("web", "1"), id_of("api", "1"));
        // Not a concatenation: ("we", "b1") and ("web", "1") differ.
        assert_ne!(id_of("we", "b1"), id_of("web", "1"));
    }

    #[test]
    fn the_cookie_round_trips_and_bad_values_name_nothing() {
        let s = Sticky::new("srv", None);
        let id = id_of("web", "web-1");
        let set = s.set_cookie(id, true);
        let set = set.to_str().unwrap();
        assert!(
            set.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
            "{set}"
        );
        let pair = set.split(';').next().unwrap();
        let mut m = HeaderMap::new();
        m.insert(
            "cookie",
            HeaderValue::from_str(&format!("a=1; {pair}")).unwrap(),
        );
        assert_eq!(s.requested(ReqHeaders::Map(&m)), Some(id));
        for bad in [
            "srv=xyz",
            "srv=",
            "srv=0123456789abcdef0",
            "other=0123456789abcdef",
        ] {
            m.insert("cookie", HeaderValue::from_static(bad));
            assert_eq!(s.requested(ReqHeaders::Map(&m)), None, "{bad}");
        }
        assert!(
            !Sticky::new("srv", None)
                .set_cookie(1, false)
                .to_str()
                .unwrap()
                .contains("Secure")
        );
        let lasting = Sticky::new("srv", Some(std::time::Duration::from_secs(3600)));
        let v = lasting.set_cookie(1, false);
        assert!(
            v.to_str().unwrap().ends_with("SameSite=Lax; Max-Age=3600"),
            "{v:?}"
        );
    }
}
