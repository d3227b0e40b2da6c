//! The upstream HTTP/1.1 client: a pooled TCP connection driven inline from the request
//! future — no connection task, no channels. The request head is encoded into one buffer
//! and written with one syscall; the response head is parsed with `httparse` straight out
//! of the read buffer, header values shared with it (no copy); the body is decoded as the
//! client side pulls it. The stream is plain TCP, or TLS / a PROXY header first when the
//! service asks for them (`upstream_io`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::chunked::{self, Decoder, Step};
use crate::h1_head::{self, eq_lowercase};
use crate::tcp::UpstreamOpts;
use crate::upstream_io::{self, Origin, UpIo};

/// Response heads larger than this are refused (502): the upstream is broken.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header lines parsed per response head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Header lines parsed on the stack (most responses); more go to a heap array.
const FEW_RESPONSE_HEADERS: usize = 24;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;

/// One keep-alive connection to an upstream instance.
pub struct UpConn {
    io: UpIo,
    /// Bytes read but not yet consumed (a response head in progress, body bytes).
    buf: BytesMut,
    /// `None`: plain TCP opened without upstream options.
    origin: Option<Box<Origin>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Closed or reset before any byte of a response: a stale keep-alive connection or a
    /// crashed upstream; the request may not have been seen.
    #[error("connection closed before a response")]
    ClosedBeforeResponse,
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

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

impl UpConn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let io = upstream_io::connect_tcp(addr).await?;
        Ok(Self {
            io: UpIo::Plain(io),
            buf: BytesMut::new(),
            origin: None,
        })
    }

    /// A connection for a service with upstream options (PROXY header, TLS); `client` and
    /// `local` are the addresses the PROXY header announces, `owner` the token of the
    /// client connection it then belongs to (with a PROXY header only).
    pub async fn connect_with(
        addr: SocketAddr,
        opts: &Arc<UpstreamOpts>,
        client: SocketAddr,
        local: SocketAddr,
        owner: Option<&Arc<()>>,
    ) -> io::Result<Self> {
        let io = upstream_io::open(addr, opts, client, local).await?;
        Ok(Self {
            io,
            buf: BytesMut::new(),
            origin: Some(Box::new(Origin {
                opts: opts.clone(),
                owner: owner.map(Arc::downgrade),
            })),
        })
    }

    /// Whether this (pooled) connection may carry a request to a service with upstream
    /// options `opts` from the client connection `owner` (its token; `None` without a
    /// PROXY header).
    pub fn fits(&self, opts: Option<&Arc<UpstreamOpts>>, owner: Option<&Arc<()>>) -> bool {
        match (&self.origin, opts) {
            (None, None) => true,
            (Some(o), Some(opts)) => o.fits(opts, owner),
            _ => false,
        }
    }

    /// It belongs to one client connection (it sent a PROXY header).
    pub fn is_owned(&self) -> bool {
        self.origin.as_ref().is_some_and(|o| o.owner.is_some())
    }

    /// It belonged to a client connection that has closed.
    pub fn is_orphan(&self) -> bool {
        self.origin.as_ref().is_some_and(|o| o.is_orphan())
    }

    /// False when the upstream has closed the idle connection (or sent something
    /// unexpected). Costs a syscall only if the reactor saw the socket turn readable.
    pub fn looks_alive(&mut self) -> bool {
        self.buf.is_empty() && self.io.looks_alive()
    }

    pub async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.io.write_all(b).await
    }

    /// Reads more bytes into the buffer; `Ok(0)` is end of stream. Through `poll_read`
    /// (not `try_read`): a short read clears the socket's cached readiness, so the next
    /// response is waited for without a wasted EAGAIN `recv` first.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads the response head (skipping interim 1xx answers other than 101). `lines`:
    /// the version of an HTTP/1 client, which gets the head as bytes (see
    /// [`h1_head::Lines`]), not as a `HeaderMap`.
    pub async fn read_head(
        &mut self,
        method: &Method,
        lines: Option<Version>,
    ) -> Result<Head, UpError> {
        let mut any_byte = false;
        loop {
            if !self.buf.is_empty() {
                any_byte = true;
                if let Some(head) = parse_head(&mut self.buf, method, lines)? {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Ok(head);
                }
            }
            match self.fill().await {
                Ok(0) if !any_byte => return Err(UpError::ClosedBeforeResponse),
                Ok(0) => return Err(UpError::Malformed("closed inside the response head")),
                Ok(_) => {}
                // TLS: a peer that closes without close_notify reads as UnexpectedEof.
                Err(e)
                    if !any_byte && (is_reset(&e) || e.kind() == io::ErrorKind::UnexpectedEof) =>
                {
                    return Err(UpError::ClosedBeforeResponse);
                }
                Err(e) => return Err(UpError::Io(e)),
            }
        }
    }
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
            connection_names_more |= !h1_head::names_no_extra_header(h.value);
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
            let keep = !(h1_head::is_hop_by_hop(name)
                || (is_length && (te || length_kept))
                || (connection_names_more && h1_head::named_by_connection(resp.headers, name)));
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

