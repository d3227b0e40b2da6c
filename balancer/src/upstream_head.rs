//! The upstream's response head: parsed with `httparse` straight out of the connection's
//! read buffer, checked (conflicting lengths, oversized heads), its body framing decided,
//! and its end-to-end lines handed on — as bytes for an HTTP/1 client, as a `HeaderMap`
//! sharing the buffer for an HTTP/2 one. Also the small value parsers the request side
//! shares (`Content-Length`, comma-separated tokens).

use bytes::{Buf as _, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::chunked::Decoder;
use crate::h1_head;
use crate::hop_by_hop::{self, eq_lowercase};
use crate::upstream::{READ_CHUNK, UpError};

/// Response heads larger than this are refused (502): the upstream is broken.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header lines parsed per response head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Header lines parsed on the stack (most responses); more go to a heap array.
const FEW_RESPONSE_HEADERS: usize = 24;

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304, or a complete body).
    None,
    Length(u64),
    Chunked(Decoder),
    /// Until the upstream closes (HTTP/1.0 style).
    UntilClose,
}

/// A parsed response head.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// Empty when the head was asked for as `lines` (and is not a 101).
    pub headers: HeaderMap,
    /// For an HTTP/1 client: the end-to-end header lines, encoded as they go out (see
    /// [`crate::h1_head`]); `None` when `headers` holds them.
    pub lines: Option<h1_head::Lines>,
    pub framing: Framing,
    /// The connection may carry another request once the body is done.
    pub keep_alive: bool,
}

/// Parses one response head from the front of `buf` and removes it (`Ok(None)`: not
/// complete yet). A head larger than `MAX_RESPONSE_HEAD` is refused whether it arrived in
/// one read or in many.
pub fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    lines: Option<Version>,
) -> Result<Option<Head>, UpError> {
    // A small array first: initialising 128 slots for every response cost more than
    // parsing the head. A head with more lines is parsed again with the full array.
    let mut few = [httparse::EMPTY_HEADER; FEW_RESPONSE_HEADERS];
    let mut many;
    let mut resp = httparse::Response::new(&mut few);
    let mut parsed = resp.parse(buf);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        many = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        resp = httparse::Response::new(&mut many);
        parsed = resp.parse(buf);
    }
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
        Ok(_) => return Err(UpError::Malformed("response head too large")),
        Err(_) => return Err(UpError::Malformed("unparsable response head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(UpError::Malformed("bad status code"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // A 101's headers go to the tunnel code as a map (rare); everything else that an
    // HTTP/1 client gets is forwarded as bytes: no `HeaderMap`, no per-value refcount.
    let as_lines = lines.filter(|_| status != StatusCode::SWITCHING_PROTOCOLS);
    let mut length: Option<u64> = None;
    let mut repeated_length = false;
    let mut chunked = false;
    let mut te = false;
    let mut close = version == Version::HTTP_10;
    let mut connection_names_more = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if eq_lowercase(name, b"content-length") {
            let n = parse_length(h.value).ok_or(UpError::Malformed("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(UpError::Malformed("conflicting content-lengths"));
            }
            repeated_length |= length.is_some();
            length = Some(n);
        } else if eq_lowercase(name, b"transfer-encoding") {
            te = true;
            chunked = last_token_is(h.value, "chunked");
        } else if eq_lowercase(name, b"connection") {
            if has_token(h.value, "close") {
                close = true;
            } else if version == Version::HTTP_10 && has_token(h.value, "keep-alive") {
                close = false;
            }
            connection_names_more |= !hop_by_hop::names_no_extra_header(h.value);
        }
    }
    let mut headers = HeaderMap::new();
    let mut out_lines = None;
    if let Some(client_version) = as_lines {
        // Room for what joins the lines in the client's write: the status line and
        // framing lines, and the body bytes already read.
        let mut l =
            h1_head::Lines::with_status(buf.len().min(2 * READ_CHUNK) + 96, client_version, status);
        // Kept lines that end in CRLF right after their value are copied as they came,
        // consecutive ones in one piece (`run`: buffer offsets not yet copied); others
        // (bare LF, trailing blanks, empty value) are re-encoded.
        let base = buf.as_ptr() as usize;
        let mut run: Option<(usize, usize)> = None;
        let mut length_kept = false;
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            // One length line at most: identical duplicates were accepted as one. (Names
            // are compared only when a length must go: most heads have one or none.)
            let is_length = (te || repeated_length) && eq_lowercase(name, b"content-length");
            let keep = !(hop_by_hop::is_hop_by_hop(name)
                || (is_length && (te || length_kept))
                || (connection_names_more && hop_by_hop::named_by_connection(resp.headers, name)));
            length_kept |= keep && is_length;
            let start = h.name.as_ptr() as usize - base;
            let end = h.value.as_ptr() as usize - base + h.value.len();
            let raw = (keep && !h.value.is_empty() && buf[end..].starts_with(b"\r\n"))
                .then_some((start, end + 2));
            match (run, raw) {
                // The next line of the run.
                (Some((from, to)), Some((at, past))) if to == at => run = Some((from, past)),
                _ => {
                    if let Some((from, to)) = run {
                        l.bytes.extend_from_slice(&buf[from..to]);
                    }
                    run = raw;
                    if keep && raw.is_none() {
                        l.push(name, h.value);
                    }
                }
            }
        }
        if let Some((from, to)) = run {
            l.bytes.extend_from_slice(&buf[from..to]);
        }
        // Both: the length is ignored (RFC 9112 §6.3) and never forwarded.
        l.has_length = length.is_some() && !te;
        out_lines = Some(l);
        buf.advance(len);
    } else {
        // Header positions inside the buffer, so that the head can then be split off
        // and its values shared with the `HeaderMap` without copying.
        let base = buf.as_ptr() as usize;
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
        let count = resp.headers.len();
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            *span = (
                (h.name.as_ptr() as usize - base) as u32,
                h.name.len() as u32,
                (h.value.as_ptr() as usize - base) as u32,
                h.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        headers.reserve(count);
        for &(ns, nl, vs, vl) in &spans[..count] {
            let raw_name = &head[ns as usize..(ns + nl) as usize];
            let raw_value = head.slice(vs as usize..(vs + vl) as usize);
            let name = HeaderName::from_bytes(raw_name)
                .map_err(|_| UpError::Malformed("bad header name"))?;
            let value = HeaderValue::from_maybe_shared(raw_value)
                .map_err(|_| UpError::Malformed("bad header value"))?;
            headers.append(name, value);
        }
        if te {
            // Both: the length is ignored (RFC 9112 §6.3); never forward it.
            headers.remove(header::CONTENT_LENGTH);
        } else if repeated_length && let Some(first) = headers.get(header::CONTENT_LENGTH).cloned()
        {
            // Identical duplicates were accepted as one: forward one.
            headers.insert(header::CONTENT_LENGTH, first);
        }
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if te {
        if !chunked {
            // A body that ends with the connection (RFC 9112 §6.3 rule 4, response).
            close = true;
            Framing::UntilClose
        } else {
            Framing::Chunked(Decoder::new())
        }
    } else {
        match length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => {
                close = true;
                Framing::UntilClose
            }
        }
    };
    Ok(Some(Head {
        status,
        version,
        headers,
        lines: out_lines,
        framing,
        keep_alive: !close && status != StatusCode::SWITCHING_PROTOCOLS,
    }))
}

/// A Content-Length value: digits only.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Digits only, at most 19 of them: below u64::MAX (20 digits), no overflow possible.
    // (Once per message: `str::parse` cost ~170 instructions here for "100".)
    Some(v.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&c| c == b',').map(|t| t.trim_ascii())
}

