//! Parsing and validating an HTTP/1.x request head from a client, straight out of the
//! connection's read buffer (`httparse`, header values shared with the buffer).
//!
//! The raw head is where request smuggling is stopped (RFC 9112 §6): a request with both
//! `Transfer-Encoding` and `Content-Length`, conflicting or malformed lengths, or a
//! transfer coding that does not end in `chunked` is refused with 400 and the connection
//! closed — it is never "fixed up" and forwarded.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Uri, Version};

use crate::hop_by_hop::eq_lowercase;
use crate::upstream::{has_token, last_token_is, parse_length};

/// Header lines parsed on the stack; a larger `max_headers` uses a heap array.
const STACK_HEADERS: usize = 128;

/// Why a head was refused. Every case closes the connection after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// 431: the head is larger than `max_header_bytes`.
    #[error("request head too large")]
    TooLarge,
    /// 431: more header lines than `max_headers`.
    #[error("too many header lines")]
    TooManyHeaders,
    /// 400.
    #[error("bad request: {0}")]
    Bad(&'static str),
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// A complete, validated request head. `request` carries method, target and version but
/// no headers: they stay in `head` as the client sent them.
pub struct Parsed {
    pub request: Request<()>,
    pub head: RawHead,
    pub body: BodyKind,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (never forwarded: the balancer answers it).
    pub expect_continue: bool,
    /// An HTTP/1.1 `Upgrade` request (`Connection: upgrade` and an `Upgrade` header).
    pub upgrade: bool,
}

/// A request head kept as bytes, validated by the parser. The proxy reads the few headers
/// it needs from it and forwards the others line by line: no `HeaderMap` is built for an
/// HTTP/1 request (hashing, two allocations and a refcount per header were ~12 % of the
/// user-space cost of a proxied request).
pub struct RawHead {
    bytes: Bytes,
    /// Where the header lines start (after the request line).
    lines_at: usize,
    /// What the parser saw on its way, so that the proxy reads the lines only once (to
    /// forward them): the declared body length, where the first `Host` value is,
    /// whether a `Connection` line names headers other than keep-alive/close/upgrade, and
    /// whether the length came on several (identical) lines.
    content_length: Option<u64>,
    host: Option<(usize, usize)>,
    connection_names_more: bool,
    repeated_length: bool,
}

impl RawHead {
    /// The header lines as `(name, value)` in the client's order (value without its
    /// surrounding whitespace), less an `Expect: 100-continue`.
    pub fn lines(&self) -> RawLines<'_> {
        RawLines {
            rest: &self.bytes[self.lines_at..],
        }
    }

    /// Length of the head in bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The first value of header `name` (any case). The proxy reads what it needs from the
    /// fields the parser filled; this is for the tests.
    #[cfg(test)]
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.lines()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// The first `Host` value.
    pub fn host(&self) -> Option<&[u8]> {
        self.host.map(|(at, len)| &self.bytes[at..at + len])
    }

    /// A `Connection` line names other headers to drop (beyond keep-alive/close/upgrade).
    pub fn connection_names_more(&self) -> bool {
        self.connection_names_more
    }

    /// `Content-Length` came on more than one line (with one value: others are refused).
    pub fn repeated_length(&self) -> bool {
        self.repeated_length
    }
}

/// Iterator over a validated head's header lines (see [`RawHead::lines`]).
#[derive(Clone)]
pub struct RawLines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for RawLines<'a> {
    type Item = (&'a [u8], &'a [u8]);

    // Inlined into each caller: with a second caller (`version_pin`) LLVM outlined it, and
    // the request head's encoding paid ~75 instructions a request for the calls
    // (`bench/balancer-callgrind.sh`).
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            // The parser accepted the head: lines end in LF (CRLF or bare LF), a header
            // line has a colon, the blank line ends the head.
            let nl = memchr::memchr(b'\n', self.rest)?;
            let line = &self.rest[..nl];
            self.rest = &self.rest[nl + 1..];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                self.rest = &[];
                return None;
            }
            // Names are short: a plain scan beats a vectorised search here.
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if eq_lowercase(name, b"expect") && eq_lowercase(value, b"100-continue") {
                continue;
            }
            return Some((name, value));
        }
    }
}

