//! PROXY protocol v1/v2 headers (`proxy_protocol`): round trips, damaged headers.

use proptest::prelude::*;

use super::*;
use crate::proxy_protocol;

fn read_proxy_header(bytes: &[u8]) -> Result<proxy_protocol::Header, proxy_protocol::ProxyError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut r = bytes;
    rt.block_on(proxy_protocol::read_header(&mut r))
}

fn socket_addr() -> impl Strategy<Value = std::net::SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into()),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into()),
    ]
}

proptest! {
    /// What the balancer sends upstream reads back as the same two addresses, in both
    /// versions (a v4 and a v6 address go as two v6 ones).
    #[test]
    fn proxy_header_round_trip(src in socket_addr(), dst in socket_addr(), v2 in any::<bool>()) {
        let wire = if v2 { proxy_protocol::encode_v2(src, dst) } else { proxy_protocol::encode_v1(src, dst) };
        let h = read_proxy_header(&wire).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let canonical = |a: std::net::SocketAddr| match a.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| (v4, a.port()).into()),
            _ => a,
        };
        prop_assert_eq!(h.source.map(canonical), Some(canonical(src)));
        prop_assert_eq!(h.destination.map(canonical), Some(canonical(dst)));
    }

    /// A damaged or foreign header is an error, never a panic; `starts_header` and
    /// `read_header` agree on what is not a PROXY header at all.
    #[test]
    fn proxy_header_damaged(src in socket_addr(), dst in socket_addr(), v2 in any::<bool>(), edits in edits(), tail in prop::collection::vec(any::<u8>(), 0..20)) {
        let mut wire = if v2 { proxy_protocol::encode_v2(src, dst) } else { proxy_protocol::encode_v1(src, dst) };
        wire.extend_from_slice(&tail);
        let wire = apply(wire, &edits);
        let result = read_proxy_header(&wire);
        if proxy_protocol::starts_header(&wire) == Some(false) {
            prop_assert_eq!(result, Err(proxy_protocol::ProxyError::Missing));
        }
    }
}