pub fn has_token(v: &[u8], token: &str) -> bool {
    tokens(v).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Transfer-Encoding's last coding is `token` (chunked must be last, RFC 9112 §6.1).
pub fn last_token_is(v: &[u8], token: &str) -> bool {
    tokens(v)
        .filter(|t| !t.is_empty())
        .last()
        .is_some_and(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_helpers() {
        assert!(has_token(b"Keep-Alive, Close", "close"));
        assert!(!has_token(b"closed", "close"));
        assert!(last_token_is(b"gzip, chunked", "chunked"));
        assert!(!last_token_is(b"chunked, gzip", "chunked"));
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_length(b"10000000000000000000"), None);
        assert_eq!(parse_length(b"+4"), None);
        assert_eq!(parse_length(b""), None);
    }

    /// Identical duplicate lengths are accepted as one and forwarded as one, to an HTTP/1
    /// client (lines) and an HTTP/2 one (map); differing ones are refused.
    #[test]
    fn a_repeated_length_goes_to_the_client_once() {
        let raw =
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\ncontent-length: 5\r\n\r\nhello";
        let head = parse_head(&mut raw.into(), &Method::GET, Some(Version::HTTP_11))
            .unwrap()
            .unwrap();
        let lines = head.lines.unwrap();
        assert_eq!(
            String::from_utf8(lines.bytes).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n"
        );
        assert_eq!(head.framing, Framing::Length(5));
        let head = parse_head(&mut raw.into(), &Method::GET, None)
            .unwrap()
            .unwrap();
        let lengths: Vec<_> = head
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(lengths, ["5"]);
        let conflicting = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(parse_head(&mut conflicting.into(), &Method::GET, None).is_err());
    }

    #[test]
    fn a_response_head_over_the_limit_is_refused_in_one_read_or_many() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
            "b".repeat(MAX_RESPONSE_HEAD)
        );
        assert!(parse_head(&mut big.as_str().into(), &Method::GET, None).is_err());
        let partial = &big[..MAX_RESPONSE_HEAD + 1];
        assert!(parse_head(&mut partial.into(), &Method::GET, None).is_err());
        let small = &big[..MAX_RESPONSE_HEAD - 100];
        assert!(matches!(
            parse_head(&mut small.into(), &Method::GET, None),
            Ok(None)
        ));
    }
}