impl UpConn {
    /// Next piece of the response body; `None` at its end.
    pub fn poll_body(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match framing {
                Framing::None => return Poll::Ready(None),
                Framing::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = (self.buf.len() as u64).min(*left) as usize;
                        let data = self.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            *framing = Framing::None;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Framing::Chunked(d) => match d.step(&mut self.buf) {
                    Ok(Step::Data(b)) => return Poll::Ready(Some(Ok(b))),
                    Ok(Step::Done) => {
                        *framing = Framing::None;
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(e) => {
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            e,
                        ))));
                    }
                },
                Framing::UntilClose => {
                    if !self.buf.is_empty() {
                        return Poll::Ready(Some(Ok(self.buf.split().freeze())));
                    }
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if *framing == Framing::UntilClose => {
                    *framing = Framing::None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed inside the body",
                    ))));
                }
                Ok(_) => {}
                // TLS without close_notify (common for close-delimited bodies).
                Err(e)
                    if *framing == Framing::UntilClose
                        && e.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    *framing = Framing::None;
                    return Poll::Ready(None);
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    /// The stream and any bytes already read past the head (for an upgrade tunnel).
    pub fn into_parts(self) -> (UpIo, BytesMut) {
        (self.io, self.buf)
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
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

pub use chunked::{LAST_CHUNK, chunk_head};

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

    /// One response head from a real loopback socket, read as lines (HTTP/1 client) and as
    /// a map (HTTP/2 client).
    async fn head_of(raw: &'static [u8], lines: Option<Version>) -> Head {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(raw).await.unwrap();
            s
        });
        let mut up = UpConn::connect(addr).await.unwrap();
        let head = up.read_head(&Method::GET, lines).await.unwrap();
        drop(server.await.unwrap());
        head
    }

    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive, X-Hop\r\n\
        X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\
        Content-Length: 9\r\nX-End: 2\r\n\r\n";

    #[tokio::test]
    async fn response_lines_for_http1_clients_lose_hop_headers_and_the_ignored_length() {
        let head = head_of(RESPONSE, Some(Version::HTTP_11)).await;
        assert!(head.headers.is_empty());
        let lines = head.lines.unwrap();
        assert_eq!(
            String::from_utf8(lines.bytes).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: up\r\nX-End: 2\r\n"
        );
        assert!(!lines.has_length);
        assert!(matches!(head.framing, Framing::Chunked(_)));

        let head = head_of(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            Some(Version::HTTP_11),
        )
        .await;
        assert!(head.lines.unwrap().has_length);
        assert!(head.keep_alive);
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

    #[tokio::test]
    async fn response_lines_copied_as_they_came_or_re_encoded_when_not_crlf() {
        let head = head_of(
            b"HTTP/1.1 200 OK\r\nA: 1\r\nB:2\r\nConnection: close\r\nC: 3  \r\nD: 4\n\
              E: 5\r\nContent-Length: 0\r\n\r\n",
            Some(Version::HTTP_11),
        )
        .await;
        let lines = head.lines.unwrap();
        assert_eq!(
            String::from_utf8(lines.bytes).unwrap(),
            "HTTP/1.1 200 OK\r\nA: 1\r\nB:2\r\nC: 3\r\nD: 4\r\nE: 5\r\nContent-Length: 0\r\n"
        );
        assert!(lines.has_length && !head.keep_alive);
    }

    #[tokio::test]
    async fn response_map_for_http2_clients_drops_the_ignored_length() {
        let head = head_of(RESPONSE, None).await;
        assert!(head.lines.is_none());
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(head.headers["x-end"], "2");
    }
}
