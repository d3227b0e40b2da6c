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

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::net::TcpStream;

use crate::chunked::{self, Decoder, Step};
use crate::tcp::UpstreamOpts;
use crate::upstream_io::{self, Origin, UpIo};

/// Response heads larger than this are refused (502): the upstream is broken.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header lines parsed per response head (on the stack).
const MAX_RESPONSE_HEADERS: usize = 128;
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
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once the body is done.
    pub keep_alive: bool,
}

impl UpConn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let io = TcpStream::connect(addr).await?;
        let _ = io.set_nodelay(true);
        Ok(Self {
            io: UpIo::Plain(io),
            buf: BytesMut::new(),
            origin: None,
        })
    }

    /// A connection for a service with upstream options (PROXY header, TLS); `client` and
    /// `local` are the addresses the PROXY header announces.
    pub async fn connect_with(
        addr: SocketAddr,
        opts: &Arc<UpstreamOpts>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Self> {
        let io = upstream_io::open(addr, opts, client, local).await?;
        Ok(Self {
            io,
            buf: BytesMut::new(),
            origin: Some(Box::new(Origin {
                opts: opts.clone(),
                owner: opts.proxy.map(|_| client),
            })),
        })
    }

    /// Whether this (pooled) connection may carry a request of `client` to a service with
    /// upstream options `opts`.
    pub fn fits(&self, opts: Option<&Arc<UpstreamOpts>>, client: SocketAddr) -> bool {
        match (&self.origin, opts) {
            (None, None) => true,
            (Some(o), Some(opts)) => o.fits(opts, client),
            _ => false,
        }
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

    /// Reads the response head (skipping interim 1xx answers other than 101).
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, UpError> {
        let mut any_byte = false;
        loop {
            if !self.buf.is_empty() {
                any_byte = true;
                if let Some(head) = self.parse_head(method)? {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Ok(head);
                }
                if self.buf.len() > MAX_RESPONSE_HEAD {
                    return Err(UpError::Malformed("response head too large"));
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

    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, UpError> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut raw);
        let len = match resp.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
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
        // Header positions inside the buffer, so that the head can then be split off
        // and its values shared with the `HeaderMap` without copying.
        let base = self.buf.as_ptr() as usize;
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
        let head = self.buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut te = false;
        let mut close = version == Version::HTTP_10;
        for &(ns, nl, vs, vl) in &spans[..count] {
            let raw_name = &head[ns as usize..(ns + nl) as usize];
            let raw_value = head.slice(vs as usize..(vs + vl) as usize);
            let name = HeaderName::from_bytes(raw_name)
                .map_err(|_| UpError::Malformed("bad header name"))?;
            if name == header::CONTENT_LENGTH {
                let n = parse_length(&raw_value).ok_or(UpError::Malformed("bad content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(UpError::Malformed("conflicting content-lengths"));
                }
                length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                te = true;
                chunked = last_token_is(&raw_value, "chunked");
            } else if name == header::CONNECTION {
                if has_token(&raw_value, "close") {
                    close = true;
                } else if version == Version::HTTP_10 && has_token(&raw_value, "keep-alive") {
                    close = false;
                }
            }
            let value = HeaderValue::from_maybe_shared(raw_value)
                .map_err(|_| UpError::Malformed("bad header value"))?;
            headers.append(name, value);
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
        if te {
            // Both: the length is ignored (RFC 9112 §6.3); never forward it.
            headers.remove(header::CONTENT_LENGTH);
        }
        Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive: !close && status != StatusCode::SWITCHING_PROTOCOLS,
        }))
    }

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
    std::str::from_utf8(v).ok()?.parse().ok()
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

/// Encodes a request head for the upstream: `METHOD target HTTP/1.1`, the headers as they
/// are (already rewritten), and, if asked, `transfer-encoding: chunked`.
pub fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    chunked: bool,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in headers {
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
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
        assert_eq!(parse_length(b"+4"), None);
        assert_eq!(parse_length(b""), None);
    }

    #[test]
    fn request_head_is_one_buffer() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("x"));
        let mut out = Vec::new();
        encode_request_head(&mut out, &Method::POST, "/a?b", &h, true);
        assert_eq!(
            out,
            b"POST /a?b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
