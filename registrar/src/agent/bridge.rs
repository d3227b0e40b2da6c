//! Bridge networking settings: the `--bridge NAME=SUBNET` option, the gateway and host
//! addresses of its subnet, and the host-side veth name of a container.

use std::net::Ipv4Addr;

/// A bridge network: its name and IPv4 subnet (the first address is the gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for BridgeConfig {
    type Err = String;
    /// `NAME=A.B.C.D/N`, e.g. `wharf0=10.88.0.0/24`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, net) = s
            .split_once('=')
            .ok_or_else(|| format!("bridge {s:?}: expected NAME=A.B.C.D/N"))?;
        let (ip, prefix) = net
            .split_once('/')
            .ok_or_else(|| format!("bridge {s:?}: missing /N"))?;
        let subnet: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("bridge {s:?}: bad address {ip:?}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("bridge {s:?}: prefix must be 8..30"))?;
        if name.is_empty()
            || name.len() > 15
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("bridge {s:?}: bad interface name {name:?}"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            name: name.into(),
            subnet: Ipv4Addr::from(u32::from(subnet) & mask),
            prefix,
        })
    }
}

impl BridgeConfig {
    pub(super) fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 1)
    }
    pub(super) fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        (n >= 2 && n < size - 1).then(|| Ipv4Addr::from(u32::from(self.subnet) + n))
    }
}

/// A short stable hash for interface names.
pub(super) fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_parses_and_allocates() {
        let b: BridgeConfig = "wharf0=10.88.0.7/24".parse().unwrap();
        assert_eq!(b.subnet, Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(b.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(b.host(2), Some(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(b.host(255), None);
        for bad in [
            "10.0.0.0/24",
            "x=10.0.0.0",
            "x=10.0.0.0/31",
            "averyveryverylongname=10.0.0.0/24",
        ] {
            assert!(bad.parse::<BridgeConfig>().is_err(), "{bad}");
        }
    }
}