/// The HTTP/2 connection preface's first line: an h2c prior-knowledge client.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Parses one head from the front of `buf` and removes it; `Ok(None)` = incomplete.
pub fn parse(
    buf: &mut BytesMut,
    max_headers: usize,
    max_bytes: usize,
) -> Result<Option<Parsed>, HeadError> {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap = Vec::with_capacity(max_headers);
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) if n > max_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Bad("unparsable request head")),
    };
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Bad("bad method"))?;
    let path = req.path.unwrap_or("").as_bytes();
    // Position inside the buffer, so that the target can be shared with the split head.
    let path = (path.as_ptr() as usize - buf.as_ptr() as usize, path.len());

    let mut length: Option<u64> = None;
    let mut te: Option<bool> = None; // Some(last coding is chunked)
    let mut close = version == Version::HTTP_10;
    let mut expect_continue = false;
    let mut has_upgrade = false;
    let mut connection_upgrade = false;
    let mut connection_names_more = false;
    let mut repeated_length = false;
    let mut host = None;
    for h in req.headers.iter() {
        let (name, raw) = (h.name.as_bytes(), h.value);
        if eq_lowercase(name, b"content-length") {
            let n = parse_length(raw).ok_or(HeadError::Bad("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Bad("conflicting content-lengths"));
            }
            repeated_length |= length.is_some();
            length = Some(n);
        } else if eq_lowercase(name, b"transfer-encoding") {
            // Several lines form one list: the last line's last coding is what counts.
            te = Some(last_token_is(raw, "chunked"));
        } else if eq_lowercase(name, b"connection") {
            if has_token(raw, "close") {
                close = true;
            } else if version == Version::HTTP_10 && has_token(raw, "keep-alive") {
                close = false;
            }
            connection_upgrade |= has_token(raw, "upgrade");
            connection_names_more |= !crate::hop_by_hop::names_no_extra_header(raw);
        } else if eq_lowercase(name, b"host") {
            host.get_or_insert((raw.as_ptr() as usize - buf.as_ptr() as usize, raw.len()));
        } else if eq_lowercase(name, b"upgrade") {
            has_upgrade = true;
        } else if eq_lowercase(name, b"expect") && eq_lowercase(raw.trim_ascii(), b"100-continue") {
            expect_continue = true;
        }
    }
    let body = match (te, length) {
        (Some(_), Some(_)) => {
            return Err(HeadError::Bad("both transfer-encoding and content-length"));
        }
        (Some(_), None) if version == Version::HTTP_10 => {
            return Err(HeadError::Bad("transfer-encoding in an HTTP/1.0 request"));
        }
        (Some(true), None) => BodyKind::Chunked,
        (Some(false), None) => {
            return Err(HeadError::Bad("transfer-encoding does not end in chunked"));
        }
        (None, Some(0)) | (None, None) => BodyKind::None,
        (None, Some(n)) => BodyKind::Length(n),
    };
    let bytes = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(bytes.slice(path.0..path.0 + path.1))
        .map_err(|_| HeadError::Bad("bad request target"))?;
    let lines_at = memchr::memchr(b'\n', &bytes).map_or(bytes.len(), |n| n + 1);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    Ok(Some(Parsed {
        request,
        head: RawHead {
            bytes,
            lines_at,
            content_length: length,
            host,
            connection_names_more,
            repeated_length,
        },
        body,
        keep_alive: !close,
        expect_continue: expect_continue && body != BodyKind::None,
        upgrade: version == Version::HTTP_11 && has_upgrade && connection_upgrade,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(raw: &str) -> Result<Option<Parsed>, HeadError> {
        parse(&mut BytesMut::from(raw.as_bytes()), 100, 8192)
    }

    #[test]
    fn parses_a_simple_get_and_leaves_the_rest() {
        let mut buf =
            BytesMut::from(&b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nGET /next"[..]);
        let p = parse(&mut buf, 100, 8192).unwrap().unwrap();
        assert_eq!(p.request.method(), Method::GET);
        assert_eq!(p.request.uri().path_and_query().unwrap().as_str(), "/a?b");
        assert_eq!(p.head.get(b"X-a"), Some(&b"1"[..]));
        let lines: Vec<_> = p.head.lines().collect();
        assert_eq!(lines, [(&b"Host"[..], &b"x"[..]), (b"X-A", b"1")]);
        assert_eq!(p.body, BodyKind::None);
        assert!(p.keep_alive);
        assert_eq!(&buf[..], b"GET /next");
    }

    #[test]
    fn partial_head_waits_and_oversized_head_is_431() {
        assert!(one("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(one(&big).err(), Some(HeadError::TooLarge));
        let many: String = (0..101).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            one(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(HeadError::TooManyHeaders)
        );
    }

    #[test]
    fn transfer_encoding_with_content_length_is_refused() {
        let r = one("POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(r, Err(HeadError::Bad(_))));
        let r = one("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n");
        assert!(matches!(r, Err(HeadError::Bad(_))));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HELLO\r\n\r\n",
        ] {
            assert!(matches!(one(bad), Err(HeadError::Bad(_))), "{bad:?}");
        }
    }

    #[test]
    fn framing_keep_alive_and_expect() {
        let p = one("POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.body, BodyKind::Length(5));
        assert!(p.expect_continue && p.head.get(b"expect").is_none());
        let p =
            one("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(p.body, BodyKind::Chunked);
        assert!(!p.keep_alive);
        let p = one("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!p.keep_alive);
        let p = one("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.keep_alive);
        assert_eq!(p.request.version(), Version::HTTP_10);
    }
}
