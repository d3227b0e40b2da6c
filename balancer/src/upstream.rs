//! The upstream HTTP/1.1 client: a pooled TCP connection driven inline from the request
//! future — no connection task, no channels. The request head is encoded into one buffer
//! and written with one syscall; the response head is parsed straight out of the read
//! buffer (`upstream_head`), header values shared with it (no copy); the body is decoded
//! as the client side pulls it. The stream is plain TCP, or TLS / a PROXY header first when the
//! service asks for them (`upstream_io`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, Version};

use crate::chunked::{self, Step};
use crate::tcp::UpstreamOpts;
pub use crate::upstream_head::{Framing, Head, has_token, last_token_is, parse_head, parse_length};
use crate::upstream_io::{self, Origin, UpIo};

/// Read buffer growth step.
pub(crate) const READ_CHUNK: usize = 8 * 1024;

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

impl UpConn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let io = upstream_io::connect_tcp(addr).await?;
        Ok(Self {
            io: UpIo::Plain(io),
            buf: BytesMut::new(),
            origin: None,
        })
    }

    /// A connection the balancer makes on its own behalf (a mirrored copy, a health
    /// probe): plain, or as the service's options say; a PROXY header, if any, announces
    /// the instance's own address (there is no client).
    pub async fn open(addr: SocketAddr, opts: Option<&Arc<UpstreamOpts>>) -> io::Result<Self> {
        match opts {
            None => Self::connect(addr).await,
            Some(o) => Self::connect_with(addr, o, addr, addr, None).await,
        }
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

pub use chunked::{LAST_CHUNK, chunk_head};

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!head.headers.contains_key(http::header::CONTENT_LENGTH));
        assert_eq!(head.headers["x-end"], "2");
    }
}
