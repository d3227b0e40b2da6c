//! PROXY protocol v1 (text) and v2 (binary), as specified by HAProxy
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): encoding headers for
//! upstreams and reading them from a front load balancer.
//!
//! Reading never consumes a byte past the header, so the stream can go on to TLS or HTTP
//! as it is (v1 is read byte by byte after its first 15 bytes; it is at most 107 bytes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
pub const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;
/// Longest v2 address block we accept (addresses + TLVs); the spec allows 65535.
const V2_MAX: usize = 4096;

/// What a header said: the original connection, or nothing (`LOCAL` / `UNKNOWN`: a health
/// check of the front balancer itself; use the socket's own addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("connection closed before a complete PROXY header")]
    Eof,
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// The two addresses in the same family (v4 + v6 → both as v6), as both versions require.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

/// `PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\r\n`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// Binary header, command PROXY, over TCP.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIG);
    out.push(0x21); // version 2, command PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(x) => x,
                IpAddr::V4(x) => x.to_ipv6_mapped(),
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Whether the first bytes a client sent start a PROXY header: `Some(true)` yes,
/// `Some(false)` no, `None` too few bytes to tell.
pub fn starts_header(prefix: &[u8]) -> Option<bool> {
    for sig in [&b"PROXY "[..], &V2_SIG[..]] {
        let n = prefix.len().min(sig.len());
        if prefix[..n] == sig[..n] {
            if n == sig.len() {
                return Some(true);
            }
            if prefix.len() < sig.len() {
                return None;
            }
        }
    }
    Some(false)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ProxyError> {
    r.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| ProxyError::Eof)
}

/// Reads one v1 or v2 header (required) and nothing more.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, ProxyError> {
    // Both versions are at least 15 bytes long ("PROXY UNKNOWN\r\n").
    let mut buf = [0u8; V1_MAX];
    read_exact(r, &mut buf[..15]).await?;
    if buf[..12] == V2_SIG {
        read_exact(r, &mut buf[15..16]).await?;
        return read_v2_body(r, &buf[..16]).await;
    }
    if &buf[..6] != b"PROXY " {
        return Err(ProxyError::Missing);
    }
    let mut len = 15;
    while !(buf[len - 2] == b'\r' && buf[len - 1] == b'\n') {
        if len == V1_MAX {
            return Err(ProxyError::Malformed("v1 line longer than 107 bytes"));
        }
        read_exact(r, &mut buf[len..len + 1]).await?;
        len += 1;
    }
    parse_v1(&buf[..len - 2])
}

fn parse_v1(line: &[u8]) -> Result<Header, ProxyError> {
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // PROXY
    let fam = parts.next().ok_or(ProxyError::Malformed("v1 family"))?;
    if fam == "UNKNOWN" {
        return Ok(Header {
            source: None,
            destination: None,
        });
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::Malformed("v1 needs 4 fields"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let ip: IpAddr = match fam {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
            _ => return Err(ProxyError::Malformed("v1 family")),
        }
        .map_err(|_| ProxyError::Malformed("v1 address"))?;
        Ok(ip)
    };
    // Digits only, no leading zero (the spec's form; `u16::from_str` alone takes "+80").
    let port = |s: &str| -> Result<u16, ProxyError> {
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ProxyError::Malformed("v1 port"));
        }
        s.parse().map_err(|_| ProxyError::Malformed("v1 port"))
    };
    Ok(Header {
        source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
        destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
    })
}

async fn read_v2_body<R: AsyncRead + Unpin>(r: &mut R, head: &[u8]) -> Result<Header, ProxyError> {
    let ver_cmd = head[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let fam = head[13];
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > V2_MAX {
        return Err(ProxyError::Malformed("v2 header too long"));
    }
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    let none = Header {
        source: None,
        destination: None,
    };
    match ver_cmd & 0x0f {
        0 => return Ok(none), // LOCAL
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command")),
    }
    match fam >> 4 {
        1 if body.len() >= 12 => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Ok(Header {
                source: Some(SocketAddr::new(ip(0), port(8))),
                destination: Some(SocketAddr::new(ip(4), port(10))),
            })
        }
        2 if body.len() >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Ok(Header {
                source: Some(SocketAddr::new(ip(0), port(32))),
                destination: Some(SocketAddr::new(ip(16), port(34))),
            })
        }
        // AF_UNSPEC / AF_UNIX: no usable address; keep the socket's.
        0 | 3 => Ok(none),
        _ => Err(ProxyError::Malformed("v2 address block too short")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    async fn roundtrip(bytes: Vec<u8>) -> (Result<Header, ProxyError>, Vec<u8>) {
        let mut input = bytes;
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut r = &input[..];
        let h = read_header(&mut r).await;
        (h, r.to_vec())
    }

    #[tokio::test]
    async fn v1_and_v2_roundtrip_without_overreading() {
        for (src, dst) in [
            (a("10.1.2.3:40000"), a("10.0.0.1:443")),
            (a("[2001:db8::1]:5555"), a("[2001:db8::2]:80")),
        ] {
            for enc in [encode_v1, encode_v2] {
                let (h, rest) = roundtrip(enc(src, dst)).await;
                let h = h.unwrap();
                assert_eq!(h.source, Some(src));
                assert_eq!(h.destination, Some(dst));
                assert_eq!(rest, b"GET / HTTP/1.1\r\n");
            }
        }
        assert_eq!(
            encode_v1(a("1.2.3.4:1111"), a("5.6.7.8:80")),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\r\n"
        );
        // Mixed families go out as v6.
        let (h, _) = roundtrip(encode_v2(a("1.2.3.4:1"), a("[::1]:2"))).await;
        assert_eq!(h.unwrap().source, Some(a("[::ffff:1.2.3.4]:1")));
    }

    #[tokio::test]
    async fn unknown_local_missing_and_malformed() {
        let (h, rest) = roundtrip(b"PROXY UNKNOWN\r\n".to_vec()).await;
        assert_eq!(h.unwrap().source, None);
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(roundtrip(local).await.0.unwrap().source, None);
        assert_eq!(roundtrip(vec![]).await.0, Err(ProxyError::Missing));
        for bad in [
            "PROXY TCP4 1.2.3.4 x 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                matches!(roundtrip(bad.into()).await.0, Err(ProxyError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            roundtrip(format!("PROXY TCP4 {}\r\n", "1".repeat(120)).into_bytes())
                .await
                .0,
            Err(ProxyError::Malformed(_))
        ));
        let mut short = &b"PROXY TCP4"[..];
        assert_eq!(read_header(&mut short).await, Err(ProxyError::Eof));
    }

    #[test]
    fn header_detection() {
        assert_eq!(starts_header(b"PRO"), None);
        assert_eq!(starts_header(b"PROXY TCP4"), Some(true));
        assert_eq!(starts_header(b"GET / HTTP/1.1"), Some(false));
        assert_eq!(starts_header(&V2_SIG[..5]), None);
        assert_eq!(starts_header(&V2_SIG), Some(true));
        assert_eq!(starts_header(b"\r\n\r\nX"), Some(false));
    }
}
